"""`loss.png`: the train and validation loss and the learning rate of a run, against the step.

Written once at the end of a run by rank 0, from the same metrics as `metrics.jsonl`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def plot_losses(metrics: list[dict[str, Any]], path: Path) -> None:
    import matplotlib  # a dependency; imported here so that training starts without it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [m for m in metrics if "loss" in m]
    va = [m for m in metrics if m.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if tr:
        ax.plot([m["step"] for m in tr], [m["loss"] for m in tr], label="train loss", lw=1)
    if va:
        ax.plot([m["step"] for m in va], [m["val_loss"] for m in va], "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    if tr:
        ax2.plot([m["step"] for m in tr], [m["lr"] for m in tr], color="gray", ls="--", lw=1, label="lr")
    ax2.set_ylabel("lr")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper right")
    fig.tight_layout()
    tmp = path.with_name("tmp-" + path.name)
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
