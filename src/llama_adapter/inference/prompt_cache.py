"""Prompt keys/values per adapter, projected once and reused across requests until the adapter or base changes.

A request without an image needs its adapter's prompt K/V for every adapted layer (eq. 2-4), which depends only
on the adapter's prompts and gates and on the frozen k/v projections. `PromptKVCache` keeps them per adapter
object, keyed also on the storage and version counter of every tensor they come from, so training or reloading
either one (in place or not) is seen, and a removed or replaced adapter's entry goes with the adapter object.
"""

from __future__ import annotations

import weakref
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from llama_adapter.model import Transformer
from llama_adapter.zero_init_attention import PromptKV

PKV = dict[int, PromptKV]


def to_dtype(pkv: PKV | None, dtype: torch.dtype) -> PKV | None:
    """The same prompt K/V with keys/values in `dtype` (the decoder's cache dtype)."""
    if pkv is None:
        return None
    return {li: replace(p, k=p.k.to(dtype), v=p.v.to(dtype)) for li, p in pkv.items()}


class PromptKVCache:
    def __init__(self) -> None:
        self._entries: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[Any, ...], PKV | None]] = (
            weakref.WeakKeyDictionary()
        )

    def get(self, model: Transformer, name: str, dtype: torch.dtype) -> PKV | None:
        """Adapter `name`'s prompt K/V ([1, ...] per layer, in `dtype`), projected now only if anything changed."""
        adapter = model.adapters[name]
        layers = model.layers[adapter.first_layer :]
        tensors = (adapter.prompts, adapter.gates, *(layer.attention.wqkv.weight for layer in layers))
        key = (id(model), dtype, *((t.data_ptr(), t._version) for t in tensors))
        hit = self._entries.get(adapter)
        if hit is None or hit[0] != key:
            hit = self._entries[adapter] = (key, to_dtype(model.prompt_kv(name, 1), dtype))
        return hit[1]

    def forget(self, model: Transformer, name: str) -> None:
        """Drop adapter `name`'s entry (requests already decoding keep theirs)."""
        if name in model.adapters:
            self._entries.pop(model.adapters[name], None)


SHARED = PromptKVCache()  # the default for every decoder: `generate` calls reuse each other's projections
