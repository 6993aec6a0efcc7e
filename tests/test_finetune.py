"""Fine-tuning: loss, recipe, outputs, CLI errors, non-finite stop, and exact resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import llama_adapter as la
from llama_adapter.cli import main as cli_main
from llama_adapter.errors import TrainingError
from llama_adapter.training import loop as ft
from llama_adapter.training import loss as loss_module
from llama_adapter.training.checkpointing import KILL_ENV
from llama_adapter.training.config import TrainConfig
from llama_adapter.training.loop import train
from llama_adapter.training.loss import linear_cross_entropy
from llama_adapter.training.schedule import lr_factor

WORDS = "the quick brown fox jumps over the lazy dog alpacas are domesticated camelids".split()


pytestmark = pytest.mark.usefixtures("one_thread")


def make_records(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        k = int(torch.randint(2, 12, (1,), generator=g))
        ws = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (k,), generator=g)]
        out.append({"instruction": f"Repeat {i % 3}", "input": "" if i % 2 else "the fox", "output": " ".join(ws)})
    return out


def small_cfg(tmp_path: Path, base: Path, **kw: object) -> TrainConfig:
    d = dict(
        base=str(base),
        device=str(_DEVICE[0]),
        out=str(tmp_path / "run"),
        epochs=2,
        warmup_epochs=1,
        batch_size=8,
        micro_batch=4,
        dtype="fp32",
        progress=False,
        max_length=128,
        lr=2e-2,
        template="plain",
    )
    d.update(kw)
    return TrainConfig(**d)  # type: ignore[arg-type]


_DEVICE = [torch.device("cpu")]  # the suite's device (`--device`), for the plain helper `small_cfg`


@pytest.fixture(autouse=True)
def _suite_device(device: torch.device) -> None:
    _DEVICE[0] = device


@pytest.fixture(scope="module")
def base_model(tiny_base: Path, device: torch.device) -> la.Transformer:
    return la.load_model(tiny_base, dtype=torch.float32, device=device)


@pytest.mark.parametrize("grad_rows", [256, 3])
def test_linear_cross_entropy_matches_autograd(grad_rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunked loss gives autograd's loss and gradient, also where a chunk's gradient products are issued in
    pieces of fewer rows than the chunk (`GRAD_ROWS`, 3 < 8 here, with a last piece of 2)."""
    monkeypatch.setattr(loss_module, "GRAD_ROWS", grad_rows)
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16)
    y = torch.randint(0, 50, (37,))
    ref = F.cross_entropy(h @ w.T, y, reduction="sum")
    (gref,) = torch.autograd.grad(ref * 0.3, h)
    got = linear_cross_entropy(h, w, y, chunk=8)
    (g,) = torch.autograd.grad(got * 0.3, h)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(g, gref)


def test_the_loss_takes_its_chunk_from_the_compute_backend(
    base_model: la.Transformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`batch_loss` computes `backend.loss_chunk` rows of logits at a time unless told otherwise (the CPU backend's
    is larger: its head product gains from more rows), and `--loss-chunk` still overrides it."""
    chunks: list[int] = []
    real = loss_module.linear_cross_entropy
    monkeypatch.setattr(loss_module, "linear_cross_entropy", lambda *a: chunks.append(a[3]) or real(*a))
    ids = torch.randint(3, base_model.config.vocab_size, (2, 9), device=base_model.tok_embeddings.weight.device)
    base_model.add_adapter("chunk", la.AdapterConfig(prompt_length=2, layers=1))
    try:
        for chunk in (None, 5):
            loss_module.batch_loss(base_model, "chunk", {"input_ids": ids, "labels": ids}, chunk)
    finally:
        base_model.remove_adapter("chunk")
    assert base_model.backend is not None
    assert chunks == [base_model.backend.loss_chunk, 5]


def test_lr_schedule_shape() -> None:
    f = [lr_factor(s, 10, 5, 2) for s in range(50)]
    assert f[0] == pytest.approx(0.05) and f[19] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[20:], f[21:], strict=False)) and 0 < f[-1] < 0.01
    assert TrainConfig().effective_lr == pytest.approx(9e-3 * 64 / 256)


def test_train_outputs_and_learning(tmp_path: Path, base_model: la.Transformer) -> None:
    cfg = small_cfg(tmp_path, Path(base_model.source or ""), epochs=6, warmup_epochs=1)
    res = train(cfg, model=base_model, records=make_records(16), val_records=make_records(4, seed=1))
    out = Path(cfg.out)
    for f in ("adapter.safetensors", "config.yaml", "metrics.jsonl", "loss.png", "checkpoint.pt"):
        assert (out / f).is_file(), f
    m = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert m == res.metrics and len(m) == res.steps == 12
    assert {"step", "epoch", "loss", "lr", "tokens_per_s", "grad_norm"} <= set(m[0])
    vals = [x["val_loss"] for x in m if "val_loss" in x]
    assert len(vals) == 6 and vals[-1] < vals[0]
    assert m[-1]["loss"] < m[0]["loss"]
    with safe_open(str(res.adapter_path), "pt") as f:
        assert f.metadata()["template"] == "plain"
    assert res.n_trainable == sum(p.numel() for p in base_model.trainable_parameters("default"))
    # the adapter was trained, the base untouched
    assert base_model.adapters["default"].gates.abs().sum() > 0
    assert not any(p.requires_grad for n, p in base_model.named_parameters() if not n.startswith("adapters."))
    # the written config can be passed back
    import yaml

    again = TrainConfig.from_dict(yaml.safe_load((out / "config.yaml").read_text()))
    assert again.epochs == 6 and again.lr == 2e-2 and again.resume is None


def test_accumulation_invariance_and_rand_init(tmp_path: Path, base_model: la.Transformer) -> None:
    recs = make_records(12)
    a = train(small_cfg(tmp_path / "a", Path("x"), micro_batch=1, epochs=1), model=base_model, records=recs)
    pa = base_model.adapters["default"].prompts.detach().clone()
    b = train(small_cfg(tmp_path / "b", Path("x"), micro_batch=8, epochs=1), model=base_model, records=recs)
    pb = base_model.adapters["default"].prompts.detach().clone()
    assert a.steps == b.steps == 2
    torch.testing.assert_close(pa, pb, atol=1e-5, rtol=0)
    r = train(
        small_cfg(tmp_path / "r", Path("x"), attention="rand-init", epochs=1, layers=2, prompt_length=3),
        model=base_model,
        records=recs,
    )
    meta = la.read_adapter(r.adapter_path)[0]
    assert json.loads(meta["adapter"])["init"] == "random" and json.loads(meta["adapter"])["layers"] == 2


def test_non_finite_loss_stops_and_keeps_checkpoint(
    tmp_path: Path, base_model: la.Transformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real = ft.batch_loss

    def flaky(*a: object, **k: object) -> tuple[torch.Tensor, int]:
        loss, n = real(*a, **k)  # type: ignore[arg-type]
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] > 4 else loss), n

    monkeypatch.setattr(ft, "batch_loss", flaky)
    cfg = small_cfg(tmp_path, Path("x"), save_every=2, epochs=3)
    with pytest.raises(TrainingError, match="non-finite loss.*step 3.*checkpoint"):
        train(cfg, model=base_model, records=make_records(16))
    ck = torch.load(Path(cfg.out) / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 2


def test_cli_errors_are_one_line(tmp_path: Path, tiny_base: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": 7}\n')
    rc = cli_main(
        ["finetune", "--base", str(tiny_base), "--data", str(bad), "--out", str(tmp_path / "o"), "--no-progress"]
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "bad.jsonl" in err and "record 2" in err and "'output'" in err
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    rc = cli_main(
        ["finetune", "--base", str(tiny_base), "--data", str(empty), "--out", str(tmp_path / "o"), "--no-progress"]
    )
    assert rc == 2 and "empty" in capsys.readouterr().err
    rc = cli_main(
        [
            "finetune",
            "--base",
            str(tiny_base),
            "--data",
            str(bad),
            "--skip-invalid",
            "--template",
            "nope",
            "--out",
            str(tmp_path / "o"),
            "--no-progress",
        ]
    )
    assert rc == 2 and "unknown template" in capsys.readouterr().err


def _cli(args: list[str], env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run(
        [sys.executable, "-m", "llama_adapter", "finetune", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_sigkill_after_checkpoint_then_resume_is_exact(tmp_path: Path, tiny_base: Path, device: torch.device) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_records(20)))
    common = [
        "--base",
        str(tiny_base),
        "--data",
        str(data),
        "--batch-size",
        "8",
        "--micro-batch",
        "4",
        "--epochs",
        "2",
        "--warmup-epochs",
        "1",
        "--save-every",
        "2",
        "--dtype",
        "bf16",
        "--val-fraction",
        "0.2",
        "--max-length",
        "128",
        "--template",
        "plain",
        "--no-progress",
        "--seed",
        "3",
        "--device",
        str(device),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "llama_adapter", "finetune", *common]
    full = subprocess.Popen([*cmd, "--out", str(tmp_path / "full")], env=env, stderr=subprocess.PIPE, text=True)
    killed = subprocess.Popen(
        [*cmd, "--out", str(tmp_path / "cut")], env=env | {KILL_ENV: "2"}, stderr=subprocess.PIPE, text=True
    )  # both at once: half the wall time
    full_err, killed_err = full.communicate(timeout=120)[1], killed.communicate(timeout=120)[1]
    assert full.returncode == 0, full_err
    assert killed.returncode == -signal.SIGKILL, killed_err
    ck = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 2 and not (tmp_path / "cut" / "adapter.safetensors").exists()
    resumed = _cli(["--resume", str(tmp_path / "cut")])  # options come back from the run's config.yaml
    assert resumed.returncode == 0, resumed.stderr
    _, a = la.read_adapter(tmp_path / "full" / "adapter.safetensors")
    _, b = la.read_adapter(tmp_path / "cut" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [x["loss"] for x in ma] == [x["loss"] for x in mb]
    assert [x.get("val_loss") for x in ma] == [x.get("val_loss") for x in mb]


def test_resume_refuses_a_different_recipe(tmp_path: Path, base_model: la.Transformer) -> None:
    recs = make_records(8)
    cfg = small_cfg(tmp_path, Path("x"), epochs=1, max_steps=1)
    train(cfg, model=base_model, records=recs)
    with pytest.raises(TrainingError, match="seed=0.*now 5"):
        train(small_cfg(tmp_path, Path("x"), epochs=1, seed=5, resume=cfg.out), model=base_model, records=recs)
    res = train(small_cfg(tmp_path, Path("x"), epochs=1, resume=cfg.out), model=base_model, records=recs)
    assert [m["step"] for m in res.metrics] == [1]  # continues from step 1 of 1: nothing left to do


def test_out_holding_a_run_is_refused_unless_overwrite(
    tmp_path: Path, base_model: la.Transformer, tiny_base: Path, capsys: pytest.CaptureFixture
) -> None:
    """A second run into the same --out must not silently replace the first: one line naming the ways out."""
    recs = make_records(8)
    cfg = small_cfg(tmp_path, Path("x"), epochs=1, max_steps=1)
    train(cfg, model=base_model, records=recs)
    first = (Path(cfg.out) / "adapter.safetensors").read_bytes()
    with pytest.raises(TrainingError, match=r"holds an earlier run .*--resume .*--overwrite"):
        train(small_cfg(tmp_path, Path("x"), epochs=1, max_steps=1, seed=1), model=base_model, records=recs)
    assert (Path(cfg.out) / "adapter.safetensors").read_bytes() == first  # untouched
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    argv = ["finetune", "--base", str(tiny_base), "--data", str(data), "--out", cfg.out, "--no-progress"]
    capsys.readouterr()
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--resume {cfg.out}" in err[0] and "--overwrite" in err[0], err
    res = train(
        small_cfg(tmp_path, Path("x"), epochs=1, max_steps=1, seed=1, overwrite=True), model=base_model, records=recs
    )
    assert res.adapter_path.read_bytes() != first
    import yaml

    assert yaml.safe_load((Path(cfg.out) / "config.yaml").read_text())["overwrite"] is False  # not carried on


def test_progress_in_a_log_is_plain_lines(tmp_path: Path, tiny_base: Path) -> None:
    """stderr to a pipe (a CI log, `2> file`): short periodic lines, no carriage-return bar."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_records(20)))
    args = ["--base", str(tiny_base), "--data", str(data), "--out", str(tmp_path / "o"), "--batch-size", "2"]
    p = _cli([*args, "--micro-batch", "2", "--epochs", "2", "--max-length", "64", "--template", "plain"])
    assert p.returncode == 0, p.stderr
    assert "\r" not in p.stderr
    lines = p.stderr.splitlines()
    assert max(len(x) for x in lines) <= 200, max(lines, key=len)
    bar = [x for x in lines if x.startswith("finetune: ")]
    assert 5 <= len(bar) <= 12 and bar[-1].startswith("finetune: 20/20 steps (100%)"), bar
    assert "loss " in bar[-1] and "elapsed" in bar[-1]


def test_resuming_from_the_final_checkpoint_keeps_the_final_loss(tmp_path: Path, base_model: la.Transformer) -> None:
    """A resumed run with no step left still records the last training loss (it wrote `null` before)."""
    recs = make_records(16)
    first = train(small_cfg(tmp_path, Path("x"), epochs=1), model=base_model, records=recs)
    assert first.final_train_loss is not None
    again = train(small_cfg(tmp_path, Path("x"), epochs=1, resume=str(first.out_dir)), model=base_model, records=recs)
    assert again.final_train_loss == first.final_train_loss
    assert la.read_adapter(again.adapter_path)[0]["train_loss"] == str(first.final_train_loss)
