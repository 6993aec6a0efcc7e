"""Audio and video conditions (issue #17): the same encoder interface, projection, caching and errors as images.

Tiny random Whisper / CLAP checkpoints (saved with their feature extractors), WAV files written with soundfile and
small videos written with PyAV; our features must equal what transformers' own extractors and models give.
"""

import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import llama_adapter as la
from llama_adapter.adapter_file import read_adapter, save_adapter
from llama_adapter.errors import AudioError, UserError, VideoError
from llama_adapter.multimodal.audio import AudioEncoder, load_audio, resample
from llama_adapter.multimodal.encoder import ImageEncoder
from llama_adapter.multimodal.features import attach_projection, compute_features, prepare_multimodal
from llama_adapter.multimodal.modalities import AdapterEncoders, condition_vector
from llama_adapter.multimodal.video import VideoEncoder, frame_indices, load_video
from llama_adapter.zero_init_attention import ConditionProjection, VisualProjection

sf = pytest.importorskip("soundfile")  # the `media` extra (in `test`): genuinely optional for the library
av = pytest.importorskip("av")

from test_multimodal import make_clip  # noqa: E402

RATE = 16000


def make_whisper(path: Path, seed: int = 0) -> Path:
    """A tiny random Whisper (16 mel bins, a 1 s window) with its feature extractor."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    torch.manual_seed(seed)
    cfg = WhisperConfig(
        num_mel_bins=16,
        d_model=32,
        encoder_layers=2,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=50,
        max_target_positions=16,
        vocab_size=100,
        pad_token_id=1,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    WhisperModel(cfg).eval().save_pretrained(path)
    WhisperFeatureExtractor(
        feature_size=16, sampling_rate=RATE, hop_length=160, chunk_length=1, n_fft=400
    ).save_pretrained(path)
    return path


def make_clap(path: Path, seed: int = 0) -> Path:
    """A tiny random CLAP (2 Swin stages, 16 mel bins, a 1 s window) with its feature extractor."""
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel

    torch.manual_seed(seed)
    audio = dict(
        spec_size=64,
        num_mel_bins=16,
        window_size=4,
        patch_size=4,
        patch_stride=[4, 4],
        hidden_size=32,
        patch_embeds_hidden_size=16,
        depths=[1, 1],
        num_attention_heads=[2, 2],
        projection_dim=8,
        enable_fusion=False,
    )
    text = dict(
        vocab_size=100,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=40,
        projection_dim=8,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    ClapModel(ClapConfig(text_config=text, audio_config=audio, projection_dim=8)).eval().save_pretrained(path)
    ClapFeatureExtractor(
        feature_size=16,
        sampling_rate=RATE,
        hop_length=160,
        max_length_s=1,
        fft_window_size=400,
        truncation="rand_trunc",
    ).save_pretrained(path)
    return path


def tone(freq: float, seconds: float = 0.5, rate: int = RATE, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_wav(path: Path, samples: np.ndarray, rate: int = RATE) -> Path:
    sf.write(str(path), samples, rate)
    return path


def write_video(path: Path, colours: list[tuple[int, int, int]], size: int = 32) -> Path:
    """One solid-colour frame per entry (MPEG-4 part 2: in every PyAV build)."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for c in colours:
            img = np.zeros((size, size, 3), np.uint8) + np.array(c, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_whisper(tmp_path_factory.mktemp("whisper"))


@pytest.fixture(scope="module")
def clap_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_clap(tmp_path_factory.mktemp("clap"))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_clip(tmp_path_factory.mktemp("clip"))


# ---- audio: reading, resampling, features ---------------------------------------------------------------------
def test_load_audio_from_path_bytes_and_data_url_as_mono(tmp_path: Path) -> None:
    left, right = tone(440), tone(880)
    f = write_wav(tmp_path / "st.wav", np.stack([left, right], axis=1))
    clip = load_audio(f)
    assert clip.rate == RATE and clip.samples.shape == (RATE // 2,)
    np.testing.assert_allclose(clip.samples, (left + right) / 2, atol=1e-4)  # channels averaged (16-bit WAV)
    url = "data:audio/wav;base64," + base64.b64encode(f.read_bytes()).decode()
    assert np.array_equal(load_audio(url).samples, clip.samples)
    assert np.array_equal(load_audio(f.read_bytes()).samples, clip.samples)


def test_load_audio_errors_are_one_line_and_name_the_input(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match=r"nope.wav: audio file not found"):
        load_audio(tmp_path / "nope.wav")
    (tmp_path / "x.wav").write_text("not audio")
    with pytest.raises(AudioError, match=r"x.wav: cannot read audio"):
        load_audio(tmp_path / "x.wav")
    with pytest.raises(AudioError, match="only base64 data URLs"):
        load_audio("data:audio/wav,abc")


def test_resample_keeps_the_pitch() -> None:
    """44.1 kHz -> 16 kHz with soxr: same duration, the 440 Hz peak stays at 440 Hz."""
    x = load_audio(_wav_bytes(tone(440, 1.0, rate=44100), 44100))
    y = resample(x, RATE)
    assert len(y) == RATE
    spectrum = np.abs(np.fft.rfft(y))
    assert abs(np.argmax(spectrum) * RATE / len(y) - 440) <= 1


def _wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV")
    return buf.getvalue()


def test_whisper_features_equal_transformers(whisper_dir: Path) -> None:
    """Multi-scale: each chosen layer's states and the final states, averaged over the clip's own frames (not the
    padding to the window), from WhisperFeatureExtractor + WhisperModel's encoder."""
    from transformers import WhisperFeatureExtractor, WhisperModel

    enc = AudioEncoder.load(whisper_dir)
    assert enc.kind == "whisper" and enc.layers == [1, 2] and enc.groups == [32, 32, 32]
    clips = [tone(440, 0.5), tone(660, 0.3)]
    ours = enc.encode([load_audio(_wav_bytes(c, RATE)) for c in clips])
    fe = WhisperFeatureExtractor.from_pretrained(whisper_dir)
    model = WhisperModel.from_pretrained(whisper_dir).eval()
    for row, c in zip(ours, clips, strict=True):
        x = load_audio(_wav_bytes(c, RATE)).samples  # the same 16-bit rounding as the file
        inp = fe([x], sampling_rate=RATE, return_tensors="pt")
        with torch.no_grad():
            o = model.encoder(inp.input_features, output_hidden_states=True)
        n = len(x) // 160 // 2  # 10 ms frames, encoder stride 2
        want = torch.cat([o.hidden_states[1][0, :n].mean(0), o.hidden_states[2][0, :n].mean(0)])
        want = torch.cat([want, o.last_hidden_state[0, :n].mean(0)])
        torch.testing.assert_close(row, want, rtol=1e-4, atol=1e-5)


def test_clap_features_equal_transformers(clap_dir: Path) -> None:
    """Each Swin stage's spatial mean, then ClapModel.get_audio_features (projected, normalised)."""
    from transformers import ClapFeatureExtractor, ClapModel

    enc = AudioEncoder.load(clap_dir)
    assert enc.kind == "clap" and enc.groups == [32, 32, 8] and enc.feature_dim == 72
    x = tone(523, 0.7)
    ours = enc.encode([load_audio(_wav_bytes(x, RATE))])[0]
    samples = load_audio(_wav_bytes(x, RATE)).samples
    inp = ClapFeatureExtractor.from_pretrained(clap_dir)([samples], sampling_rate=RATE, return_tensors="pt")
    model = ClapModel.from_pretrained(clap_dir).eval()
    with torch.no_grad():
        emb = model.get_audio_features(**inp).pooler_output[0]
        o = model.audio_model(**inp, output_hidden_states=True)
    stages = [o.hidden_states[i][0].mean(dim=(1, 2)) for i in (1, 2)]
    torch.testing.assert_close(ours, torch.cat([*stages, emb]), rtol=1e-4, atol=1e-5)


def test_audio_is_resampled_and_cut_to_the_window(whisper_dir: Path) -> None:
    """A 44.1 kHz clip gives the features of its 16 kHz version; a 3 s clip those of its first second."""
    enc = AudioEncoder.load(whisper_dir)
    slow = load_audio(_wav_bytes(tone(440, 0.5, rate=44100), 44100))
    direct = enc.encode([load_audio(_wav_bytes(resample(slow, RATE), RATE))])
    torch.testing.assert_close(enc.encode([slow]), direct, rtol=1e-3, atol=1e-3)
    long = np.concatenate([tone(440, 1.0), tone(880, 2.0)])
    torch.testing.assert_close(
        enc.encode([load_audio(_wav_bytes(long, RATE))]), enc.encode([load_audio(_wav_bytes(long[:RATE], RATE))])
    )


def test_audio_encoder_refuses_other_checkpoints(tmp_path: Path, clip_dir: Path) -> None:
    with pytest.raises(UserError, match="config.json not found"):
        AudioEncoder.load(tmp_path)
    with pytest.raises(UserError, match="preprocessor_config.json"):
        AudioEncoder.load(_no_preprocessor(clip_dir, tmp_path))
    with pytest.raises(UserError, match="model_type 'clip_vision_model' is not supported"):
        AudioEncoder.load(clip_dir)


def _no_preprocessor(src: Path, tmp_path: Path) -> Path:
    d = tmp_path / "nopre"
    d.mkdir()
    (d / "config.json").write_text((src / "config.json").read_text())
    return d


# ---- video --------------------------------------------------------------------------------------------------
def test_frame_indices_are_uniform() -> None:
    assert frame_indices(16, 4) == [2, 6, 10, 14]
    assert frame_indices(3, 6) == [0, 0, 1, 1, 2, 2]
    assert frame_indices(0, 4) == []


def test_load_video_samples_frames_uniformly(tmp_path: Path) -> None:
    colours = [(i * 20, 255 - i * 20, 128) for i in range(12)]
    f = write_video(tmp_path / "v.mp4", colours)
    frames = load_video(f, 4)
    assert len(frames) == 4 and frames[0].size == (32, 32)
    for im, i in zip(frames, frame_indices(12, 4), strict=True):
        got = np.asarray(im).reshape(-1, 3).mean(0)
        assert np.abs(got - np.array(colours[i])).max() < 12  # lossy codec, solid colours
    url = "data:video/mp4;base64," + base64.b64encode(f.read_bytes()).decode()
    assert [np.asarray(a).tolist() for a in load_video(url, 4)] == [np.asarray(b).tolist() for b in frames]
    with pytest.raises(VideoError, match="nope.mp4: video file not found"):
        load_video(tmp_path / "nope.mp4")
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 100)
    with pytest.raises(VideoError, match="bad.mp4: cannot decode video"):
        load_video(tmp_path / "bad.mp4")


def test_video_features_pool_the_image_features_over_time(tmp_path: Path, clip_dir: Path) -> None:
    img = ImageEncoder.load(clip_dir)
    f = write_video(tmp_path / "v.mp4", [(200, 0, 0)] * 3 + [(0, 0, 200)] * 3)
    frames = load_video(f, 4)
    per_frame = img.encode(frames)
    mean = VideoEncoder(img, frames=4)
    torch.testing.assert_close(mean.encode([mean.load_input(f)])[0], per_frame.mean(0))
    both = VideoEncoder(img, frames=4, pool="mean+max")
    assert both.feature_dim == 2 * img.feature_dim and both.groups == img.groups * 2
    torch.testing.assert_close(both.encode([frames])[0], torch.cat([per_frame.mean(0), per_frame.max(0).values]))
    assert mean.fingerprint()["frames"] == 4 and mean.fingerprint_key() != both.fingerprint_key()


# ---- the projection and adapter files --------------------------------------------------------------------------
def test_condition_projection_sums_one_token_per_present_modality() -> None:
    torch.manual_seed(0)
    parts = {"audio": VisualProjection(6, 8, hidden=4), "image": VisualProjection(4, 8, hidden=4)}
    proj = ConditionProjection(parts)
    assert proj.modalities == ["image", "audio"] and proj.in_features == 10  # canonical order
    img, aud = torch.randn(2, 4), torch.randn(2, 6)
    both = proj(torch.cat([img, aud], -1))
    torch.testing.assert_close(both, parts["image"](img) + parts["audio"](aud))
    only_audio = proj(torch.cat([torch.zeros(2, 4), aud], -1))
    torch.testing.assert_close(only_audio, parts["audio"](aud))  # an absent image adds nothing
    assert torch.equal(proj(torch.zeros(1, 10)), torch.zeros(1, 8))


def test_multi_modal_adapter_file_round_trip(
    tiny_base: Path, tmp_path: Path, clip_dir: Path, whisper_dir: Path
) -> None:
    model = la.load_model(tiny_base, dtype=torch.float32)
    model.add_adapter("av", la.AdapterConfig(prompt_length=2, layers=2))
    encs = {"audio": AudioEncoder.load(whisper_dir), "video": VideoEncoder(ImageEncoder.load(clip_dir), frames=2)}
    attach_projection(model, "av", encs)
    a = model.adapters["av"]
    assert isinstance(a.visual_proj, ConditionProjection) and a.visual_proj.modalities == ["audio", "video"]
    assert json.loads(a.meta["video_encoder_fingerprint"])["frames"] == 2
    path = save_adapter(model, "av", tmp_path / "av.safetensors")
    meta, tensors = read_adapter(path)
    assert json.loads(meta["visual"])["type"] == "multi" and "visual_proj.parts.audio.fc1.weight" in tensors
    model.load_adapter(path, "again")
    x = torch.randn(1, a.visual_proj.in_features)
    torch.testing.assert_close(model.adapters["again"].visual_proj(x), a.visual_proj(x))
    # an image-only adapter is still written as before: a plain VisualProjection ("mlp")
    model.add_adapter("img", la.AdapterConfig(prompt_length=2, layers=2))
    attach_projection(model, "img", {"image": ImageEncoder.load(clip_dir)})
    meta, _ = read_adapter(save_adapter(model, "img", tmp_path / "img.safetensors"))
    assert json.loads(meta["visual"])["type"] == "mlp"


def test_condition_vector_places_blocks_and_refuses_other_modalities(tiny_base: Path, clip_dir: Path) -> None:
    model = la.load_model(tiny_base, dtype=torch.float32)
    model.add_adapter("v", la.AdapterConfig(prompt_length=2, layers=2))
    img = ImageEncoder.load(clip_dir)
    attach_projection(model, "v", {"image": img, "video": VideoEncoder(img, frames=2)})
    a = model.adapters["v"]
    vec = condition_vector(a, {"video": torch.ones(1, img.feature_dim)})
    assert vec.shape == (1, 2 * img.feature_dim)
    assert vec[0, : img.feature_dim].abs().sum() == 0 and vec[0, img.feature_dim :].eq(1).all()
    with pytest.raises(UserError, match="does not take audio clips"):
        condition_vector(a, {"audio": torch.ones(1, 3)})
    with pytest.raises(UserError, match="does not take audio clips"):
        AdapterEncoders().encoder(a, "audio")


def test_an_encoder_other_than_the_recorded_one_is_noted(
    tiny_base: Path, tmp_path: Path, whisper_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    """Same widths, other weights: the features load, with a note that they are not the ones trained on."""
    model = la.load_model(tiny_base, dtype=torch.float32)
    model.add_adapter("au", la.AdapterConfig(prompt_length=2, layers=2))
    attach_projection(model, "au", {"audio": AudioEncoder.load(whisper_dir)})
    a = model.adapters["au"]
    AdapterEncoders().encoder(a, "audio")
    assert "note:" not in capsys.readouterr().err
    other = make_whisper(tmp_path / "other", seed=1)
    encs = AdapterEncoders(dirs={"audio": str(other)})
    assert encs.encoder(a, "audio").path == other
    encs.encoder(a, "audio")
    err = capsys.readouterr().err
    assert err.count("is not the audio encoder the adapter was trained with") == 1  # once, not per request


# ---- training data: features, cache, errors, skip-invalid -----------------------------------------------------
def test_features_for_audio_and_video_records_cached_with_one_line_errors(
    tiny_base: Path, tmp_path: Path, clip_dir: Path, whisper_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    write_wav(data / "a.wav", tone(440))
    write_wav(data / "b.wav", tone(880))
    write_video(data / "v.mp4", [(255, 0, 0), (0, 255, 0)])
    recs = [
        {"instruction": "pitch?", "output": "low", "audio": "a.wav"},
        {"instruction": "pitch?", "output": "high", "audio": "b.wav", "video": "v.mp4"},  # two modalities
        {"instruction": "colour?", "output": "red", "video": "v.mp4"},
        {"instruction": "text only", "output": "ok"},
    ]
    cfg = {
        "image_encoder": str(clip_dir),
        "audio_encoder": str(whisper_dir),
        "video_frames": 2,
        "data": [str(data / "train.json")],
        "feature_cache": str(tmp_path / "cache"),
    }
    model = la.load_model(tiny_base, dtype=torch.float32)
    model.add_adapter("a", la.AdapterConfig(prompt_length=2, layers=2))
    out, _ = prepare_multimodal(model, "a", [dict(r) for r in recs], None, cfg)
    proj = model.adapters["a"].visual_proj
    assert isinstance(proj, ConditionProjection) and proj.modalities == ["audio", "video"]  # no record has an image
    wa, wv = proj.widths
    assert out[0]["image_features"].shape == (wa + wv,) and "image_features" not in out[3]
    assert out[0]["image_features"][wa:].abs().sum() == 0 and out[0]["image_features"][:wa].abs().sum() > 0
    assert out[1]["image_features"][wa:].abs().sum() > 0
    torch.testing.assert_close(out[1]["image_features"][wa:], out[2]["image_features"][wa:])
    assert {p.name for p in (tmp_path / "cache").glob("*/encoder.json")} == {"encoder.json"}
    assert len(list((tmp_path / "cache").glob("*/*.npy"))) == 3  # two clips, one video (cached once)

    monkeypatch.setattr(AudioEncoder, "encode", lambda *a, **k: pytest.fail("re-encoded a cached clip"))
    monkeypatch.setattr(VideoEncoder, "encode", lambda *a, **k: pytest.fail("re-encoded a cached video"))
    again, _ = prepare_multimodal(model, "a", [dict(r) for r in recs], None, cfg)
    torch.testing.assert_close(again[1]["image_features"], out[1]["image_features"])
    monkeypatch.undo()

    (data / "junk.wav").write_text("no")
    bad = [dict(r) for r in recs] + [{"instruction": "x", "output": "y", "audio": "junk.wav", "id": "r7"}]
    with pytest.raises(AudioError, match=r"^train record 4 \(id r7\): .*junk.wav: cannot read audio"):
        prepare_multimodal(model, "a", bad, None, cfg)
    kept, _ = prepare_multimodal(model, "a", bad, None, {**cfg, "skip_invalid": True})
    assert len(kept) == 4
    with pytest.raises(UserError, match=r"record 0 has 'audio' but no encoder for audio clips"):
        compute_features({"image": ImageEncoder.load(clip_dir)}, [dict(recs[0])], data_dir=data)


def test_chat_records_take_openai_input_audio_parts(tmp_path: Path) -> None:
    from llama_adapter.training.data import load_records

    wav = base64.b64encode(_wav_bytes(tone(440), RATE)).decode()
    rec = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "pitch?"},
                    {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}},
                ],
            },
            {"role": "assistant", "content": "low"},
        ]
    }
    (tmp_path / "d.jsonl").write_text(json.dumps(rec) + "\n")
    (r,) = load_records(tmp_path / "d.jsonl")
    assert r["audio"] == "data:audio/wav;base64," + wav and r["messages"][0]["content"] == "pitch?"
    assert load_audio(r["audio"]).rate == RATE


# ---- the commands: finetune, generate, serve ------------------------------------------------------------------
def test_finetune_and_generate_with_audio_and_video(
    tiny_base: Path, tmp_path: Path, clip_dir: Path, clap_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    from llama_adapter.cli import main

    write_wav(tmp_path / "lo.wav", tone(220))
    write_wav(tmp_path / "hi.wav", tone(1760))
    write_video(tmp_path / "v.mp4", [(255, 0, 0), (0, 0, 255)] * 2)
    recs = [
        {"instruction": "Is the tone high?", "output": "no", "audio": "lo.wav"},
        {"instruction": "Is the tone high?", "output": "yes", "audio": "hi.wav", "video": "v.mp4"},
    ]
    (tmp_path / "train.json").write_text(json.dumps(recs))
    run = tmp_path / "run"
    args = ["finetune", "--base", str(tiny_base), "--data", str(tmp_path / "train.json"), "--out", str(run)]
    args += ["--audio-encoder", str(clap_dir), "--image-encoder", str(clip_dir), "--video-frames", "2"]
    args += ["--video-pool", "mean+max", "--epochs", "1", "--batch-size", "2", "--micro-batch", "2"]
    args += ["--layers", "2", "--prompt-length", "2", "--dtype", "float32", "--no-progress", "--warmup-epochs", "0"]
    assert main(args) == 0
    meta, tensors = read_adapter(run / "adapter.safetensors")
    assert json.loads(meta["audio_encoder_fingerprint"])["kind"] == "clap"
    assert json.loads(meta["video_encoder_fingerprint"])["pool"] == "mean+max"
    assert any(k.startswith("visual_proj.parts.video.") for k in tensors)
    capsys.readouterr()

    gen = ["generate", "--base", str(tiny_base), "--adapter", str(run / "adapter.safetensors"), "--dtype", "float32"]
    gen += ["--temperature", "0", "--max-new-tokens", "2", "--no-stream", "Is the tone high?"]
    assert main([*gen, "--audio", str(tmp_path / "hi.wav"), "--video", str(tmp_path / "v.mp4")]) == 0
    assert main([*gen, "--audio", str(tmp_path / "missing.wav")]) == 2
    err = capsys.readouterr().err
    assert "missing.wav: audio file not found" in err and len(err.strip().splitlines()) == 1
    assert main([*gen, "--image", str(tmp_path / "x.png")]) == 2
    assert "does not take images" in capsys.readouterr().err


def _strong_adapter(model: la.Transformer, name: str, modality: str, enc: Any) -> Any:
    """A multi-modal adapter `name` on `enc` (alpaca template) whose condition token is strong: open gates and a
    random projection, so that answers with and without the input differ and a server that dropped it would show."""
    model.add_adapter(name, la.AdapterConfig(prompt_length=2, layers=2))
    attach_projection(model, name, {modality: enc})
    a = model.adapters[name]
    with torch.no_grad():
        a.gates.fill_(1.0)
        for p in a.visual_proj.parameters():
            p.normal_(0, 1.0)
    a.meta["template"] = "alpaca"
    return a


def test_server_chat_with_input_audio_part(tiny_base: Path, whisper_dir: Path) -> None:
    """OpenAI `input_audio` content part: the same answer as `generate` with that clip's features."""
    import openai
    from test_server import _Running

    from llama_adapter.inference.generate import generate
    from llama_adapter.serving.app import create_app
    from llama_adapter.templates import format_prompt

    model = la.load_model(tiny_base, dtype=torch.float32)
    enc = AudioEncoder.load(whisper_dir)
    a = _strong_adapter(model, "au", "audio", enc)
    wav = _wav_bytes(tone(440), RATE)
    feats = condition_vector(a, {"audio": enc.encode([load_audio(wav)])})
    prompt = format_prompt("alpaca", "What pitch?")
    kw = dict(adapter="au", max_new_tokens=6, temperature=0.0, strip_separator=True)
    with_audio = generate(model, [prompt], image_features=feats, **kw)
    assert with_audio != generate(model, [prompt], **kw)  # the clip must matter, or the check proves nothing
    server = _Running(create_app(model, max_batch_size=2, max_context=128))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
        part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}
        msgs = [{"role": "user", "content": [{"type": "text", "text": "What pitch?"}, part]}]
        r = client.chat.completions.create(model="au", max_tokens=6, temperature=0, messages=msgs)
        assert r.choices[0].message.content == with_audio[0]
        junk = {"type": "input_audio", "input_audio": {"data": base64.b64encode(b"hello").decode(), "format": "wav"}}
        with pytest.raises(openai.BadRequestError, match="not base64 audio"):
            client.chat.completions.create(model="au", max_tokens=2, messages=[{"role": "user", "content": [junk]}])
        with pytest.raises(openai.BadRequestError, match="this model does not take audio"):
            client.chat.completions.create(model="base", max_tokens=2, messages=msgs)
    finally:
        server.stop()


def test_server_chat_with_video_url_part(tiny_base: Path, clip_dir: Path, tmp_path: Path) -> None:
    """A `video_url` content part (vLLM's extension): the same answer as `generate` with that video's features; a
    part that is not a video, a video for a model that takes none, and frames over the server's pixel limit are
    400s."""
    import openai
    from test_server import _Running

    from llama_adapter.inference.generate import generate
    from llama_adapter.serving.app import create_app
    from llama_adapter.templates import format_prompt

    model = la.load_model(tiny_base, dtype=torch.float32)
    enc = VideoEncoder(ImageEncoder.load(clip_dir), frames=2)
    a = _strong_adapter(model, "vi", "video", enc)
    clip = write_video(tmp_path / "v.mp4", [(255, 0, 0), (0, 0, 255)] * 2).read_bytes()
    feats = condition_vector(a, {"video": enc.encode([load_video(clip, 2)])})
    prompt = format_prompt("alpaca", "What colour?")
    kw = dict(adapter="vi", max_new_tokens=6, temperature=0.0, strip_separator=True)
    with_video = generate(model, [prompt], image_features=feats, **kw)
    assert with_video != generate(model, [prompt], **kw)  # the video must matter, or the check proves nothing
    url = "data:video/mp4;base64," + base64.b64encode(clip).decode()
    server = _Running(create_app(model, max_batch_size=2, max_context=128, max_image_pixels=32 * 32))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
        part = {"type": "video_url", "video_url": {"url": url}}
        msgs = [{"role": "user", "content": [{"type": "text", "text": "What colour?"}, part]}]
        r = client.chat.completions.create(model="vi", max_tokens=6, temperature=0, messages=msgs)
        assert r.choices[0].message.content == with_video[0]
        junk = {"type": "video_url", "video_url": "data:video/mp4;base64," + base64.b64encode(b"hello").decode()}
        with pytest.raises(openai.BadRequestError, match="video_url is not a video"):
            client.chat.completions.create(model="vi", max_tokens=2, messages=[{"role": "user", "content": [junk]}])
        with pytest.raises(openai.BadRequestError, match="at most one video"):
            client.chat.completions.create(
                model="vi", max_tokens=2, messages=[{"role": "user", "content": [part, part]}]
            )
        with pytest.raises(openai.BadRequestError, match="this model does not take video"):
            client.chat.completions.create(model="base", max_tokens=2, messages=msgs)
        big = write_video(tmp_path / "big.mp4", [(0, 255, 0)] * 2, size=48).read_bytes()  # over 32 x 32
        part = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(big).decode()}}
        with pytest.raises(openai.BadRequestError, match="frames of 48 x 48 pixels are over"):
            client.chat.completions.create(model="vi", max_tokens=2, messages=[{"role": "user", "content": [part]}])
    finally:
        server.stop()
