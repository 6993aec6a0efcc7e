"""A real evaluation client against the server: lm-evaluation-harness's `local-completions` model runs our task
YAMLs (benchmarks/lm_eval/) over local JSON data, and the log-likelihoods it gets from `/v1/completions` (echo +
logprobs) equal the ones computed in process from the same model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_server import _Running

import llama_adapter as la
from llama_adapter.builtin import builtin_base_dir
from llama_adapter.serving.app import create_app

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "benchmarks" / "lm_eval"
SQA = ROOT.parent / "shared" / "data" / "scienceqa" / "llava_test_CQM-A.json"
FALLBACK = [  # when ../shared is not beside the checkout
    {"question": "Which is a mammal?", "choices": ["trout", "whale"], "answer": 1},
    {"question": "Which is heavier?", "choices": ["a feather", "a brick", "a leaf"], "answer": 1},
    {"question": "What is 2 + 2?", "choices": ["four", "five"], "answer": 0},
]


def _questions(n: int) -> list[dict]:
    if SQA.is_file():
        import importlib.util

        spec = importlib.util.spec_from_file_location("build_data", TASKS / "build_data.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.text_only_records(SQA, n)
    return [
        {
            **q,
            "answer_letter": "AB"[q["answer"]],
            "options": "\n".join(f"{'ABC'[i]}. {c}" for i, c in enumerate(q["choices"])),
        }
        for q in FALLBACK
    ]


def _encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:  # type: ignore[no-untyped-def]
    """lm-eval's own split of (context, continuation) into token ids (trailing spaces move to the continuation)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok.encode(context + continuation, add_special_tokens=False)
    ctx = tok.encode(context, add_special_tokens=False)
    return ctx, whole[len(ctx) :]


def test_lm_eval_harness_against_the_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lm_eval = pytest.importorskip("lm_eval")  # in the test extra; the skip only helps a partial install
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = tmp_path / "scienceqa_text.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _questions(6)))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name in ("sqa_text_mc.yaml", "sqa_text_gen.yaml"):  # the shipped YAMLs, reading this test's data
        text = (TASKS / name).read_text().replace("runs/lm_eval/scienceqa_text.jsonl", str(data))
        (tasks / name).write_text(text)

    model = la.load_model("builtin", dtype=torch.float32)
    running = _Running(create_app(model))
    try:
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={
                "base_url": running.url + "/v1/completions",
                "model": "base",
                "tokenizer": str(builtin_base_dir()),
                "tokenizer_backend": "huggingface",
                "tokenized_requests": True,
                "num_concurrent": 1,
                "max_retries": 1,
            },
            tasks=["sqa_text_mc", "sqa_text_gen"],
            task_manager=TaskManager(include_path=str(tasks)),
            log_samples=True,
        )
    finally:
        running.stop()
    assert out is not None
    assert 0.0 <= out["results"]["sqa_text_mc"]["acc,none"] <= 1.0
    assert 0.0 <= out["results"]["sqa_text_gen"]["exact_match,none"] <= 1.0

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(builtin_base_dir()))
    checked = 0
    for sample in out["samples"]["sqa_text_mc"]:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"], strict=True):
            ctx, cont = _encode_pair(tok, context, continuation)
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids)[0].double(), -1)
            mine = sum(float(logp[len(ctx) + i - 1, t]) for i, t in enumerate(cont))
            assert abs(resp[0][0] - mine) < 1e-4, (context[-40:], continuation, resp[0][0], mine)
            checked += 1
    assert checked >= 12  # every choice of every question
