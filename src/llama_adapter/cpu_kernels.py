"""CPU fast paths for the frozen base's non-matmul work, equal in value to the stock PyTorch ops.

Training: an adapter's backward pass runs through every frozen layer above the lowest adapted one, so on a CPU
the elementwise work and attention of that pass cost as much as the matmuls they sit between
(`benchmarks/train_throughput.py`). Autograd's generic graph for an RMSNorm is eight kernels forward and more
backward; PyTorch's flash-attention kernel for CPUs is tuned for long sequences and slow at 256 tokens with
64-wide heads, and its per-call cost dominates when decoding one token per row against a short cache.
These functions compute the same values with fewer, larger kernels. GPUs keep the stock paths: there the
fused SDPA kernels win.

Decoding reads every weight once per step for a few rows, and a bf16 `F.linear` against a plain [out, in] weight
is ~1.5x slower at that than oneDNN's product with the weight laid out once in its own blocked layout (the one
inductor's freezing pass uses). `pack_linear` makes that layout for a frozen weight; `linear` then gives
bit-identical results, and falls back to `F.linear` whenever the pack no longer matches its weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from .zero_init_attention import PromptKV


def use_cpu_training_kernels(x: Tensor) -> bool:
    return x.device.type == "cpu" and torch.is_grad_enabled()


@dataclass
class PackedWeight:
    """A frozen weight in oneDNN's blocked layout, valid while the weight tensor is the one it was made from."""

    packed: Tensor
    source: Tensor
    version: int
    data_ptr: int

    def valid_for(self, weight: Tensor) -> bool:
        return (weight is self.source and weight._version == self.version and weight.data_ptr() == self.data_ptr
                and weight.dtype == self.packed.dtype)


def can_pack(weight: Tensor) -> bool:
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and weight.dim() == 2
            and not weight.is_inference()  # no version counter to tell a changed weight
            and torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_reorder_linear_weight")
            and hasattr(mkldnn, "_linear_pointwise") and bool(mkldnn._is_mkldnn_bf16_supported()))


def pack_linear(weight: Tensor) -> PackedWeight | None:
    """The decode-time layout of a frozen [out, in] weight, or None where there is no oneDNN bf16 path."""
    if not can_pack(weight):
        return None
    with torch.no_grad():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
    return PackedWeight(packed, weight, weight._version, weight.data_ptr())


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, packed: PackedWeight | None) -> Tensor:
    """F.linear, through the packed weight when there is a valid one and no gradient is wanted."""
    if (packed is not None and not torch.is_grad_enabled() and x.dtype == weight.dtype
            and packed.valid_for(weight)):
        return torch.ops.mkldnn._linear_pointwise(x, packed.packed, bias, "none", [], "")
    return F.linear(x, weight, bias)


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
    return _attend(q * (1.0 / math.sqrt(q.shape[-1])), k, v, mask)


def _attend(q_scaled: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    scores = torch.matmul(q_scaled, k.transpose(-1, -2))
    if mask is not None:
        scores = torch.where(mask, scores, float("-inf"))
    return torch.matmul(F.softmax(scores, -1), v)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, prompts: PromptKV | None = None) -> Tensor:
    """One new token per row: attention over its cached keys plus the gated prompt attention of zero-init
    adapters (equation 8), in one pass. q [B, H, 1, d]; k/v [B, n_kv, L, d]; mask [B, 1, 1, L].

    Computed in the cache's dtype: the decoder keeps a CPU cache in fp32 because oneDNN's bf16 batched matmul
    costs ~200 us per call at these sizes (a new kernel for every cache length) and MKL's fp32 one ~20 us.
    """
    B, H, _, d = q.shape
    n_kv = k.shape[1]
    qg = q.view(B, n_kv, H // n_kv, d).to(k.dtype) * (1.0 / math.sqrt(d))  # a group's query heads are its rows
    y = _attend(qg, k, v, mask)
    if prompts is not None:
        gate = prompts.gate.view(B, n_kv, H // n_kv, 1)
        y = y + _attend(qg.to(prompts.k.dtype), prompts.k, prompts.v, prompts.mask) * gate
    return y.view(B, H, 1, d).to(q.dtype)
