"""Multi-modal adapters: CLIP preprocessing and features, the projection, exactness, files, training hook."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import llama_adapter as la
from llama_adapter.adapter_file import save_adapter
from llama_adapter.errors import ImageError, UserError
from llama_adapter.multimodal.encoder import ClipPreprocessor, ImageEncoder, default_layers, load_image
from llama_adapter.multimodal.features import attach_visual_projection, llava_to_alpaca, prepare_multimodal
from llama_adapter.zero_init_attention import VisualProjection, projection_parameter_count

PREPROCESSOR = {
    "crop_size": {"height": 32, "width": 32},
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "do_rescale": True,
    "do_convert_rgb": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "rescale_factor": 1 / 255,
    "size": {"shortest_edge": 32},
    "image_processor_type": "CLIPImageProcessor",
}


def make_clip(path: str | Path, projection: bool = True, layers: int = 4, seed: int = 0) -> Path:
    """A tiny random CLIP vision tower (32x32 images, 8x8 patches) saved with a preprocessor_config.json."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    path = Path(path)
    cfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=24,
    )
    torch.manual_seed(seed)
    model = (CLIPVisionModelWithProjection if projection else CLIPVisionModel)(cfg).eval()
    model.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    return path


def random_image(seed: int, h: int = 40, w: int = 56, mode: str = "RGB") -> Image.Image:
    a = (np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8")
    return Image.fromarray(a).convert(mode)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def encoder(clip_dir: Path) -> ImageEncoder:
    return ImageEncoder.load(clip_dir)


# ---- preprocessing and features ------------------------------------------------------------------------------
def test_preprocessing_matches_transformers() -> None:
    import transformers

    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    ref = cls(**PREPROCESSOR)
    mine = ClipPreprocessor(PREPROCESSOR)
    images = [
        random_image(0),
        random_image(1, 80, 33),
        random_image(2, 20, 25),
        random_image(3, 64, 64, "L"),
        random_image(4, 50, 70, "RGBA"),
    ]
    expected = ref(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
    got = mine(images)
    assert got.shape == expected.shape == (5, 3, 32, 32)
    assert torch.allclose(got, expected, atol=1e-5)


def test_preprocessing_fixed_size_hand_computed() -> None:
    cfg = {
        "size": {"height": 4, "width": 4},
        "do_center_crop": False,
        "resample": 0,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    im = Image.fromarray(np.full((8, 8, 3), 255, dtype="uint8"))
    out = ClipPreprocessor(cfg)([im])
    assert out.shape == (1, 3, 4, 4) and torch.allclose(out, torch.ones_like(out))


def test_default_layers() -> None:
    assert default_layers(24) == [6, 12, 18, 24]
    assert default_layers(12) == [3, 6, 9, 12]
    assert default_layers(4) == [1, 2, 3, 4]


def test_multiscale_features(encoder: ImageEncoder) -> None:
    images = [random_image(i) for i in range(3)]
    f = encoder.encode(images)
    assert encoder.feature_dim == 4 * 32 + 24 and f.shape == (3, encoder.feature_dim) and f.dtype == torch.float32
    with torch.no_grad():  # the same numbers straight from transformers
        o = encoder.model(pixel_values=encoder.preprocess(images), output_hidden_states=True)
    assert torch.allclose(f[:, :32], o.hidden_states[1][:, 0])
    assert torch.allclose(f[:, 96:128], o.hidden_states[4][:, 0])
    assert torch.allclose(f[:, 128:], o.image_embeds)
    assert torch.allclose(encoder.encode(images[:1]), f[:1], atol=1e-5)  # batch-independent
    fp = encoder.fingerprint()
    assert fp["feature_dim"] == 152 and fp["layers"] == [1, 2, 3, 4] and len(fp["digest"]) == 16


def test_encoder_without_projection_uses_pooled_output(tmp_path: Path) -> None:
    enc = ImageEncoder.load(make_clip(tmp_path / "plain", projection=False), layers=[2, 4])
    assert not enc.has_projection and enc.feature_dim == 3 * 32
    assert enc.encode([random_image(0)]).shape == (1, 96)


def test_encoder_from_full_clip_checkpoint(tmp_path: Path) -> None:
    """The usual download (e.g. clip-vit-large-patch14) is a full CLIPModel: vision tower + its projection."""
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        projection_dim=24,
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=64,
            bos_token_id=0,
            eos_token_id=1,
        ),
    )
    torch.manual_seed(0)
    full = CLIPModel(cfg).eval()
    full.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    enc = ImageEncoder.load(tmp_path)
    im = random_image(5)
    with torch.no_grad():
        ref = full.get_image_features(pixel_values=enc.preprocess([im]))
    ref = getattr(ref, "pooler_output", ref)
    assert enc.has_projection and torch.allclose(enc.encode([im])[:, -24:], ref, atol=1e-5)


def test_encoder_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="config.json not found"):
        ImageEncoder.load(tmp_path)


# ---- images ----------------------------------------------------------------------------------------------------
def test_load_image_sources(tmp_path: Path) -> None:
    im = random_image(0, 10, 12, "L")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    (tmp_path / "a.png").write_bytes(buf.getvalue())
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    for src in (tmp_path / "a.png", str(tmp_path / "a.png"), buf.getvalue(), url):
        out = load_image(src)
        assert out.mode == "RGB" and out.size == (12, 10)
    with pytest.raises(ImageError, match="missing.png: image file not found"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ImageError, match="bad.png: cannot read image"):
        load_image(tmp_path / "bad.png")


# ---- the projection and the model ---------------------------------------------------------------------------------
def test_projection_parameter_count_at_7b_vit_l14() -> None:
    proj = VisualProjection(4 * 1024 + 768, 4096, hidden=64, groups=[1024] * 4 + [768])
    n = sum(p.numel() for p in proj.parameters())
    assert n == projection_parameter_count() == 587_328  # paper: ~0.6M
    again = VisualProjection.from_config(json.loads(json.dumps(proj.config_dict())), 4096)
    assert again.config_dict() == proj.config_dict()


def _mm_model(tiny_base: Path, encoder: ImageEncoder) -> la.Transformer:
    model = la.load_model(tiny_base, dtype=torch.float32)
    model.add_adapter("mm", la.AdapterConfig(prompt_length=4, layers=3))
    torch.manual_seed(0)
    attach_visual_projection(model, "mm", encoder)
    return model


def test_fresh_multimodal_adapter_is_exact(tiny_base: Path, encoder: ImageEncoder) -> None:
    model = _mm_model(tiny_base, encoder)
    ids = torch.randint(3, 200, (2, 9))
    feats = encoder.encode([random_image(0), random_image(1)])
    with torch.no_grad():
        base = model(ids)
        assert torch.equal(model(ids, adapter="mm", image_features=feats), base)
        assert torch.equal(model(ids, adapter="mm"), base)


def test_image_token_changes_outputs_once_gates_open(tiny_base: Path, encoder: ImageEncoder) -> None:
    model = _mm_model(tiny_base, encoder)
    with torch.no_grad():
        model.adapters["mm"].gates.fill_(0.5)
    ids = torch.randint(3, 200, (3, 9))
    feats = encoder.encode([random_image(0), random_image(1), random_image(2)])
    feats[2] = 0  # third row: no image
    with torch.no_grad():
        text_only = model(ids, adapter="mm")
        with_img = model(ids, adapter="mm", image_features=feats)
        base = model(ids)
    assert not torch.allclose(with_img[0], text_only[0]) and not torch.allclose(with_img[1], text_only[1])
    assert not torch.allclose(with_img[0], with_img[1], atol=1e-4)  # different images, different outputs
    assert torch.allclose(with_img[2], text_only[2], atol=1e-6)  # all-zero row = plain prompts
    assert not torch.allclose(text_only, base)


def test_gradients_reach_projection(tiny_base: Path, encoder: ImageEncoder) -> None:
    model = _mm_model(tiny_base, encoder)
    with torch.no_grad():
        model.adapters["mm"].gates.fill_(0.3)
    feats = encoder.encode([random_image(0)])
    model(torch.randint(3, 200, (1, 6)), adapter="mm", image_features=feats).sum().backward()
    proj = model.adapters["mm"].visual_proj
    assert proj is not None and proj.fc1.weight.grad is not None and proj.fc1.weight.grad.abs().sum() > 0
    assert set(map(id, model.trainable_parameters("mm"))) >= set(map(id, proj.parameters()))


def test_save_load_round_trip(tiny_base: Path, encoder: ImageEncoder, tmp_path: Path) -> None:
    model = _mm_model(tiny_base, encoder)
    with torch.no_grad():
        model.adapters["mm"].gates.normal_()
    path = save_adapter(model, "mm", tmp_path / "mm.safetensors")
    meta, tensors = la.read_adapter(path)
    assert json.loads(meta["visual"])["in_features"] == encoder.feature_dim
    assert json.loads(meta["image_encoder_fingerprint"]) == encoder.fingerprint()
    assert meta["image_encoder"] == str(encoder.path)
    assert any(k.startswith("visual_proj.") for k in tensors)
    other = la.load_model(tiny_base, dtype=torch.float32)
    a = other.load_adapter(path, "mm")
    assert a.visual_proj is not None and a.meta["image_encoder"] == str(encoder.path)
    ids = torch.randint(3, 200, (2, 7))
    feats = encoder.encode([random_image(3), random_image(4)])
    with torch.no_grad():
        assert torch.equal(
            other(ids, adapter="mm", image_features=feats), model(ids, adapter="mm", image_features=feats)
        )


# ---- data and the fine-tuning hook ------------------------------------------------------------------------------
def test_llava_to_alpaca() -> None:
    rec = {
        "id": "7",
        "image": "7/image.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?\nA. a\nB. b"},
            {"from": "gpt", "value": "B"},
        ],
    }
    assert llava_to_alpaca(rec) == {
        "instruction": "What is shown?\nA. a\nB. b",
        "input": "",
        "output": "B",
        "image": "7/image.png",
        "id": "7",
    }
    assert "image" not in llava_to_alpaca({"conversations": rec["conversations"]})
    with pytest.raises(ValueError):
        llava_to_alpaca({"instruction": "x"})


def test_prepare_multimodal_features_cache_and_errors(
    tiny_base: Path, clip_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    for i in range(3):
        random_image(i).save(data / "img" / f"{i}.png")
    recs = [{"instruction": f"q{i}", "input": "", "output": "a", "image": f"img/{i}.png"} for i in range(3)]
    recs.append({"instruction": "text only", "input": "", "output": "a"})
    cfg = {"image_encoder": str(clip_dir), "data": [str(data / "train.json")], "feature_cache": str(tmp_path / "c")}
    model = la.load_model(tiny_base, dtype=torch.float32)
    model.add_adapter("a", la.AdapterConfig(prompt_length=2, layers=2))
    out, val = prepare_multimodal(model, "a", [dict(r) for r in recs], [dict(recs[0])], cfg)
    assert len(out) == 4 and val is not None and len(val) == 1
    assert out[0]["image_features"].shape == (152,) and "image_features" not in out[3]
    assert torch.equal(val[0]["image_features"], out[0]["image_features"])
    a = model.adapters["a"]
    assert a.visual_proj is not None and a.meta["image_encoder"] == str(clip_dir)
    assert len(list((tmp_path / "c").glob("*/*.npy"))) == 3

    # second run: everything from the cache, the encoder never runs
    monkeypatch.setattr(ImageEncoder, "encode", lambda *a, **k: pytest.fail("re-encoded a cached image"))
    again, _ = prepare_multimodal(model, "a", [dict(r) for r in recs], None, cfg)
    assert torch.equal(again[1]["image_features"], out[1]["image_features"])
    monkeypatch.undo()

    bad = [dict(r) for r in recs] + [{"instruction": "x", "output": "y", "image": "img/nope.png", "id": "r9"}]
    with pytest.raises(ImageError, match=r"train record 4 \(id r9\).*nope.png: image file not found"):
        prepare_multimodal(model, "a", bad, None, cfg)
    kept, _ = prepare_multimodal(model, "a", bad, None, {**cfg, "skip_invalid": True})
    assert len(kept) == 4

    # an explicit image_root wins over the data folder
    kw = {**cfg, "image_root": str(data / "img"), "data": []}
    rooted, _ = prepare_multimodal(model, "a", [{"instruction": "q", "output": "a", "image": "2.png"}], None, kw)
    assert torch.equal(rooted[0]["image_features"], out[2]["image_features"])


def test_finetune_trains_projection(tiny_base: Path, clip_dir: Path, tmp_path: Path) -> None:
    from llama_adapter.training.config import TrainConfig
    from llama_adapter.training.loop import train

    for i in range(4):
        random_image(i).save(tmp_path / f"{i}.png")
    recs = [
        {
            "instruction": "What colour?",
            "input": "",
            "output": f"The answer is ({'AB'[i % 2]}).",
            "image": str(tmp_path / f"{i}.png"),
        }
        for i in range(4)
    ]
    cfg = TrainConfig(
        base=str(tiny_base),
        out=str(tmp_path / "run"),
        image_encoder=str(clip_dir),
        epochs=1,
        batch_size=2,
        micro_batch=2,
        layers=2,
        prompt_length=2,
        dtype="float32",
        progress=False,
        warmup_epochs=0,
        lr=1e-2,
    )
    model = la.load_model(tiny_base, dtype=torch.float32)
    res = train(cfg, model=model, records=recs)
    meta, tensors = la.read_adapter(res.adapter_path)
    assert "visual" in meta and "image_encoder_fingerprint" in meta
    proj = {k: v for k, v in tensors.items() if k.startswith("visual_proj.")}
    assert proj and res.n_trainable == sum(t.numel() for t in tensors.values())


def test_generate_cli_with_image(
    tiny_base: Path, encoder: ImageEncoder, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`llama-adapter generate --image` finds the encoder through the adapter's metadata."""
    from llama_adapter.cli import main

    model = _mm_model(tiny_base, encoder)
    with torch.no_grad():
        model.adapters["mm"].gates.fill_(0.5)
    adapter = save_adapter(model, "mm", tmp_path / "mm.safetensors")
    random_image(1).save(tmp_path / "x.png")
    args = [
        "generate",
        "--base",
        str(tiny_base),
        "--adapter",
        str(adapter),
        "--dtype",
        "float32",
        "--temperature",
        "0",
        "--max-new-tokens",
        "3",
        "--no-stream",
        "What is shown?",
    ]
    assert main([*args, "--image", str(tmp_path / "x.png")]) == 0
    assert main([*args, "--image", str(tmp_path / "nope.png")]) == 2
    assert "nope.png: image file not found" in capsys.readouterr().err


def test_chat_cli_conditions_every_turn_on_its_image(
    tiny_base: Path,
    encoder: ImageEncoder,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """`llama-adapter chat --image`: every answer is the Python API's for the same conversation and that image's
    features; `/image FILE` changes the image and starts the conversation again, `/image none` drops it; a missing
    file, or an image for the base alone, is told in one line and the chat goes on."""
    from llama_adapter.cli import main
    from llama_adapter.inference.chat import prepare_chat
    from llama_adapter.inference.generate import generate
    from llama_adapter.multimodal.modalities import AdapterEncoders

    model = _mm_model(tiny_base, encoder)
    with torch.no_grad():
        model.adapters["mm"].gates.fill_(0.5)
    adapter = save_adapter(model, "mm", tmp_path / "mm.safetensors")
    x, y = tmp_path / "x.png", tmp_path / "y.png"
    random_image(1).save(x)
    random_image(2).save(y)
    encoders = AdapterEncoders()

    def answer(turns: list[tuple[str, str]], image: Path | None) -> str:
        prompt, ids = prepare_chat(model, turns, "mm")
        feats = None if image is None else encoders.features(model.adapters["mm"], {"image": str(image)})
        kw = {"temperature": 0.0, "max_new_tokens": 4, "strip_separator": prompt.strip_separator}
        return generate(model, [ids], adapter="mm", image_features=feats, **kw)[0]

    q = "What is shown?"
    a1, a2 = answer([("user", q)], x), answer([("user", q)], y)
    a3 = answer([("user", q), ("assistant", a2.strip()), ("user", "And now?")], y)
    a4 = answer([("user", q)], None)
    assert len({a1, a2, a4}) == 3  # the image decides the answer here, so a dropped or stale one would show
    lines = iter([q, "/image nope.png", "/image " + str(y), q, "And now?", "/image none", q, "/adapter none",
                  "/image " + str(y), "hi", "/quit"])  # fmt: skip
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    args = ["chat", "--base", str(tiny_base), "--adapter", f"mm={adapter}", "--dtype", "float32"]
    assert main([*args, "--temperature", "0", "--max-new-tokens", "4", "--image", str(x)]) == 0
    out = capsys.readouterr()
    assert out.out == "".join(a + "\n" for a in (a1, a2, a3, a4))
    assert "nope.png: image file not found" in out.err
    assert f"(image: {y}; conversation cleared)" in out.err and "(image: none; conversation cleared)" in out.err
    assert "the base alone takes no image" in out.err

    assert main(["chat", "--base", str(tiny_base), "--dtype", "float32", "--image", str(x)]) == 2
    assert "--image needs a multi-modal adapter" in capsys.readouterr().err
    assert main([*args, "--image", str(tmp_path / "gone.png")]) == 2  # before the first question
    assert "gone.png: image file not found" in capsys.readouterr().err


def test_server_chat_with_image_content_part(tiny_base: Path, encoder: ImageEncoder, clip_dir: Path) -> None:
    """OpenAI chat message with an image_url data-URL part: same answer as `generate` with those features."""
    import base64
    import io

    import openai
    from test_server import _Running

    from llama_adapter.inference.generate import generate
    from llama_adapter.serving.app import create_app
    from llama_adapter.templates import format_prompt

    model = _mm_model(tiny_base, encoder)
    with torch.no_grad():
        model.adapters["mm"].gates.fill_(1.0)
        for p in model.adapters["mm"].visual_proj.parameters():  # a strong image token: answers must differ
            p.normal_(0, 1.0)
    model.adapters["mm"].meta.update(template="alpaca", image_encoder=str(clip_dir))
    buf = io.BytesIO()
    random_image(3).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    feats = encoder.encode([random_image(3)])
    prompt = format_prompt("alpaca", "What is shown?")
    kw = dict(adapter="mm", max_new_tokens=6, temperature=0.0, strip_separator=True)  # chat: no space after the marker
    with_image = generate(model, [prompt], image_features=feats, **kw)
    without = generate(model, [prompt], **kw)
    assert with_image != without  # the image must matter, or the check below proves nothing
    server = _Running(create_app(model, max_batch_size=2, max_context=128))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
        parts = [{"type": "text", "text": "What is shown?"}, {"type": "image_url", "image_url": {"url": url}}]
        r = client.chat.completions.create(
            model="mm", max_tokens=6, temperature=0, messages=[{"role": "user", "content": parts}]
        )
        assert r.choices[0].message.content == with_image[0]
        r2 = client.chat.completions.create(
            model="mm", max_tokens=6, temperature=0, messages=[{"role": "user", "content": "What is shown?"}]
        )
        assert r2.choices[0].message.content == without[0]
    finally:
        server.stop()
