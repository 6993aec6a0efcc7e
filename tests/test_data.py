"""Alpaca data: loading, validation errors, tokenisation boundary, truncation, batching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llama_adapter.templates import format_prompt
from llama_adapter.tokenizer import Tokenizer
from llama_adapter.training.data import (
    IGNORE_INDEX,
    DataError,
    LoadReport,
    TokenizeReport,
    collate,
    encode_record,
    epoch_plan,
    load_records,
    split_validation,
    tokenize_records,
)

SEED_TASKS = Path("/work/shared/data/alpaca/seed_tasks.jsonl")


@pytest.fixture(scope="module")
def tok(tiny_base: Path) -> Tokenizer:
    from llama_adapter.config import ModelConfig

    return Tokenizer.from_dir(tiny_base, ModelConfig.from_hf(tiny_base / "config.json"))


def test_json_jsonl_and_directory(tmp_path: Path) -> None:
    recs = [
        {"instruction": "a", "input": "b", "output": "c", "extra": 1},
        {"instruction": "d", "output": "e", "image": "img/1.png"},
    ]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "1.json").write_text(json.dumps(recs))
    (tmp_path / "d" / "2.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    (tmp_path / "d" / "notes.txt").write_text("ignored")
    out = load_records(tmp_path / "d")
    assert len(out) == 4
    assert out[0]["extra"] == 1 and out[1]["input"] == "" and out[1]["image"] == "img/1.png"
    assert load_records([tmp_path / "d" / "2.jsonl"]) == out[2:]


def test_instances_shape_flattened(tmp_path: Path) -> None:
    f = tmp_path / "s.jsonl"
    f.write_text(
        json.dumps(
            {
                "id": "t0",
                "instruction": "i",
                "instances": [{"input": "x1", "output": "y1"}, {"input": "", "output": "y2"}],
            }
        )
        + "\n"
    )
    out = load_records(f)
    assert [(r["instruction"], r["input"], r["output"], r["id"]) for r in out] == [
        ("i", "x1", "y1", "t0"),
        ("i", "", "y2", "t0"),
    ]
    if SEED_TASKS.is_file():  # the real self-instruct seed file
        real = load_records(SEED_TASKS)
        assert len(real) >= 175 and all(isinstance(r["output"], str) for r in real)


@pytest.mark.parametrize(
    "content, expect",
    [
        ('[{"instruction": "a", "output": "b"}, 3]', ["record 2", "not an object"]),
        ('[{"instruction": "a", "output": "b"}, {"instruction": "a"}]', ["record 2", "'output'", "missing"]),
        ('[{"instruction": "a", "input": 5, "output": "b"}]', ["record 1", "'input'", "int"]),
        ('[{"instruction": ["x"], "output": "b"}]', ["record 1", "'instruction'", "list"]),
        ('[{"instruction": "a", "output": "b"},', ["invalid JSON"]),
    ],
)
def test_errors_name_file_record_field(tmp_path: Path, content: str, expect: list[str]) -> None:
    f = tmp_path / "bad.json"
    f.write_text(content)
    with pytest.raises(DataError) as e:
        load_records(f)
    msg = str(e.value)
    assert str(f) in msg and "\n" not in msg
    for s in expect:
        assert s in msg


def test_jsonl_bad_line_and_skip_invalid(tmp_path: Path) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text('{"instruction": "a", "output": "b"}\nnot json\n')
    with pytest.raises(DataError, match="line 2"):
        load_records(f)
    g = tmp_path / "mixed.jsonl"
    g.write_text(
        '{"instruction": "a", "output": "b"}\n{"instruction": 1, "output": "b"}\n[1]\n'
        '{"instruction": "c", "output": "d"}\n'
    )
    with pytest.raises(DataError, match=r"record 2 \(line 2\).*'instruction'"):
        load_records(g)
    rep = LoadReport()
    out = load_records(g, skip_invalid=True, report=rep)
    assert [r["instruction"] for r in out] == ["a", "c"] and rep.n_skipped == 2


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_records(tmp_path / "nope.json")


def test_encode_boundary_and_truncation(tok: Tokenizer) -> None:
    rec = {"instruction": "Tell me about alpacas.", "input": "", "output": "Alpacas are domesticated."}
    ex = encode_record(tok, rec, "alpaca", 512)
    prompt = format_prompt("alpaca", rec["instruction"])
    assert ex.ids[0] == tok.bos_id and ex.ids[-1] == tok.eos_id
    assert ex.ids[: ex.n_prompt] == tok.encode(prompt, bos=True)
    assert tok.decode(ex.ids[ex.n_prompt :]) == rec["output"]
    assert not ex.truncated
    short = encode_record(tok, rec, "alpaca", ex.n_prompt + 2)
    assert short.truncated and short.n_supervised == 2 and short.ids == ex.ids[: ex.n_prompt + 2]
    rep = TokenizeReport()
    out = tokenize_records(tok, [rec, rec], "alpaca", ex.n_prompt, rep)  # prompt fills max_length
    assert out == [] and rep.n_dropped == 2 and rep.n_truncated == 2


def test_collate_labels() -> None:
    from llama_adapter.training.data import Example

    b = collate([Example([1, 5, 6, 7, 2], 3), Example([1, 8, 9, 2], 2, image_features=torch.ones(3))], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 5, 6, 7, 2], [1, 8, 9, 2, 0]]
    assert b["labels"].tolist() == [[IGNORE_INDEX] * 3 + [7, 2], [IGNORE_INDEX] * 2 + [9, 2, IGNORE_INDEX]]
    assert b["image_features"].tolist() == [[0, 0, 0], [1, 1, 1]]


def test_epoch_plan_deterministic_grouped() -> None:
    lengths = [5, 50, 7, 42, 9, 33, 11, 3, 60, 21]
    plan = epoch_plan(lengths, batch_size=4, micro_batch=2, seed=1, epoch=0)
    assert plan == epoch_plan(lengths, 4, 2, seed=1, epoch=0)
    assert plan != epoch_plan(lengths, 4, 2, seed=1, epoch=1)
    flat = [i for step in plan for mb in step for i in mb]
    assert sorted(flat) == list(range(10)) and len(plan) == 3
    for step in plan:  # longest rows first within a step: micro-batches group similar lengths
        ls = [lengths[i] for mb in step for i in mb]
        assert ls == sorted(ls, reverse=True)


def test_split_validation() -> None:
    recs = [{"i": i} for i in range(20)]
    tr, va = split_validation(recs, 0.25, seed=3)
    assert len(va) == 5 and len(tr) == 15 and (tr, va) == split_validation(recs, 0.25, seed=3)
    with pytest.raises(DataError):
        split_validation(recs[:1], 0.5, 0)


def test_llava_conversations_become_alpaca_records_with_their_folder(tmp_path: Path) -> None:
    from llama_adapter.training.data import DataError, load_records

    sub = tmp_path / "llava"
    sub.mkdir()
    recs = [
        {
            "id": "7",
            "image": "7/image.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is the square?\nA. red\nB. blue"},
                {"from": "gpt", "value": "B"},
            ],
        }
    ]
    (sub / "train.json").write_text(json.dumps(recs))
    out = load_records(sub / "train.json")
    assert out[0]["instruction"] == "What colour is the square?\nA. red\nB. blue"
    assert out[0]["output"] == "B" and out[0]["image"] == "7/image.png" and out[0]["_dir"] == str(sub)
    (sub / "bad.json").write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi"}]}]))
    with pytest.raises(DataError, match=r"bad.json: .*record 1.*gpt turn"):
        load_records(sub / "bad.json")
