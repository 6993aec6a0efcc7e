"""`eval caption`, `eval mme`, `eval open-qa`: each reads its benchmark's official layout (tiny files written here
in that layout), asks the model, scores as the benchmark's own tool does, prints a table and writes predictions."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import llama_adapter as la
from llama_adapter.adapter_file import save_adapter
from llama_adapter.cli import main
from llama_adapter.errors import EvalError
from llama_adapter.eval import caption as cap
from llama_adapter.eval.mme import load_mme, mme_scores, parse_yes_no
from llama_adapter.eval.open_qa import bleu, load_open_qa, open_qa_scores, rouge_l, vqa_accuracy
from llama_adapter.multimodal.encoder import ImageEncoder
from llama_adapter.multimodal.features import attach_projection

pytest.importorskip("pycocoevalcap")  # the `metrics` extra (in `test`)

from test_multimodal import make_clip  # noqa: E402


def _image(path: Path, seed: int) -> Path:
    a = (np.random.RandomState(seed).rand(24, 24, 3) * 255).astype("uint8")
    Image.fromarray(a).save(path)
    return path


# ---- COCO Caption ---------------------------------------------------------------------------------------------
def write_coco(root: Path) -> tuple[Path, Path]:
    """annotations/captions_val2014.json + val2014/ with three images, two captions each."""
    (root / "annotations").mkdir(parents=True)
    (root / "val2014").mkdir()
    caps = {1: ["a dog runs on the grass", "a brown dog running"], 2: ["two cats sleep on a sofa", "cats asleep"]}
    caps[3] = ["a red bus on a street", "a bus drives down the road"]
    images = []
    for i in caps:
        name = f"COCO_val2014_{i:012d}.jpg"
        _image(root / "val2014" / name, i)
        images.append({"id": i, "file_name": name})
    anns = [{"image_id": i, "id": 10 * i + k, "caption": c} for i, cs in caps.items() for k, c in enumerate(cs)]
    f = root / "annotations" / "captions_val2014.json"
    f.write_text(json.dumps({"images": images, "annotations": anns}))
    return f, root / "val2014"


def test_coco_layout_is_read_with_every_reference(tmp_path: Path) -> None:
    ann, imgs = write_coco(tmp_path)
    images = cap.load_coco_captions(ann, imgs)
    assert [im.image_id for im in images] == ["1", "2", "3"] and images[0].path.is_file()
    assert images[1].references == ["two cats sleep on a sofa", "cats asleep"]
    with pytest.raises(EvalError, match="expected COCO caption annotations"):
        (tmp_path / "bad.json").write_text("[]")
        cap.load_coco_captions(tmp_path / "bad.json", imgs)


def test_caption_scores_reward_the_references(monkeypatch: pytest.MonkeyPatch) -> None:
    refs = {"1": ["a dog runs on the grass"], "2": ["two cats sleep on a sofa"], "3": ["a red bus on a street"]}
    exact, notes = cap.score_captions(refs, {k: v[0] for k, v in refs.items()}, meteor=False)
    assert exact["BLEU-1"] == pytest.approx(100.0) and exact["BLEU-4"] == pytest.approx(100.0, abs=1e-3)
    assert exact["ROUGE-L"] == pytest.approx(100.0) and exact["METEOR"] is None
    assert "METEOR not computed (--meteor off)" in notes
    wrong, _ = cap.score_captions(refs, {"1": "a red bus", "2": "a dog", "3": "two cats"}, meteor=False)
    assert wrong["CIDEr"] < exact["CIDEr"] and wrong["BLEU-1"] < exact["BLEU-1"]
    # without Java: no METEOR, tokenised in Python, and both said
    monkeypatch.setattr(cap.shutil, "which", lambda name: None)
    nojava, notes = cap.score_captions(refs, {k: v[0] for k, v in refs.items()})
    assert nojava["METEOR"] is None and nojava["BLEU-1"] == pytest.approx(100.0)
    assert any("Java not found" in n for n in notes) and any("METEOR needs Java" in n for n in notes)
    with pytest.raises(EvalError, match="METEOR needs Java"):
        cap.score_captions(refs, {k: v[0] for k, v in refs.items()}, meteor=True)


def test_simple_tokenize_follows_the_ptb_step() -> None:
    assert cap.simple_tokenize("A dog, running!  On the GRASS.") == "a dog running on the grass"


def test_eval_caption_command(tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ann, imgs = write_coco(tmp_path / "coco")
    out = tmp_path / "pred.jsonl"
    args = ["eval", "caption", "--base", str(tiny_base), "--annotations", str(ann), "--images", str(imgs)]
    args += ["--meteor", "off", "--max-samples", "2", "--max-new-tokens", "4", "--out", str(out), "--quiet"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "BLEU-1" in text and "CIDEr" in text and "ROUGE-L" in text and "METEOR not computed" in text
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["image_id"] for r in rows] == ["1", "2"] and all("caption" in r for r in rows)
    missing = ["eval", "caption", "--base", str(tiny_base), "--annotations", str(tmp_path / "none.json")]
    assert main([*missing, "--images", str(imgs), "--quiet"]) == 2
    assert "annotations file not found" in capsys.readouterr().err


# ---- MME ------------------------------------------------------------------------------------------------------
def write_mme(root: Path) -> Path:
    """existence (side by side), artwork (images/ + questions_answers_YN/), code_reasoning (cognition)."""
    for sub in ("existence", "code_reasoning"):
        (root / sub).mkdir(parents=True)
        for i in range(2):
            _image(root / sub / f"{i}.png", i)
            (root / sub / f"{i}.txt").write_text(f"Is there a cat?\tYes\nIs there a dog in image {i}?\tNo\n")
    (root / "artwork" / "images").mkdir(parents=True)
    (root / "artwork" / "questions_answers_YN").mkdir()
    _image(root / "artwork" / "images" / "10.jpg", 10)
    (root / "artwork" / "questions_answers_YN" / "10.txt").write_text("Is it by Monet?\tNo\nIs it a painting?\tYes\n")
    return root


def test_mme_layout_and_the_tools_scores(tmp_path: Path) -> None:
    qs = load_mme(write_mme(tmp_path))
    assert [q.subtask for q in qs] == ["existence"] * 4 + ["artwork"] * 2 + ["code_reasoning"] * 4
    assert qs[4].image.name == "10.jpg" and qs[4].answer == "no"
    # existence: image 0 both right, image 1 one right -> acc 75, acc+ 50; artwork: all right -> 100 + 100;
    # code_reasoning: "Yes, ..." read as yes, "maybe" as other -> acc 50, acc+ 0
    answers = ["yes", "No.", "yes", "yes", "no", "Yes it is", "Yes, it is.", "no", "maybe", "no"]
    s = mme_scores(qs, answers)
    assert s["subtasks"]["existence"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0, "questions": 4.0}
    assert s["subtasks"]["artwork"]["score"] == 200.0 and s["perception"] == 325.0
    assert s["subtasks"]["code_reasoning"]["acc"] == 75.0 and s["cognition"] == 75.0 + 50.0
    assert [parse_yes_no(a) for a in ("Yes", "no, it is not", "I think so", "nope")] == ["yes", "no", "other", "no"]
    (tmp_path / "existence" / "bad.txt").write_text("no tab here\n")
    _image(tmp_path / "existence" / "bad.png", 3)
    with pytest.raises(EvalError, match=r"bad.txt:1: expected 'question<TAB>Yes\|No'"):
        load_mme(tmp_path)


def test_eval_mme_command_with_an_image_adapter(tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    clip = make_clip(tmp_path / "clip")
    model = la.load_model(tiny_base, dtype=torch.float32)
    model.add_adapter("mm", la.AdapterConfig(prompt_length=2, layers=2))
    attach_projection(model, "mm", {"image": ImageEncoder.load(clip)})
    adapter = save_adapter(model, "mm", tmp_path / "mm.safetensors")
    out = tmp_path / "mme.jsonl"
    args = [
        "eval",
        "mme",
        "--base",
        str(tiny_base),
        "--adapter",
        str(adapter),
        "--data",
        str(write_mme(tmp_path / "m")),
    ]
    assert main([*args, "--max-new-tokens", "2", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "Perception total" in text and "Cognition total" in text and "existence" in text
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 10 and rows[0]["question"] == "Is there a cat?" and rows[0]["parsed"] in ("yes", "no", "other")


# ---- open-ended QA --------------------------------------------------------------------------------------------
def test_vqa_accuracy_is_the_vqa_rule() -> None:
    ten = ["2"] * 2 + ["two"] + ["3"] * 7  # "two" normalises to "2": three humans said it
    assert vqa_accuracy("Two", ten) == pytest.approx(0.9)  # 3 of 10 leave-one-out sets hold 2 matches, 7 hold 3
    assert vqa_accuracy("3", ten) == 1.0 and vqa_accuracy("4", ten) == 0.0
    assert vqa_accuracy("The dog.", ["dog"]) == 1.0 and vqa_accuracy("a cat", ["dog"]) == 0.0


def test_text_metrics_are_the_libraries() -> None:
    import sacrebleu
    from rouge_score import rouge_scorer

    preds, refs = (
        ["the cat sat on the mat today", "a quick brown fox"],
        [["the cat sat on the mat"], ["a fast brown fox"]],
    )
    assert bleu(preds, refs) == pytest.approx(sacrebleu.corpus_bleu(preds, [[r[0] for r in refs]]).score)
    sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    want = 100 * np.mean([sc.score(r[0], p)["rougeL"].fmeasure for p, r in zip(preds, refs, strict=True)])
    assert rouge_l(preds, refs) == pytest.approx(want)
    assert bleu(["x y z w"], [["x y z w", "a b"]]) == pytest.approx(100.0)  # fewer references: padded harmlessly


def write_bert(path: Path) -> Path:
    """A tiny random BERT with a word-piece vocabulary, saved for bert-score's local-model path."""
    from transformers import BertConfig, BertModel, BertTokenizer

    path.mkdir()
    words = "the cat sat on mat a quick brown fox fast dog".split()
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizer(str(path / "vocab.txt"), model_max_length=64).save_pretrained(path)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=16, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    BertModel(cfg).eval().save_pretrained(path)
    return path


def test_bertscore_with_a_local_model(tmp_path: Path) -> None:
    pytest.importorskip("bert_score")
    qs = load_open_qa(_write_qa(tmp_path))
    bert = write_bert(tmp_path / "bert")
    same, _, _ = open_qa_scores(qs, [q.answers[0] for q in qs], meteor=False, bertscore_model=str(bert))
    other, _, _ = open_qa_scores(qs, ["fox fox fox", "the the"], meteor=False, bertscore_model=str(bert))
    assert same["BERTScore"] == pytest.approx(100.0, abs=1e-3) and other["BERTScore"] < same["BERTScore"]


def _write_qa(root: Path) -> Path:
    """MusicQA-style (audio_name, Question, Answer) and VQA-style (question, answers: [{answer}]) records."""
    import soundfile as sf

    (root / "audio").mkdir(parents=True, exist_ok=True)
    sf.write(str(root / "audio" / "m1.wav"), np.zeros(1600, np.float32), 16000)
    recs = [
        {"audio_name": "audio/m1.wav", "Question": "What instrument plays?", "Answer": "the cat sat on the mat"},
        {"question_id": 7, "question": "How many dogs?", "answers": [{"answer": "a quick brown fox"}] * 3},
    ]
    f = root / "qa.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return f


def test_open_qa_reads_musicqa_and_vqa_fields(tmp_path: Path) -> None:
    qs = load_open_qa(_write_qa(tmp_path))
    assert qs[0].inputs == {"audio": str(tmp_path / "audio" / "m1.wav")} and qs[0].answers == ["the cat sat on the mat"]
    assert qs[1].id == "7" and qs[1].answers == ["a quick brown fox"] * 3 and qs[1].inputs == {}
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(EvalError, match="bad.jsonl line 1: no reference answer"):
        load_open_qa(tmp_path / "bad.jsonl")


def test_eval_open_qa_command(tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = _write_qa(tmp_path)
    out = tmp_path / "qa_pred.jsonl"
    args = ["eval", "open-qa", "--base", str(tiny_base), "--data", str(data), "--meteor", "off"]
    assert main([*args, "--max-new-tokens", "3", "--out", str(out), "--quiet", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["scores"]) == {"BLEU", "METEOR", "ROUGE-L", "BERTScore", "VQA-acc"}
    assert res["scores"]["METEOR"] is None and res["scores"]["BERTScore"] is None
    assert any("BERTScore not computed" in n for n in res["notes"])
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["audio"].endswith("m1.wav") and "vqa_accuracy" in rows[1]
