"""Many adapters in one batch ("plug with expertise"): which adapter each row uses, and the batch's prompt K/V.

A forward pass may give every batch row its own adapter, or none. Per adapted layer the rows' prompt keys/values
and gates are assembled into one `PromptKV` by `batch_prompt_kv`, the only place that does it: rows without an
adapter at a layer get zero keys/values and gate 0 (so they compute exactly what the base computes), and prompts
shorter than the longest in the batch are padded and masked. `PromptPlan` is the per-batch adapter mapping, worked
out once per forward (training) or once per request (decoding); `can_share_batch` is the one rule on mixing.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from llama_adapter.config import ModelConfig
from llama_adapter.zero_init_attention import Adapter, PromptKV, prompt_kv

AdapterSpec = str | None | Sequence[str | None]
KVWeights = tuple[Tensor, Tensor, Tensor | None, Tensor | None]  # frozen wk, wv, bk, bv of one layer
LazyPromptKV = Callable[[KVWeights], PromptKV | None]  # a layer's prompt K/V, projected inside its forward
R = TypeVar("R")


class eager_under_compile(Generic[R]):  # noqa: N801  # (used as a decorator)
    """A method decorator: `torch.compiler.disable` for the method, made when the method is first looked up after
    `torch._dynamo` is loaded. The decorator applied at class definition imports `torch._dynamo`, about a second of
    `import llama_adapter` (of every command, `--help` included) that only a caller who compiles needs; and nothing
    can be tracing the method before `torch._dynamo` is loaded (`torch.compile` loads it when called)."""

    def __init__(self, fn: Callable[..., R]) -> None:
        self.fn = fn
        self.disabled: Callable[..., R] | None = None
        self.__doc__ = fn.__doc__

    def __get__(self, obj: Any, objtype: type | None = None) -> Callable[..., R]:
        fn = self.fn
        if "torch._dynamo" in sys.modules:
            if self.disabled is None:
                self.disabled = torch.compiler.disable(self.fn)
            fn = self.disabled
        return fn if obj is None else types.MethodType(fn, obj)


def can_share_batch(adapters: Sequence[Adapter | None]) -> bool:
    """Whether rows with these adapters (None: the base alone) may decode in one batch.

    A rand-init adapter (Table 5's baseline) has one softmax over [prompts; tokens] and no gate that could switch
    its prompts off for another row, so it shares a batch only with rows of the same adapter.
    """
    if not any(a is not None and a.cfg.init == "random" for a in adapters):
        return True
    return all(a is adapters[0] for a in adapters)


def batch_prompt_kv(groups: Sequence[tuple[PromptKV, Tensor]], batch_size: int) -> PromptKV:
    """One adapted layer's `PromptKV` for a whole batch from per-adapter ones.

    groups: (prompt K/V with one row or one row per listed batch row, the batch rows [n] that use it). One group
    over every row is expanded without a copy; otherwise unlisted rows get zero K/V and gate 0, and shorter
    prompts are padded and masked. Rand-init groups (one adapter; its requests with images project their own) must
    cover every row with one prompt length. Differentiable (training batches may mix adapters).
    """
    first, rows0 = groups[0]
    random_init = first.random_init
    if any(p.random_init for p, _ in groups):  # one softmax over [prompts; tokens]: no gate to switch a row off
        every_row = sum(len(rows) for _, rows in groups) == batch_size
        one_length = len({p.k.shape[2] for p, _ in groups}) == 1
        if not (all(p.random_init for p, _ in groups) and every_row and one_length):
            raise ValueError("a rand-init adapter cannot share a batch with other adapters or base rows")
    if len(groups) == 1 and len(rows0) == batch_size:
        ex = (batch_size, -1, -1, -1)
        mask = None if first.mask is None else first.mask.expand(batch_size, -1, -1, -1)
        return PromptKV(first.k.expand(ex), first.v.expand(ex), first.gate.expand(batch_size, -1), random_init, mask)
    kmax = max(p.k.shape[2] for p, _ in groups)
    _, n_kv, _, hd = first.k.shape
    k = first.k.new_zeros(batch_size, n_kv, kmax, hd)
    v = first.v.new_zeros(batch_size, n_kv, kmax, hd)
    gate = first.gate.new_zeros(batch_size, first.gate.shape[1])
    need_mask = any(p.k.shape[2] < kmax or p.mask is not None for p, _ in groups)
    mask = torch.ones(batch_size, 1, 1, kmax, dtype=torch.bool, device=k.device) if need_mask else None
    for p, rows in groups:
        n, K = len(rows), p.k.shape[2]
        pad = (0, 0, 0, kmax - K)
        k = k.index_copy(0, rows, F.pad(p.k.to(k.dtype), pad).expand(n, -1, -1, -1))
        v = v.index_copy(0, rows, F.pad(p.v.to(v.dtype), pad).expand(n, -1, -1, -1))
        gate = gate.index_copy(0, rows, p.gate.to(gate.dtype).expand(n, -1))
        if mask is not None:
            m = F.pad(p.mask[:1] if p.mask is not None else mask.new_ones(1, 1, 1, K), (0, kmax - K), value=False)
            mask = mask.index_copy(0, rows, m.expand(n, -1, -1, -1))
    return PromptKV(k, v, gate, random_init=random_init, mask=mask)


@dataclass
class PromptPlan:
    """Which adapter each batch row uses; `layer(li, kv_weights)` projects that layer's prompts for the batch.

    Per layer, so the projection can run inside the layer's own forward (where FSDP has unsharded its
    frozen k/v weights) or all at once before decoding (`Transformer.prompt_kv`).
    """

    config: ModelConfig
    adapters: dict[str, Adapter]
    group_rows: dict[str, Tensor]
    offsets: dict[str, Tensor]  # eq. 10: per-row image tokens [n_rows, dim] added to the adapter's prompts
    batch_size: int

    @classmethod
    def build(
        cls,
        config: ModelConfig,
        loaded: Mapping[str, Adapter],
        adapter: AdapterSpec,
        batch_size: int,
        image_features: Tensor | None,
        device: torch.device,
    ) -> PromptPlan | None:
        """The plan for `adapter` (a name, None or one entry per row); None when no row has an adapter."""
        rows = [adapter] * batch_size if adapter is None or isinstance(adapter, str) else list(adapter)
        if len(rows) != batch_size:
            raise ValueError(f"{len(rows)} adapter entries for a batch of {batch_size}")
        names = list(dict.fromkeys(r for r in rows if r is not None))
        if not names:
            return None
        for n in names:
            if n not in loaded:
                raise KeyError(f"no adapter named {n!r} (loaded: {', '.join(loaded) or 'none'})")
        if not can_share_batch([loaded[r] if r is not None else None for r in rows]):
            raise ValueError("a rand-init adapter cannot share a batch with other adapters or base rows")
        adapters = {n: loaded[n] for n in names}
        offsets = {}
        if image_features is not None:
            has_image = (image_features != 0).any(-1, keepdim=True)  # all-zero rows: no image
            for n, a in adapters.items():
                if a.visual_proj is not None:
                    offsets[n] = a.visual_proj(image_features.float()) * has_image
        group_rows = {n: torch.tensor([i for i, r in enumerate(rows) if r == n], device=device) for n in names}
        return cls(config, adapters, group_rows, offsets, batch_size)

    @property
    def first(self) -> int:
        return min(a.first_layer for a in self.adapters.values())

    # Kept out of torch.compile'd blocks (`finetune --compile`): traced, the layer index and the adapters' first
    # layers became guards of each block's graph, so every adapted layer recompiled until dynamo's limit (8) and
    # the rest ran uncompiled. Outside, one graph serves every block; this is a few K-row products, run eagerly.
    @eager_under_compile
    def layer(self, li: int, kv_weights: KVWeights) -> PromptKV | None:
        wk, wv, bk, bv = kv_weights
        c = self.config
        groups = []
        for n, a in self.adapters.items():
            if li < a.first_layer:
                continue
            j, rows = li - a.first_layer, self.group_rows[n]
            p = a.prompts[j][None]  # [1, K, dim]
            if n in self.offsets:
                p = p + self.offsets[n].index_select(0, rows)[:, None, :]
            pk, pv = prompt_kv(p, wk, wv, bk, bv, c.n_kv_heads, c.head_dim)
            groups.append((PromptKV(pk, pv, a.gate_values()[j][None], random_init=a.cfg.init == "random"), rows))
        return batch_prompt_kv(groups, self.batch_size) if groups else None
