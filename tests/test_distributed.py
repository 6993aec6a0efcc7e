"""DDP and FSDP on gloo: two processes (launched as torchrun would, via the CLI) give the same adapter as one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llama_adapter as la
from llama_adapter.training.config import TrainConfig
from llama_adapter.training.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_process_gloo_matches_single_process(tmp_path: Path, tiny_base: Path, fsdp: bool) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from test_finetune import make_records

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_records(24, seed=5)))
    opts = dict(
        base=str(tiny_base),
        data=[str(data)],
        batch_size=8,
        micro_batch=2,
        epochs=2,
        warmup_epochs=1,
        dtype="fp32",
        max_length=128,
        template="plain",
        lr=2e-2,
        val_fraction=0.2,
        progress=False,
        seed=1,
    )
    single = train(TrainConfig(out=str(tmp_path / "single"), **opts))  # type: ignore[arg-type]

    port = _free_port()
    args = [
        sys.executable,
        "-m",
        "llama_adapter",
        "finetune",
        "--base",
        str(tiny_base),
        "--data",
        str(data),
        "--batch-size",
        "8",
        "--micro-batch",
        "2",
        "--epochs",
        "2",
        "--warmup-epochs",
        "1",
        "--dtype",
        "fp32",
        "--max-length",
        "128",
        "--template",
        "plain",
        "--lr",
        "2e-2",
        "--val-fraction",
        "0.2",
        "--no-progress",
        "--seed",
        "1",
        "--out",
        str(tmp_path / "ddp"),
    ] + (["--fsdp"] if fsdp else [])
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
        )
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=150) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    _, a = la.read_adapter(single.adapter_path)
    _, b = la.read_adapter(tmp_path / "ddp" / "adapter.safetensors")
    assert single.steps == 6
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0)
    assert a["gates"].abs().max() > 1e-3  # it did train
    m1 = single.metrics
    m2 = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [round(x["loss"], 5) for x in m1] == [round(x["loss"], 5) for x in m2]
    assert abs(m1[-1]["val_loss"] - m2[-1]["val_loss"]) < 1e-5
    info = json.loads((tmp_path / "ddp" / "run_info.json").read_text())
    assert info["world_size"] == 2
    full = json.loads((tmp_path / "single" / "run_info.json").read_text())["base_bytes_on_rank0"]
    if fsdp:  # the blocks are sharded in two; embeddings, output and final norm stay whole
        assert info["base_bytes_on_rank0"] < 0.8 * full
    else:
        assert info["base_bytes_on_rank0"] == full
