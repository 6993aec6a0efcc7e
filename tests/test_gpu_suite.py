"""The GPU suite's pieces on a CPU (tiny shapes, in-process, ours only): it writes its JSON and markdown, every
section has its rows, and without the smoke flag (or without CUDA) it refuses in one line with exit code 2."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.cpu_only  # the suite itself runs these pieces on a GPU

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_suite.py"


def _suite():  # type: ignore[no-untyped-def]
    if str(SCRIPT.parent) not in sys.path:  # as when run as a script: its folder's modules (peft_peer, ...) import
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("gpu_suite", SCRIPT)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_smoke_run_writes_json_and_markdown(tmp_path: Path, one_thread: None) -> None:
    suite = _suite()
    assert suite.main(["--device", "cpu", "--smoke", "--peers", "", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert report["device"] == "cpu" and report["mode"].startswith("smoke")
    assert "skipped_reason" in report["tests"]
    got = {(r["section"], r["setting"]) for r in report["rows"]}
    assert {("train", "batch 4 x 32"), ("7b-train", "batch 1 x 32"), ("7b-train", "batch 2 x 32")} <= got
    assert {("decode", "batch 1, one adapter"), ("decode", "batch 2, 8 adapters")} <= got
    for r in report["rows"]:
        assert r["impl"] == "ours" and "error" not in r["note"].lower(), r
        assert r["tokens_per_s"] > 0 and r["peak_mib"] is None  # peak memory is CUDA's, never an RSS stand-in
    md = (tmp_path / "gpu_suite.md").read_text()
    assert "| section | shape | impl | setting | tokens/s | step s | peak MiB | note |" in md
    assert md.count("\n| train | tiny | ours |") == 1 and md.count("\n| decode | tiny | ours |") == 3


def test_refuses_without_cuda(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    suite = _suite()
    assert suite.main(["--device", "cpu", "--out", str(tmp_path)]) == 2
    if not torch.cuda.is_available():
        assert suite.main(["--out", str(tmp_path)]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert all(line.startswith("gpu_suite: ") for line in out) and not list(tmp_path.iterdir())


def test_the_plan_covers_the_issue() -> None:
    """The full plan (not run here): both small shapes with every implementation, batches 1/8/64, the 7B shape at
    batch 1 and 2 for ours and PEFT, seq 256."""
    specs = _suite().plan("cuda", smoke=False, peers=["peft", "litgpt"])
    train = {(s["shape"], s["impl"]) for s in specs if s["section"] == "train"}
    assert train == {(sh, i) for sh in ("smollm2-135m", "tinyllama-1.1b") for i in ("ours", "peft", "litgpt")}
    assert all(s["batches"] == [1, 8, 64] for s in specs if s["kind"] == "decode")
    big = {(s["impl"], s["batch"], s["seq"]) for s in specs if s["section"] == "7b-train"}
    assert big == {("ours", 1, 256), ("ours", 2, 256), ("peft", 1, 256), ("peft", 2, 256)}
