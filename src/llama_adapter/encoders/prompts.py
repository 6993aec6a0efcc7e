"""Gated prompts in a Hugging Face encoder's attention: the method of `zero_init_attention`, attached by hooks.

For each of the top L layers of a tower (a ViT, a RoBERTa/BERT encoder, CLIP's vision or text tower) K learnable
prompts P_l [K, dim] are projected through the layer's own frozen key/value projections (eq. 2-4, the method
module's `prompt_kv`), and every token attends to them through a separate softmax scaled per head by a gate that
starts at zero (eq. 5-8, `ZeroInitAttention.gated_prompt_attention`): the same code that adapts LLaMA.

How it is attached, and why that way: `transformers`' own token attention is left exactly as it is (its mask, its
attention implementation, its scaling). A forward hook on the query projection keeps the queries; a forward
pre-hook on the output projection (ViT `o_proj`, CLIP `out_proj`, BERT-style `attention.output.dense`) adds the
gated prompt term to the context it receives. With the gate at zero the term is exactly 0, so the output
projection sees bit-for-bit the context it would have seen: the adapted encoder equals the unmodified one.

`init="random"` is the comparison baseline (VPT-deep / P-tuning v2 style, the paper's Table 5): no gate, and one
joint softmax over [prompts; tokens] (`ZeroInitAttention.single_softmax`). It needs the tokens' keys and values
(kept by hooks on k/v) and the padding mask, which the task model hands over with `padding(mask)`; the context
`transformers` computed is replaced (computed and discarded: the price of not editing its modules).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from llama_adapter.zero_init_attention import AdapterConfig, PromptKV, ZeroInitAttention, prompt_kv

# The equations, once: `ZeroInitAttention` has no parameters, so one instance serves every layer of every model.
EQUATIONS = ZeroInitAttention()


@dataclass
class PromptConfig(AdapterConfig):
    """K prompts in each of the top L layers; the gate function; "zero" (the method) or "random" (baseline).

    The LLaMA adapter's `AdapterConfig` (same fields, same checks) with defaults sized for small encoders."""

    prompt_length: int = 8
    layers: int = 4


@dataclass
class AttentionSite:
    """One layer's self-attention, as the method needs it: the four projections, the heads, the token mask kind."""

    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    out: nn.Linear  # its input is the heads' context, concatenated: [B, T, heads * head_dim]
    n_heads: int
    head_dim: int
    causal: bool = False  # CLIP's text tower: tokens attend to earlier tokens only (prompts: to all)


def _layers(tower: nn.Module) -> list[nn.Module]:
    for path in ("layers", "encoder.layer", "encoder.layers"):
        mod: Any = tower
        for part in path.split("."):
            mod = getattr(mod, part, None)
        if isinstance(mod, nn.ModuleList):
            return list(mod)
    raise TypeError(f"{type(tower).__name__}: no encoder layers found (expected a ViT, BERT/RoBERTa or CLIP tower)")


def attention_sites(tower: nn.Module, causal: bool = False) -> list[AttentionSite]:
    """The self-attention of every layer of a `transformers` encoder tower, bottom to top.

    Three layouts cover the families: CLIP (`layer.self_attn` with q/k/v/out_proj), ViT (`layer.attention` with
    q/k/v/o_proj) and BERT/RoBERTa (`layer.attention.self.query/key/value`, `layer.attention.output.dense`).
    """
    sites = []
    for layer in _layers(tower):
        a: Any = getattr(layer, "self_attn", None)
        if a is not None:  # CLIP
            sites.append(AttentionSite(a.q_proj, a.k_proj, a.v_proj, a.out_proj, a.num_heads, a.head_dim, causal))
            continue
        a = getattr(layer, "attention", None)
        if a is not None and hasattr(a, "self") and hasattr(a, "output"):  # BERT, RoBERTa
            s = a.self
            sites.append(
                AttentionSite(
                    s.query, s.key, s.value, a.output.dense, s.num_attention_heads, s.attention_head_size, causal
                )
            )
        elif a is not None and hasattr(a, "q_proj"):  # ViT
            sites.append(
                AttentionSite(a.q_proj, a.k_proj, a.v_proj, a.o_proj, a.num_attention_heads, a.head_dim, causal)
            )
        else:
            raise TypeError(f"{type(layer).__name__}: unknown attention layout")
    return sites


def _heads(x: Tensor, n_heads: int, head_dim: int) -> Tensor:
    """[B, T, H * d] -> [B, H, T, d]."""
    B, T, _ = x.shape
    return x.view(B, T, n_heads, head_dim).transpose(1, 2)


class GatedPrompts(nn.Module):
    """The trainable state for one tower: prompts [L, K, dim] and (zero-init) per-head gates [L, heads], both fp32.

    `install(sites)` attaches the hooks to the top L sites; `remove()` takes them off again. Layers below the top
    L are not touched. The module holds the hook state of the forward in flight (queries, and for the baseline the
    tokens' keys/values) only until the output projection has used it.
    """

    def __init__(self, cfg: PromptConfig, sites: list[AttentionSite], dim: int) -> None:
        super().__init__()
        if cfg.layers > len(sites):
            raise ValueError(f"prompts want {cfg.layers} layers but the tower has only {len(sites)}")
        heads = {s.n_heads for s in sites}
        if len(heads) != 1:
            raise ValueError(f"layers with different head counts {sorted(heads)} are not supported")
        self.cfg = cfg
        self.sites = sites[len(sites) - cfg.layers :]
        self.prompts = nn.Parameter(torch.randn(cfg.layers, cfg.prompt_length, dim))
        self.gates: nn.Parameter | None = (
            nn.Parameter(torch.zeros(cfg.layers, heads.pop())) if cfg.init == "zero" else None
        )
        self._handles: list[RemovableHandle] = []
        self._kept: dict[tuple[int, str], Tensor] = {}
        self._padding: Tensor | None = None

    def gate_values(self) -> Tensor:
        """g_l per head, as it enters eq. 8 (tanh(g) or g)."""
        if self.gates is None:
            raise ValueError("rand-init prompts have no gate")
        return torch.tanh(self.gates) if self.cfg.gate == "tanh" else self.gates

    # ---- hooks --------------------------------------------------------------------------------------------
    def install(self) -> GatedPrompts:
        if self._handles:
            return self
        for i, site in enumerate(self.sites):
            kinds = ("q",) if self.gates is not None else ("q", "k", "v")
            for kind in kinds:
                self._handles.append(getattr(site, kind).register_forward_hook(self._keeper(i, kind)))
            self._handles.append(site.out.register_forward_pre_hook(self._adder(i)))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._kept.clear()

    def _keeper(self, i: int, kind: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Tensor) -> None:
            self._kept[(i, kind)] = output

        return hook

    def _adder(self, i: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            return (self.context(i, args[0]), *args[1:])

        return hook

    @contextmanager
    def padding(self, mask: Tensor | None) -> Iterator[None]:
        """Hand the tokens' padding mask [B, T] (1 = token) to the baseline's joint softmax for one forward."""
        self._padding = mask
        try:
            yield
        finally:
            self._padding = None
            self._kept.clear()

    # ---- the method ---------------------------------------------------------------------------------------
    def layer_prompt_kv(self, i: int, batch: int) -> tuple[Tensor, Tensor]:
        """Eq. 2-4 for adapted layer i: prompt keys/values [B, H, K, d] through the layer's frozen k/v."""
        s = self.sites[i]
        k, v = prompt_kv(self.prompts[i][None], s.k.weight, s.v.weight, s.k.bias, s.v.bias, s.n_heads, s.head_dim)
        return k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)

    def context(self, i: int, ctx: Tensor) -> Tensor:
        """The heads' context [B, T, H*d] that layer i's output projection receives, with the prompts' part.

        zero-init: ctx + g_l * softmax(q K_p^T / sqrt(d)) V_p (eq. 8). rand-init: softmax over [prompts; tokens]
        in place of `transformers`' token attention.
        """
        s = self.sites[i]
        q = _heads(self._kept.pop((i, "q")), s.n_heads, s.head_dim)
        B, H, T, d = q.shape
        kp, vp = self.layer_prompt_kv(i, B)
        if self.gates is not None:
            gate = self.gate_values()[i].to(q.dtype).expand(B, H)
            out = EQUATIONS.gated_prompt_attention(q, PromptKV(kp.to(q.dtype), vp.to(q.dtype), gate))
            return ctx + out.transpose(1, 2).reshape(B, T, H * d).to(ctx.dtype)
        k = _heads(self._kept.pop((i, "k")), s.n_heads, s.head_dim)
        v = _heads(self._kept.pop((i, "v")), s.n_heads, s.head_dim)
        allowed = torch.ones(B, 1, T, T, dtype=torch.bool, device=q.device)
        if self._padding is not None:
            allowed = allowed & self._padding.to(device=q.device, dtype=torch.bool)[:, None, None, :]
        if s.causal:
            allowed = allowed & torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        pkv = PromptKV(kp.to(q.dtype), vp.to(q.dtype), q.new_zeros(B, H), random_init=True)
        out = EQUATIONS.single_softmax(q, k, v, allowed, pkv)
        return out.transpose(1, 2).reshape(B, T, H * d).to(ctx.dtype)


def attach_prompts(tower: nn.Module, cfg: PromptConfig, dim: int, causal: bool = False) -> GatedPrompts:
    """New prompts for the top `cfg.layers` layers of `tower`, hooks installed."""
    return GatedPrompts(cfg, attention_sites(tower, causal), dim).install()
