"""The training benchmark's accounting: the FLOPs it divides by are those a step's products compute."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from llama_adapter.backends.cpu import kernels
from llama_adapter.training.loss import batch_loss

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import train_throughput  # noqa: E402


def test_step_flops_are_the_weight_products_a_step_computes(monkeypatch: pytest.MonkeyPatch) -> None:
    """`step_flops`' projections and head (forward through all 30 layers; backward input gradients through the head,
    the layers above the lowest adapted one, and in that one only the MLP and the output projection) are what
    torch's FLOP counter sees the step's matrix products compute, once two things outside the model's count are
    added: each sequence's last position has no label (its head row is skipped both ways), and the adapter's own
    K/V projections of its prompts (forward and backward in every adapted layer)."""
    monkeypatch.setattr(kernels, "TRAINING_PACK_MIN_ROWS", 1 << 30)  # plain aten products, which the counter sees
    batch, seq = 1, 64
    model = train_throughput.build_ours(torch.bfloat16)
    model.train()
    ids = train_throughput._batch(batch, seq)
    with FlopCounterMode(display=False) as counter:
        loss, n = batch_loss(model, "default", {"input_ids": ids, "labels": ids.clone()})
        (loss / n).backward()
    counted = counter.get_flop_counts()["Global"]
    products = sum(v for k, v in counted.items() if str(k) in ("aten.mm", "aten.addmm"))
    weights, attention = train_throughput.step_flops_parts(batch, seq)
    shape = train_throughput.SHAPE
    d, kv = shape["dim"], shape["n_kv_heads"] * shape["dim"] // shape["n_heads"]
    unlabeled = 2 * 2 * batch * d * shape["vocab_size"]
    prompts = train_throughput.L * 2 * (2 * train_throughput.K * d * 2 * kv)
    assert products == weights - unlabeled + prompts, (products, weights - unlabeled + prompts)
    assert 0 < attention < 0.1 * weights
