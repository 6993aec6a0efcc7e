"""ScienceQA: readers (official layout, LLaVA file), prompts, answer extraction, group accuracy, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

import llama_adapter as la
from llama_adapter.builtin.shapes import COLOURS, SHAPES, make_shapes_dataset
from llama_adapter.cli import main
from llama_adapter.eval.scienceqa import (
    GROUPS,
    PAPER_TABLE2,
    Problem,
    build_instruction,
    extract_answer,
    format_table,
    group_accuracy,
    load_llava,
    load_official,
    load_scienceqa,
    parse_llava_record,
    to_record,
)

_SHARED = [Path(__file__).resolve().parents[2] / "shared", Path("/work/shared")]  # CI: ../shared beside the clone
LLAVA_FILE = next(
    (
        d / "data/scienceqa/llava_test_CQM-A.json"
        for d in _SHARED
        if (d / "data/scienceqa/llava_test_CQM-A.json").is_file()
    ),
    _SHARED[-1] / "missing",
)

PROBLEMS = {
    "1": {
        "question": "Which colour is the circle?",
        "choices": ["red", "blue"],
        "answer": 1,
        "hint": "",
        "image": "image.png",
        "subject": "natural science",
        "grade": "grade3",
        "split": "train",
    },
    "2": {
        "question": "Which word is a noun?",
        "choices": ["run", "dog", "fast"],
        "answer": 1,
        "hint": "",
        "image": None,
        "subject": "language science",
        "grade": "grade2",
        "split": "train",
    },
    "3": {
        "question": "Which state is farthest north?",
        "choices": ["Ohio", "Maine", "Texas", "Utah"],
        "answer": 1,
        "hint": "Look at the map.",
        "image": "image.png",
        "subject": "social science",
        "grade": "grade8",
        "split": "test",
    },
    "4": {
        "question": "What does the text suggest?",
        "choices": ["rain", "sun"],
        "answer": 0,
        "hint": "Dark clouds gathered.",
        "image": None,
        "subject": "natural science",
        "grade": "grade10",
        "split": "test",
    },
    "5": {
        "question": "Which shape is shown?",
        "choices": ["square", "circle"],
        "answer": 1,
        "hint": "",
        "image": "image.png",
        "subject": "natural science",
        "grade": "grade1",
        "split": "test",
    },
}


@pytest.fixture(scope="module")
def sqa(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few problems in the official layout with PIL-drawn images."""
    d = tmp_path_factory.mktemp("scienceqa")
    (d / "problems.json").write_text(json.dumps(PROBLEMS))
    splits = {"train": ["1", "2"], "val": [], "test": ["3", "4", "5"]}
    (d / "pid_splits.json").write_text(json.dumps(splits))
    for pid, p in PROBLEMS.items():
        if p["image"]:
            im = Image.new("RGB", (40, 30), "white")
            ImageDraw.Draw(im).ellipse([5, 5, 25, 25], fill=(200, 30, 30) if pid != "5" else (30, 30, 200))
            (d / "images" / p["split"] / pid).mkdir(parents=True)
            im.save(d / "images" / p["split"] / pid / "image.png")
    return d


def test_official_reader(sqa: Path) -> None:
    test = load_official(sqa, "test")
    assert [p.pid for p in test] == ["3", "4", "5"]
    p3, p4, p5 = test
    assert p3.image and Path(p3.image).is_file() and p4.image is None
    assert p3.choices == ["Ohio", "Maine", "Texas", "Utah"] and p3.answer_letter == "B"
    assert p3.groups() == ["SOC", "TXT", "IMG", "G7-12"]
    assert p4.groups() == ["NAT", "TXT", "G7-12"]
    assert p5.groups() == ["NAT", "IMG", "G1-6"]
    train = load_scienceqa(sqa, "train")
    assert train[1].groups() == ["LAN", "NO", "G1-6"]
    with pytest.raises(ValueError, match="no split 'minival'"):
        load_official(sqa, "minival")
    with pytest.raises(ValueError, match="problems.json not found"):
        load_official(sqa / "images", "test")


def test_prompt_and_record(sqa: Path) -> None:
    p3 = load_official(sqa, "test")[0]
    assert build_instruction(p3) == (
        "Question: Which state is farthest north?\nContext: Look at the map.\n"
        "Options: (A) Ohio (B) Maine (C) Texas (D) Utah"
    )
    assert "Context: Look at the map. a map of states" in build_instruction(p3, "a map of states")
    rec = to_record(p3)
    assert rec["output"] == "The answer is (B)." and rec["image"] == p3.image and rec["input"] == ""
    assert "Context: N/A" in build_instruction(load_official(sqa, "train")[1])
    assert "image" not in to_record(load_official(sqa, "train")[1])


@pytest.mark.parametrize(
    "text,expected",
    [
        ("The answer is (B).", 1),
        ("The answer is B.", 1),
        ("the answer is: (c)", 2),
        ("(D) Utah", 3),
        ("B", 1),
        ("C. Texas", 2),
        ("I choose (A) because", 0),
        ("Maine", 1),
        ("It is maine, I think", 1),
        ("The answer is a guess: Texas", 2),
        ("no idea", None),
        ("The answer is (E).", None),
        ("", None),
    ],
)
def test_extract_answer(text: str, expected: int | None) -> None:
    assert extract_answer(text, ["Ohio", "Maine", "Texas", "Utah"]) == expected


def test_group_accuracy_and_table() -> None:
    rows = [
        {"correct": True, "groups": ["NAT", "IMG", "G1-6"]},
        {"correct": False, "groups": ["NAT", "TXT"]},
        {"correct": True, "groups": ["NO"]},
    ]
    acc = group_accuracy(rows)
    assert acc["Average"]["total"] == 3 and acc["Average"]["acc"] == pytest.approx(200 / 3)
    assert acc["NAT"]["acc"] == 50.0 and "SOC" not in acc
    table = format_table({"mine": acc, **PAPER_TABLE2})
    lines = table.splitlines()
    assert lines[0].split()[1:] == ["Average", *GROUPS]
    mine = lines[1].split()
    assert mine[0] == "mine" and mine[1] == "66.67" and mine[3] == "-" and mine[4] == "-"
    assert "78.31" in table and "85.19" in table


def test_llava_record_parsing() -> None:
    rec = {
        "id": "9",
        "image": "9/image.png",
        "conversations": [
            {"from": "human", "value": "<image>\nContext: Line one.\nLine two.\nWhich is it?\nA. x\ny\nB. z"},
            {"from": "gpt", "value": "B"},
        ],
    }
    p = parse_llava_record(rec, image_root="/imgs")
    assert (p.hint, p.question, p.choices, p.answer, p.image) == (
        "Line one.\nLine two.",
        "Which is it?",
        ["x\ny", "z"],
        1,
        "/imgs/9/image.png",
    )
    assert p.groups() == ["TXT", "IMG"]
    p = parse_llava_record(
        {
            "id": "1",
            "conversations": [{"from": "human", "value": "Pick one.\nA. a\nB. b\nC. c"}, {"from": "gpt", "value": "C"}],
        }
    )
    assert p.hint == "" and p.image is None and p.answer == 2 and p.groups() == ["NO"]


@pytest.mark.skipif(not LLAVA_FILE.is_file(), reason="shared ScienceQA LLaVA file not available")
def test_llava_file_reader(tmp_path: Path) -> None:
    data = json.loads(LLAVA_FILE.read_text())[:40]
    small = tmp_path / "llava.json"
    small.write_text(json.dumps(data))
    probs = load_llava(small)
    assert len(probs) == 40 and [p.pid for p in probs] == [r["id"] for r in data]
    for p, r in zip(probs, data, strict=True):
        assert p.answer_letter == r["conversations"][1]["value"]
        assert bool(p.image) == ("image" in r)
        assert bool(p.hint) == ("Context: " in r["conversations"][0]["value"])
        assert 2 <= len(p.choices) <= 5
        assert not {"NAT", "SOC", "LAN", "G1-6", "G7-12"} & set(p.groups())
    assert probs[0].pid == "4" and probs[0].choices == ["chiasmus", "apostrophe"] and probs[0].answer == 1


def test_shapes_dataset(tmp_path: Path) -> None:
    d = make_shapes_dataset(tmp_path / "shapes", n_train=6, n_test=4, image_size=32, seed=1)
    train, test = load_official(d, "train"), load_official(d, "test")
    assert len(train) == 6 and len(test) == 4
    for p in train + test:
        assert p.image and Image.open(p.image).size == (32, 32)
        assert p.choices in (list(COLOURS), SHAPES) and p.groups()[1:] == ["IMG", p.groups()[-1]]


def test_eval_cli_end_to_end(sqa: Path, tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from test_multimodal import make_clip

    from llama_adapter.adapter_file import save_adapter
    from llama_adapter.multimodal.encoder import ImageEncoder
    from llama_adapter.multimodal.features import attach_visual_projection

    clip = make_clip(tmp_path / "clip")
    model = la.load_model(tiny_base, dtype=torch.float32)
    model.add_adapter("mm", la.AdapterConfig(prompt_length=2, layers=2))
    attach_visual_projection(model, "mm", ImageEncoder.load(clip))
    with torch.no_grad():
        model.adapters["mm"].gates.fill_(0.5)
    model.adapters["mm"].meta["template"] = "alpaca"
    adapter = save_adapter(model, "mm", tmp_path / "mm.safetensors")

    out = tmp_path / "pred.jsonl"
    rc = main(
        [
            "eval",
            "scienceqa",
            "--base",
            str(tiny_base),
            "--adapter",
            str(adapter),
            "--data",
            str(sqa),
            "--max-samples",
            "2",
            "--max-new-tokens",
            "4",
            "--out",
            str(out),
            "--quiet",
            "--name",
            "mm",
        ]
    )
    assert rc == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[1:] == ["Average", *GROUPS] and table.splitlines()[1].startswith("mm")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["pid"] for r in rows] == ["3", "4"] and {"prediction", "correct", "groups", "answer"} <= set(rows[0])

    # missing image: an error naming the problem
    (sqa / "images" / "test" / "5" / "image.png").rename(tmp_path / "moved.png")
    try:
        rc = main(
            [
                "eval",
                "scienceqa",
                "--base",
                str(tiny_base),
                "--adapter",
                str(adapter),
                "--data",
                str(sqa),
                "--max-new-tokens",
                "2",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        assert rc == 2 and "problem 5" in capsys.readouterr().err
    finally:
        (tmp_path / "moved.png").rename(sqa / "images" / "test" / "5" / "image.png")


def test_eval_predictions_default_under_runs(
    sqa: Path, tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Without --out, predictions go under runs/ (git-ignored), not loose into the working directory; progress
    goes to stderr as plain lines when stderr is not a terminal, never into the printed results."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    argv = ["eval", "scienceqa", "--base", str(tiny_base), "--data", str(sqa), "--max-samples", "3"]
    assert main([*argv, "--max-new-tokens", "2", "--batch-size", "1", "--json"]) == 0
    captured = capsys.readouterr()
    assert [p.relative_to(work).as_posix() for p in work.rglob("*") if p.is_file()] == [
        "runs/eval/scienceqa-base-test.jsonl"
    ]
    assert json.loads(captured.out)["predictions"] == "runs/eval/scienceqa-base-test.jsonl"
    assert "\r" not in captured.err and "scienceqa: 3/3 problems (100%)" in captured.err
    from llama_adapter.cli.eval import default_predictions_path

    assert default_predictions_path("my run/x", "minitest").as_posix() == "runs/eval/scienceqa-my_run_x-minitest.jsonl"


def test_export_training_records(sqa: Path, tmp_path: Path) -> None:
    out = tmp_path / "train.jsonl"
    assert main(["eval", "scienceqa-data", "--data", str(sqa), "--split", "train", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and Path(rows[0]["image"]).is_file() and "image" not in rows[1]
    assert rows[1]["output"] == "The answer is (B)."
    from llama_adapter.training.data import load_records

    assert load_records(out)[0]["image"] == rows[0]["image"]  # the fine-tuning loader accepts them


def test_problem_without_answer_has_no_record() -> None:
    with pytest.raises(ValueError):
        to_record(Problem(pid="x", question="q", choices=["a", "b"], answer=None))
