"""The resumable training state, `checkpoint.pt`: what it holds, how it is written, read and put back.

A checkpoint holds the step, the number of training examples, the run's options (JSON), the adapter, the
optimiser state, the RNG states and the metrics so far. The data order is a pure function of (seed, epoch) and
the learning rate a pure function of the step, so the step is the whole data and schedule position: a resumed
run repeats the uninterrupted run's arithmetic exactly. The file is written atomically (a crash leaves the
previous one) and read with `weights_only=True` (no arbitrary unpickling).
"""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llama_adapter.errors import TrainingError
from llama_adapter.loading import load_error_line
from llama_adapter.training.config import TrainConfig

CHECKPOINT = "checkpoint.pt"
KILL_ENV = "LLAMA_ADAPTER_KILL_AFTER_CHECKPOINT"  # test hook: SIGKILL self right after checkpoint at step N

# Options that change the arithmetic of a run: a resumed run must use the same values.
TRAJECTORY_KEYS = (
    "batch_size",
    "seed",
    "epochs",
    "warmup_epochs",
    "blr",
    "lr",
    "weight_decay",
    "beta1",
    "beta2",
    "prompt_length",
    "layers",
    "gate",
    "attention",
    "template",
    "train_on",
    "max_length",
    "val_fraction",
)


def atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    st: dict[str, Any] = {"torch": torch.get_rng_state(), "python": json.dumps(random.getstate())}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    py = json.loads(st["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def load_checkpoint(path: str) -> tuple[dict[str, Any], Path]:
    """(the checkpoint, its file) from a run directory or a checkpoint.pt path."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no checkpoint to resume from")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unpickling failure means an unusable file
        raise TrainingError(f"{p}: cannot read checkpoint ({load_error_line(e)})") from None
    return ckpt, p


def check_trajectory(ckpt: dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    """Refuse to resume with options that would change the run's arithmetic (`TRAJECTORY_KEYS`)."""
    # an option added after the checkpoint was written had its default's effect then
    saved = TrainConfig().to_dict() | json.loads(ckpt["config"])
    diff = [k for k in TRAJECTORY_KEYS if saved.get(k) != getattr(cfg, k)]
    if diff:
        raise TrainingError(
            f"{path}: checkpoint was made with different "
            + ", ".join(f"{k}={saved.get(k)!r} (now {getattr(cfg, k)!r})" for k in diff)
        )


def save_checkpoint(
    path: Path,
    *,
    step: int,
    n_train: int,
    config: dict[str, Any],
    adapter: nn.Module,
    optimizer: torch.optim.Optimizer,
    metrics: list[dict[str, Any]],
) -> None:
    """Write the training state after `step` steps atomically (then honour the `KILL_ENV` test hook)."""
    atomic_torch_save(
        {
            "step": step,
            "n_train": n_train,
            "config": json.dumps(config),
            "adapter": {k: v.detach().cpu() for k, v in adapter.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "rng": rng_state(),
            "metrics": json.dumps(metrics),
        },
        path,
    )
    kill = os.environ.get(KILL_ENV)
    if kill and int(kill) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def restore_checkpoint(
    ckpt: dict[str, Any], adapter: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, n_train: int
) -> tuple[int, list[dict[str, Any]]]:
    """Put the adapter, optimiser and RNG states back; returns (the step to continue from, the metrics so far)."""
    if ckpt["n_train"] != n_train:
        raise TrainingError(
            f"checkpoint was made with {ckpt['n_train']} training examples, the data now gives {n_train}"
        )
    with torch.no_grad():
        adapter.load_state_dict({k: v.to(device) for k, v in ckpt["adapter"].items()})
    optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"])
    return int(ckpt["step"]), json.loads(ckpt["metrics"])
