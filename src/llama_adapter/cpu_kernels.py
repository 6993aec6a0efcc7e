"""CPU fast paths for the frozen base's non-matmul work, equal in value to the stock PyTorch ops.

Training: an adapter's backward pass runs through every frozen layer above the lowest adapted one, so on a CPU
the elementwise work and attention of that pass cost as much as the matmuls they sit between
(`benchmarks/train_throughput.py`). Autograd's generic graph for an RMSNorm is eight kernels forward and more
backward; PyTorch's flash-attention kernel for CPUs is tuned for long sequences and slow at 256 tokens with
64-wide heads, and its per-call cost dominates when decoding one token per row against a short cache.
These functions compute the same values with fewer, larger kernels. GPUs keep the stock paths: there the
fused SDPA kernels win.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def use_cpu_training_kernels(x: Tensor) -> bool:
    return x.device.type == "cpu" and torch.is_grad_enabled()


class _RMSNorm(torch.autograd.Function):
    """y = w * cast(x * rsqrt(mean(x^2) + eps)), statistics in fp32 (as Llama's reference does)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        xf = x.float()
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, weight, r)
        return weight * (xf * r).to(x.dtype)  # rounded twice, like the reference and the inference path

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        x, weight, r = ctx.saved_tensors
        xhat = x.float() * r  # (not in place: .float() of an fp32 tensor is the tensor itself)
        dxhat = dy.float() * weight.float()
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (dy.float() * xhat.to(x.dtype).float()).flatten(0, -2).sum(0).to(weight.dtype)
        proj = (dxhat * xhat).mean(-1, keepdim=True)
        dx = dxhat.sub_(xhat.mul_(proj)).mul_(r).to(x.dtype) if ctx.needs_input_grad[0] else None
        return dx, dw, None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return _RMSNorm.apply(x, weight, eps)


_causal_bias: dict[tuple[int, int, torch.dtype, torch.device], Tensor] = {}


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal softmax(q k^T / sqrt(d)) v for q [B, H, T, d], k/v [B, n_kv, T, d] (grouped-query heads).

    Query heads sharing a key head are stacked along the sequence axis, so each key/value head takes part in
    one batched matmul without being repeated; the scale and the causal mask ride in the same baddbmm.
    """
    B, H, T, d = q.shape
    n_kv = k.shape[1]
    rep = H // n_kv
    key = (T, rep, q.dtype, q.device)
    bias = _causal_bias.get(key)
    if bias is None:
        if len(_causal_bias) > 16:
            _causal_bias.clear()
        tri = torch.full((T, T), float("-inf"), device=q.device).triu_(1)
        bias = _causal_bias[key] = tri.to(q.dtype).repeat(rep, 1)  # [rep * T, T]
    qg = q.reshape(B * n_kv, rep * T, d)
    scores = torch.baddbmm(bias.expand(B * n_kv, -1, -1), qg, k.reshape(B * n_kv, T, d).transpose(1, 2),
                           alpha=1.0 / math.sqrt(d))
    return torch.bmm(torch.softmax(scores, -1), v.reshape(B * n_kv, T, d)).view(B, H, T, d)


def few_keys_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """softmax(q k^T / sqrt(d)) v against a few keys: q [B, n_kv, M, d], k/v [B, n_kv, K, d], mask broadcastable
    to [B, n_kv, M, K] (False = masked). Query heads of a key/value group are stacked in M by the caller."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(F.softmax(scores, -1), v)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """One new token per row against its cached keys: q [B, H, 1, d], k/v [B, n_kv, L, d], mask [B, 1, 1, L]."""
    B, H, _, d = q.shape
    n_kv = k.shape[1]
    qg = q.view(B, n_kv, H // n_kv, d)  # a group's query heads become its rows
    return few_keys_attention(qg, k, v, mask).view(B, H, 1, d)
