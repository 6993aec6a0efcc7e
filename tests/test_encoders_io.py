"""Encoder tasks end to end: SQuAD scoring, data files and their errors, adapter files, the `encoder` command.

The SQuAD examples are checked by hand against the task's definition (normalisation, bag-of-tokens F1, v2.0
no-answer); the command runs on tiny random checkpoints written here (a ViT, a RoBERTa with a word-level
tokenizer, a CLIP), so a whole finetune -> eval round trip takes a second or two.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from transformers import CLIPConfig, CLIPModel, RobertaConfig, RobertaModel, ViTConfig, ViTModel  # noqa: E402

from llama_adapter.cli import main  # noqa: E402
from llama_adapter.encoders import data as D  # noqa: E402
from llama_adapter.encoders.adapter_io import load_encoder_adapter, save_encoder_adapter  # noqa: E402
from llama_adapter.encoders.heads import TaskModel  # noqa: E402
from llama_adapter.encoders.miniature import SPECIALS, draw  # noqa: E402
from llama_adapter.encoders.prompts import PromptConfig  # noqa: E402
from llama_adapter.encoders.squad_metric import exact_match, f1, normalize_answer, score  # noqa: E402
from llama_adapter.errors import AdapterError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- SQuAD metric, hand-checked ---------------------------------------------------------------------------
def test_normalisation_is_the_official_one() -> None:
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"  # punctuation removed, not split on
    assert normalize_answer("an apple and A pear") == "apple and pear"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words
    assert normalize_answer("  ") == ""


def test_exact_match_and_f1_by_hand() -> None:
    assert exact_match("the Cat.", "cat") == 1.0
    assert exact_match("cat sat", "cat") == 0.0
    # pred {cat, sat} vs gold {cat, sat, down}: P = 2/2, R = 2/3, F1 = 2 * 1 * (2/3) / (5/3) = 0.8
    assert f1("The cat sat", "cat sat down") == pytest.approx(0.8)
    # bags, not sets: pred {a? no: "b b c"} = [b, b, c], gold [b, c, c]: common = min(2,1) + min(1,2) = 2
    assert f1("b b c", "b c c") == pytest.approx(2 / 3)
    assert f1("dog", "cat") == 0.0


def test_v2_no_answer_handling() -> None:
    answers = {"q1": ["Paris", "paris city"], "q2": [], "q3": [], "q4": ["Rome"]}
    preds = {"q1": "Paris city", "q2": "", "q3": "Lyon", "q4": ""}
    s = score(preds, answers)
    # q1: EM 1 (matches the 2nd gold), F1 1; q2: no answer predicted for no answer: 1/1; q3: 0/0; q4: 0/0
    assert s["exact"] == pytest.approx(50.0) and s["f1"] == pytest.approx(50.0)
    assert s["HasAns_exact"] == pytest.approx(50.0) and s["NoAns_exact"] == pytest.approx(50.0)
    assert score({}, {"q": ["x"]})["exact"] == 0.0  # a missing prediction scores 0
    # a gold answer that normalises to nothing counts as no answer
    assert score({"q": ""}, {"q": ["the"]})["exact"] == 100.0


# ---- data files and their one-line errors -------------------------------------------------------------------
def _images(root: Path, classes: dict[str, list[tuple[str, str]]], n: int = 4, size: int = 16) -> Path:
    import random

    rng = random.Random(0)
    for label, items in classes.items():
        d = root / label
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            draw(items, rng, size=size).save(d / f"{i}.png")
    return root


def test_image_folder_and_jsonl(tmp_path: Path) -> None:
    root = _images(tmp_path / "imgs", {"one": [("circle", "red")], "two": [("square", "blue")] * 2}, n=2)
    recs = D.load_image_records(root)
    assert [r.label for r in recs] == ["one", "one", "two", "two"]
    jl = tmp_path / "d.jsonl"
    jl.write_text(json.dumps({"image": "imgs/one/0.png", "label": 3}) + "\n\n")
    assert D.load_image_records(jl)[0].label == "3"
    jl.write_text(
        json.dumps({"image": "imgs/one/0.png", "label": 1}) + "\n" + json.dumps({"image": "nope.png", "label": 1})
    )
    with pytest.raises(D.EncoderDataError, match=r"d\.jsonl:2: image .*nope\.png not found"):
        D.load_image_records(jl)


def test_text_records_and_errors(tmp_path: Path) -> None:
    csv = tmp_path / "t.csv"
    csv.write_text('text,label\n"hello, world",pos\nbad day,neg\n')
    assert [(r.text, r.label) for r in D.load_text_records(csv)] == [("hello, world", "pos"), ("bad day", "neg")]
    csv.write_text("sentence,label\nx,y\n")
    with pytest.raises(D.EncoderDataError, match="header with 'text' and 'label'"):
        D.load_text_records(csv)
    jl = tmp_path / "t.jsonl"
    jl.write_text('{"text": "ok", "label": "a"}\n{"text": "", "label": "b"}\n')
    with pytest.raises(D.EncoderDataError, match=r"t\.jsonl:2: 'text' must be a non-empty string"):
        D.load_text_records(jl)
    jl.write_text('{"text": "ok", "label": [1]}\n')
    with pytest.raises(D.EncoderDataError, match=r"t\.jsonl:1: 'label'"):
        D.load_text_records(jl)


def squad(contexts: list[tuple[str, str, str | None]]) -> dict:
    paras = []
    for i, (ctx, q, ans) in enumerate(contexts):
        answers = [] if ans is None else [{"text": ans, "answer_start": ctx.index(ans)}]
        paras.append(
            {"context": ctx, "qas": [{"id": f"q{i}", "question": q, "answers": answers, "is_impossible": ans is None}]}
        )
    return {"version": "v2.0", "data": [{"title": "t", "paragraphs": paras}]}


def test_squad_reader_checks_answer_offsets(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    doc = squad([("Tosk is the capital of Varnel.", "What is the capital of Varnel?", "Tosk"), ("x y", "q?", None)])
    path.write_text(json.dumps(doc))
    recs = D.load_squad(path)
    assert recs[0].answers == ["Tosk"] and recs[0].starts == [0] and recs[1].answers == []
    doc["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] = 3
    path.write_text(json.dumps(doc))
    with pytest.raises(D.EncoderDataError, match="question 'q0': answer 'Tosk' is not at answer_start 3"):
        D.load_squad(path)


# ---- tiny checkpoints ---------------------------------------------------------------------------------------
WORDS = "the capital of is what which city a photo red blue circle square ? . , tosk varnel brel kamo drin".split()


def _tokenizer(out: Path) -> int:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(dict.fromkeys(SPECIALS + WORDS + [w.capitalize() for w in WORDS]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    return len(vocab)


def _preproc(out: Path) -> None:
    cfg = {
        "size": {"height": 16, "width": 16},
        "do_center_crop": False,
        "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("enc")
    torch.manual_seed(0)
    tower = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    vit = root / "vit"
    ViTModel(ViTConfig(**tower, image_size=16, patch_size=4)).save_pretrained(str(vit))
    _preproc(vit)
    rob = root / "roberta"
    n = _tokenizer(rob)
    RobertaModel(RobertaConfig(**tower, vocab_size=n, max_position_embeddings=70, pad_token_id=0)).save_pretrained(
        str(rob)
    )
    clip = root / "clip"
    n = _tokenizer(clip)
    CLIPModel(
        CLIPConfig(
            text_config=dict(
                tower, vocab_size=n, max_position_embeddings=16, pad_token_id=0, bos_token_id=2, eos_token_id=3
            ),
            vision_config=dict(tower, image_size=16, patch_size=4),
            projection_dim=16,
        )
    ).save_pretrained(str(clip))
    _preproc(clip)
    return {"vit": vit, "roberta": rob, "clip": clip}


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# ---- the command ----------------------------------------------------------------------------------------------
def test_image_classification_finetune_then_eval(
    ckpts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _images(tmp_path / "train", {"red": [("circle", "red")], "blue": [("circle", "blue")]})
    out = tmp_path / "run"
    common = ["--model", str(ckpts["vit"]), "--task", "image-classification", "--data", str(data), "--out", str(out)]
    rc, stdout, err = _run(
        capsys,
        "encoder",
        "finetune",
        *common,
        "--epochs",
        "3",
        "--batch-size",
        "4",
        "--eval-data",
        str(data),
        "--no-progress",
    )
    assert rc == 0, err
    result = json.loads(stdout)
    assert result["trainable_params"] == 2 * (8 * 32 + 4) + 2 * 32 + 2  # 2 layers x (8 prompts + 4 gates); head
    assert {p.name for p in out.iterdir()} >= {"adapter.safetensors", "metrics.jsonl", "loss.png", "config.json"}
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == [1, 2, 3, 4, 5, 6]
    assert "accuracy" in lines[-1]
    rc, stdout, err = _run(
        capsys,
        "encoder",
        "eval",
        "--model",
        str(ckpts["vit"]),
        "--adapter",
        str(out / "adapter.safetensors"),
        "--data",
        str(data),
    )
    assert rc == 0, err
    assert json.loads(stdout)["accuracy"] == pytest.approx(result["eval"]["accuracy"])
    # an existing run is not overwritten silently; bad data is one line naming the record
    rc, _, err = _run(capsys, "encoder", "finetune", *common)
    assert rc == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "x.png"}\n')
    rc, _, err = _run(capsys, "encoder", "finetune", *common[:-4], "--data", str(bad), "--out", str(tmp_path / "r2"))
    assert rc == 2 and err.count("\n") == 1 and "bad.jsonl:1" in err


def test_question_answering_round_trip_scores_like_the_metric(
    ckpts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "qa.json"
    path.write_text(
        json.dumps(
            squad(
                [
                    (
                        "Tosk is the capital of Varnel . Kamo is the capital of Brel .",
                        "What is the capital of Brel ?",
                        "Kamo",
                    ),
                    ("Tosk is the capital of Varnel .", "What is the capital of Drin ?", None),
                ]
            )
        )
    )
    out = tmp_path / "qa"
    rc, stdout, err = _run(
        capsys, "encoder", "finetune", "--model", str(ckpts["roberta"]), "--task", "question-answering",
        "--method", "rand-init", "--data", str(path), "--eval-data", str(path), "--out", str(out),
        "--epochs", "2", "--batch-size", "2", "--no-progress",
    )  # fmt: skip
    assert rc == 0, err
    ev = json.loads(stdout)["eval"]
    assert set(ev) >= {"exact", "f1", "HasAns_exact", "NoAns_exact"}
    assert 0.0 <= ev["exact"] <= ev["f1"] <= 100.0
    rc, stdout, _ = _run(
        capsys,
        "encoder",
        "eval",
        "--model",
        str(ckpts["roberta"]),
        "--adapter",
        str(out / "adapter.safetensors"),
        "--data",
        str(path),
    )
    assert json.loads(stdout)["exact"] == pytest.approx(ev["exact"])


def test_text_classification_csv(ckpts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = tmp_path / "t.csv"
    csv.write_text("text,label\nred circle,a\nblue square,b\nred square,a\nblue circle,b\n")
    rc, stdout, err = _run(
        capsys, "encoder", "finetune", "--model", str(ckpts["roberta"]), "--task", "text-classification",
        "--method", "linear-probe", "--data", str(csv), "--eval-data", str(csv), "--out", str(tmp_path / "tc"),
        "--epochs", "2", "--no-progress",
    )  # fmt: skip
    assert rc == 0, err
    assert json.loads(stdout)["trainable_params"] == 32 * 2 + 2


def test_clip_base_to_novel(ckpts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No head: classes never trained are scored by their names' text embeddings (novel accuracy, HM)."""
    train = _images(tmp_path / "train", {"red circle": [("circle", "red")], "blue square": [("square", "blue")]}, n=2)
    test = _images(
        tmp_path / "test",
        {c: [(c.split()[1], c.split()[0])] for c in ("red circle", "blue square", "blue circle", "red square")},
        n=2,
    )
    rc, stdout, err = _run(
        capsys, "encoder", "finetune", "--model", str(ckpts["clip"]), "--task", "clip", "--data", str(train),
        "--eval-data", str(test), "--out", str(tmp_path / "clip"), "--epochs", "1", "--no-progress",
        "--class-template", "a photo of a {} .",
    )  # fmt: skip
    assert rc == 0, err
    ev = json.loads(stdout)["eval"]
    assert set(ev) == {"base_accuracy", "novel_accuracy", "hm"}
    a, b = ev["base_accuracy"], ev["novel_accuracy"]
    assert ev["hm"] == pytest.approx(2 * a * b / (a + b) if a + b else 0.0)


def test_wrong_model_for_task_is_one_line(
    ckpts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _images(tmp_path / "d", {"a": [("circle", "red")], "b": [("circle", "blue")]}, n=1)
    rc, _, err = _run(
        capsys,
        "encoder",
        "finetune",
        "--model",
        str(ckpts["roberta"]),
        "--task",
        "image-classification",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "o"),
    )
    assert rc == 2 and "cannot do --task image-classification" in err


def test_help_explains_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from llama_adapter.encoders.train import EncoderTrainConfig

    with pytest.raises(SystemExit):
        main(["encoder", "finetune", "--help"])
    text = capsys.readouterr().out
    for name in EncoderTrainConfig.field_names():
        assert "--" + name.replace("_", "-") in text
    assert "zero-init" in text and "ImageFolder" in text


# ---- adapter files ------------------------------------------------------------------------------------------
def test_adapter_round_trip_and_validation(ckpts: dict[str, Path], tmp_path: Path) -> None:
    from llama_adapter.encoders.train import load_encoder

    enc = load_encoder(ckpts["vit"])
    task = TaskModel(enc, "image-classification", "zero-init", 3, PromptConfig(4, 2))
    with torch.no_grad():
        task.prompts["encoder"].gates.fill_(0.3)  # type: ignore[union-attr]
    x = torch.randn(2, 3, 16, 16)
    want = task(pixel_values=x)
    path = save_encoder_adapter(task, tmp_path / "a.safetensors", ["x", "y", "z"])
    loaded, meta = load_encoder_adapter(load_encoder(ckpts["vit"]), path)
    assert meta["labels"] == ["x", "y", "z"] and meta["method"] == "zero-init"
    assert torch.equal(loaded(pixel_values=x), want)
    # another encoder shape: refused, and the encoder is left without hooks
    other = ViTModel(
        ViTConfig(
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=64,
            image_size=16,
            patch_size=4,
        )
    )
    with pytest.raises(AdapterError, match="another encoder .*num_hidden_layers"):
        load_encoder_adapter(other, path)
    # a file of another format, and a LLaMA adapter file, are refused by name
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(AdapterError, match="junk.safetensors: not a safetensors file"):
        load_encoder_adapter(enc, tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"prompts": torch.zeros(1)}, str(tmp_path / "llama.safetensors"), metadata={"format": "llama-adapter"})
    with pytest.raises(AdapterError, match="not an encoder adapter"):
        load_encoder_adapter(enc, tmp_path / "llama.safetensors")


# ---- the miniature recipes ----------------------------------------------------------------------------------
def test_miniature_sets_are_valid_task_data(tmp_path: Path) -> None:
    """The generated sets pass the readers' checks (SQuAD answer offsets, ImageFolder classes), v2.0 included."""
    from llama_adapter.encoders import miniature

    qa = miniature.fact_qa_data(tmp_path / "qa", n_train=30, n_test=3)
    recs = D.load_squad(qa / "train.json")
    assert len(recs) == 30 and any(not r.answers for r in recs) and any(r.answers for r in recs)
    bn = miniature.base_novel_data(tmp_path / "bn", shots=1, n_test=1)
    assert {r.label for r in D.load_image_records(bn / "train")} == {f"{c} {s}" for c, s in miniature.CLIP_BASE}
    assert len({r.label for r in D.load_image_records(bn / "test")}) == 16


def test_pretrain_command_writes_a_loadable_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from llama_adapter.encoders.train import load_encoder

    rc, stdout, err = _run(capsys, "encoder", "pretrain", "vit", "--out", str(tmp_path / "vit"), "--steps", "2")
    assert rc == 0, err
    assert json.loads(stdout)["steps"] == 2
    enc = load_encoder(tmp_path / "vit")
    task = TaskModel(enc, "image-classification", "zero-init", 4, PromptConfig(2, 1))
    assert task(pixel_values=torch.zeros(1, 3, 32, 32)).shape == (1, 4)
