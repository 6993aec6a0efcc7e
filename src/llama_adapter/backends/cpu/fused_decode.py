"""A fused decode step for bf16 models on CPUs, on the C++ kernels of `cpu_kernels.native()`.

At one new token per row the eager forward runs ~80 small PyTorch ops per layer whose fixed cost outweighs their
arithmetic. The step below makes seven kernel calls per layer: RMSNorm (fused with the residual add), the four
projections (through the packed weights), SwiGLU, and one attention kernel that rotates q/k, writes the cache and
adds the gated prompt attention of zero-init adapters (equation 8). Where every projection has a C++ kernel (bf16
packs, int8 and int4 bases) the whole step runs in C++ (`DecodePlan`, built once per batch: the embedding rows, the
RoPE values, the same calls in the same order, the output head and greedy decoding's argmax, without the interpreter
between them); otherwise the loop runs here. Where the kernels are unavailable, decoding takes the model's forward,
which computes the same thing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
    """A batch's prompt K/V laid out once for the kernel: per layer (k, v, gate fp32 [B, H], mask [B, K] | None),
    and the C++ plan of the batch's steps once the first step made it (for one cache)."""

    def __init__(self, pkv: dict[int, PromptKV] | None) -> None:
        # (the cache it writes, the plan or None: the Python loop, whether the plan computes the logits too)
        self.plan: tuple[KVCache, Any, bool] | None = None
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


def _plan(
    model: Transformer,
    rows: int,
    cache: KVCache,
    prompts: FusedPrompts,
    head_projection: Callable[[], cpu_kernels.Projection | None] | None = None,
) -> Any | None:
    """The C++ plan of this batch's steps, or None where a projection has no C++ kernel (an unpacked weight, another
    quantization) or the batch is larger than the kernels' decode-sized inputs (the Python loop then takes F.linear).
    With `head_projection` giving one, the plan computes the logits too."""
    if prompts.plan is not None and prompts.plan[0] is cache:
        return prompts.plan[1]
    ext = cpu_kernels.native()
    prompts.plan = (cache, None, False)
    if ext is None or not hasattr(ext, "DecodePlan") or rows > cpu_kernels.BLOCKED_MAX_ROWS:
        return None
    ps: list[cpu_kernels.Projection] = []
    for layer in model.layers:
        for m in (layer.attention.wqkv, layer.attention.wo, layer.feed_forward.w13, layer.feed_forward.w2):
            p = getattr(m, "decode_projection", lambda: None)()
            if p is None:
                return None
            ps.append(p)
    norms = [n.weight for layer in model.layers for n in (layer.attention_norm, layer.ffn_norm)]
    per_layer = [prompts.layers.get(i, (None, None, None, None)) for i in range(len(model.layers))]
    plan = ext.DecodePlan(
        [p.kind for p in ps],
        [p.n for p in ps],
        [p.group for p in ps],
        [p.a for p in ps],
        [p.b for p in ps],
        [p.bias for p in ps],
        [*norms, model.norm.weight],
        model.norm.eps,
        model.layers[0].attention.n_heads,
        list(cache.k),
        list(cache.v),
        *([lp[j] for lp in per_layer] for j in range(4)),
    )
    head = head_projection() if head_projection is not None else None
    h = head or cpu_kernels.Projection(-1, torch.empty(0), torch.empty(0), None, 0)
    plan.set_ends(model.tok_embeddings.weight, *model.rope_table(), h.kind, h.n, h.group, h.a, h.b, h.bias)
    plan.set_window(model.config.sliding_window or 0)
    prompts.plan = (cache, plan, head is not None)
    return plan


@torch.no_grad()
def decode_step(
    model: Transformer,
    tokens: Tensor,
    pos: Tensor,
    cache: KVCache,
    prompts: FusedPrompts,
    head: Callable[[Tensor], Tensor] | None = None,
    head_projection: Callable[[], cpu_kernels.Projection | None] | None = None,
    advance: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Logits [B, vocab] for one new token per row: tokens [B], pos [B] (each row's position), cache rows 0..B-1
    (bf16 or fp32), and their argmax [B] where the C++ plan computed it (else None). `head` computes the logits from the
    final hidden states (default: the model's output projection); `head_projection`, where it gives one, is the same
    head for the C++ plan, which then takes the whole step. With `advance` (tokens and pos contiguous), where the
    plan computed the argmax it also wrote it into `tokens` and added 1 to `pos`, in place (a greedy batch's next
    inputs, without the tensor ops between steps); elsewhere both are left as they were."""
    ext = cpu_kernels.native()
    assert ext is not None
    plan = _plan(model, tokens.shape[0], cache, prompts, head_projection)
    if plan is not None:
        out = plan.step(tokens, pos, advance)  # embeddings, RoPE and the layers (and the head and argmax) in one call
        return (out[0], out[1]) if len(out) == 2 else ((head or model.logits)(out[0]), None)
    layers = model.layers
    cos, sin = model.rope(pos)
    cos, sin = cos.to(torch.bfloat16), sin.to(torch.bfloat16)
    x = model.tok_embeddings(tokens)  # [B, dim], the residual stream, updated in place
    eps, window = model.norm.eps, model.config.sliding_window or 0
    h = ext.rms_norm(x, layers[0].attention_norm.weight, eps)
    for i, layer in enumerate(layers):
        a, ff = layer.attention, layer.feed_forward
        p = prompts.layers.get(i)
        pk, pv, gate, mask = p if p is not None else (None, None, None, None)
        qkv = _linear(h, a.wqkv)
        y = ext.attention(qkv, cos, sin, cache.k[i], cache.v[i], pos, a.n_heads, pk, pv, gate, mask, window)
        h = ext.add_rms_norm(x, _linear(y, a.wo), layer.ffn_norm.weight, eps)
        y = _linear(ext.silu_mul(_linear(h, ff.w13)), ff.w2)
        nxt = layers[i + 1].attention_norm.weight if i + 1 < len(layers) else model.norm.weight
        h = ext.add_rms_norm(x, y, nxt, eps)
    return (head or model.logits)(h), None
