"""A fused decode step for bf16 models on CPUs, on the C++ kernels of `cpu_kernels.native()`.

At one new token per row the eager forward runs ~80 small PyTorch ops per layer whose fixed cost outweighs their
arithmetic. The step below makes seven calls per layer: RMSNorm (fused with the residual add), the four
projections (through the packed weights), SwiGLU, and one attention kernel that rotates q/k, writes the cache and
adds the gated prompt attention of zero-init adapters (equation 8). Where the kernels are unavailable, decoding
takes the model's forward, which computes the same thing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from llama_adapter.backends.cpu import kernels as cpu_kernels
from llama_adapter.model import KVCache, Transformer
from llama_adapter.zero_init_attention import PromptKV


def supported(model: Transformer) -> bool:
    """Whether `decode_step` applies: a bf16 model on the CPU with an even head_dim, and the kernels built."""
    w = model.tok_embeddings.weight
    return (
        w.device.type == "cpu"
        and w.dtype == torch.bfloat16
        and model.config.head_dim % 2 == 0
        and cpu_kernels.native() is not None
    )


class FusedPrompts:
    """A batch's prompt K/V laid out once for the kernel: per layer (k, v, gate fp32 [B, H], mask [B, K] | None)."""

    def __init__(self, pkv: dict[int, PromptKV] | None) -> None:
        self.layers: dict[int, tuple[Tensor, Tensor, Tensor, Tensor | None]] = {}
        for li, p in (pkv or {}).items():
            if p.random_init:
                raise ValueError("rand-init adapters take the model's forward")
            B, K = p.k.shape[0], p.k.shape[2]
            mask = None if p.mask is None else p.mask.expand(B, 1, 1, K).reshape(B, K).contiguous()
            self.layers[li] = (p.k.float().contiguous(), p.v.float().contiguous(), p.gate.float().contiguous(), mask)


def _linear(x: Tensor, m: nn.Linear) -> Tensor:
    packed = getattr(m, "packed", None)  # backends.cpu.PackedLinear
    if packed is None:  # not packed, or a projection with its own product (llama_adapter.quantize): its forward
        return m(x)
    return cpu_kernels.linear(x, m.weight, m.bias, packed)


@torch.no_grad()
def decode_step(
    model: Transformer,
    tokens: Tensor,
    pos: Tensor,
    cache: KVCache,
    prompts: FusedPrompts,
    head: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Logits [B, vocab] for one new token per row: tokens [B], pos [B] (each row's position), cache rows 0..B-1
    (fp32). `head` computes the logits from the final hidden states (default: the model's output projection)."""
    ext = cpu_kernels.native()
    assert ext is not None
    layers = model.layers
    cos, sin = model.rope(pos)
    cos, sin = cos.to(torch.bfloat16), sin.to(torch.bfloat16)
    x = model.tok_embeddings(tokens)  # [B, dim], the residual stream, updated in place
    eps = model.norm.eps
    h = ext.rms_norm(x, layers[0].attention_norm.weight, eps)
    for i, layer in enumerate(layers):
        a, ff = layer.attention, layer.feed_forward
        p = prompts.layers.get(i)
        pk, pv, gate, mask = p if p is not None else (None, None, None, None)
        y = ext.attention(_linear(h, a.wqkv), cos, sin, cache.k[i], cache.v[i], pos, a.n_heads, pk, pv, gate, mask)
        h = ext.add_rms_norm(x, _linear(y, a.wo), layer.ffn_norm.weight, eps)
        y = _linear(ext.silu_mul(_linear(h, ff.w13)), ff.w2)
        nxt = layers[i + 1].attention_norm.weight if i + 1 < len(layers) else model.norm.weight
        h = ext.add_rms_norm(x, y, nxt, eps)
    return (head or model.logits)(h)
