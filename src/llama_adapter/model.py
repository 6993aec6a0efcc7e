"""The frozen LLaMA-family decoder with zero-init attention adapters, in plain PyTorch.

RMSNorm, rotary embeddings (with Llama-3.1 scaling), SwiGLU, grouped-query attention, optional q/k/v bias,
tied or untied embeddings, and a static KV cache with per-row positions (rows of a batch may be at different
lengths, which is what batched and continuous decoding need). Adapters live in `model.adapters`; a forward
pass picks one per batch row.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama_adapter.backends.cpu import kernels as cpu_kernels
from llama_adapter.config import ModelConfig
from llama_adapter.zero_init_attention import Adapter, AdapterConfig, PromptKV, gated_prompt_attention, prompt_kv

AdapterSpec = str | None | Sequence[str | None]
LazyPromptKV = Callable[["Attention"], "PromptKV | None"]
_GQA_SDPA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if cpu_kernels.use_cpu_training_kernels(x):
            return cpu_kernels.rms_norm(x, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear that, once `Transformer.pack_for_decoding` packed its frozen weight, decodes through the pack."""

    packed: cpu_kernels.PackedWeight | None = None

    def forward(self, x: Tensor) -> Tensor:
        return cpu_kernels.linear(x, self.weight, self.bias, self.packed)


def rope_frequencies(cfg: ModelConfig, device: torch.device | None = None) -> Tensor:
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
    s = cfg.rope_scaling
    if s and s["rope_type"] == "linear":
        inv = inv / float(s["factor"])
    elif s and s["rope_type"] == "llama3":  # Llama-3.1: stretch low frequencies, keep high ones
        factor, lo, hi = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old = float(s["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = torch.where(is_mid, mid, scaled)
    return inv


def apply_rope(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """Rotate (x_i, x_{i+d/2}) pairs; `signed_sin` is [-sin, sin] so the half swap is a single roll."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


@dataclass
class KVCache:
    """Static, preallocated cache: k/v per layer [B, n_kv, max_len, head_dim]."""

    k: list[Tensor]
    v: list[Tensor]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.wqkv = Linear(cfg.dim, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.wo = Linear(self.q_size, cfg.dim, bias=False)

    def kv_weights(self) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        w, b, q = self.wqkv.weight, self.wqkv.bias, self.q_size
        wk, wv = w[q : q + self.kv_size], w[q + self.kv_size :]
        if b is None:
            return wk, wv, None, None
        return wk, wv, b[q : q + self.kv_size], b[q + self.kv_size :]

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: tuple[Tensor, Tensor, tuple[Tensor, Tensor], int] | None,
                pkv: PromptKV | LazyPromptKV | None) -> Tensor:
        if callable(pkv):
            pkv = pkv(self)
        B, T, _ = x.shape
        qk, v = self.wqkv(x).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        # one rotation for queries and keys together: [B, H + n_kv, T, d]
        qk = apply_rope(qk.view(B, T, self.n_heads + self.n_kv, self.head_dim).transpose(1, 2), cos, sin)
        q, k = qk.split([self.n_heads, self.n_kv], dim=1)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if cache is not None:  # write this step's k/v at each row's positions, read back the prefix
            kc, vc, (rows, pos), kv_len = cache
            kc.transpose(1, 2)[rows, pos] = k.transpose(1, 2).to(kc.dtype)
            vc.transpose(1, 2)[rows, pos] = v.transpose(1, 2).to(vc.dtype)
            k, v = kc[:B, :, :kv_len], vc[:B, :, :kv_len]
        # one new token per row against a cache on a CPU: cpu_kernels.decode_attention, in the cache's dtype
        decode_on_cpu = T == 1 and mask is not None and q.device.type == "cpu"
        if pkv is not None and pkv.random_init:  # Table-5 baseline: one softmax over [prompts; tokens]
            Kp = pkv.k.shape[2]
            k, v = torch.cat([pkv.k, k], dim=2), torch.cat([pkv.v, v], dim=2)
            causal = mask if mask is not None else torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            causal = causal.expand(B, 1, T, -1) if causal.dim() == 4 else causal.expand(B, 1, T, T)
            mask = torch.cat([causal.new_ones(B, 1, T, Kp), causal], dim=-1)
            y = cpu_kernels.decode_attention(q, k, v, mask) if decode_on_cpu else self._sdpa(q, k, v, mask, False)
        elif decode_on_cpu:
            y = cpu_kernels.decode_attention(q, k, v, mask, pkv)  # token and gated prompt attention at once
        else:
            y = self._sdpa(q, k, v, mask, causal=mask is None and T > 1)
            if pkv is not None:
                y = y + gated_prompt_attention(q, pkv)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.q_size))

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        if causal and mask is None and cpu_kernels.use_cpu_training_kernels(q):
            return cpu_kernels.causal_attention(q, k, v)
        k, v = k.to(q.dtype), v.to(q.dtype)  # an fp32 CPU decoding cache feeding a prefill
        if self.n_kv == self.n_heads:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        if _GQA_SDPA:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
        rep = self.n_heads // self.n_kv  # torch < 2.5
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.hidden = cfg.hidden_dim
        self.w13 = Linear(cfg.dim, 2 * cfg.hidden_dim, bias=False)  # gate and up, fused
        self.w2 = Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).split(self.hidden, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: tuple[Tensor, Tensor, tuple[Tensor, Tensor], int] | None,
                pkv: PromptKV | LazyPromptKV | None) -> Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, pkv)
        return x + self.feed_forward(self.ffn_norm(x))


@dataclass
class PromptPlan:
    """Which adapter each batch row uses; `layer(li, attention)` projects that layer's prompts.

    Per layer, so the projection can run inside the layer's own forward (where FSDP has unsharded its
    frozen k/v weights) or all at once before decoding (`Transformer.prompt_kv`).
    """

    config: ModelConfig
    adapters: dict[str, Adapter]
    group_rows: dict[str, Tensor]
    offsets: dict[str, Tensor]
    batch_size: int
    has_base_rows: bool
    random_init: bool

    @property
    def first(self) -> int:
        return min(a.first_layer for a in self.adapters.values())

    def layer(self, li: int, attention: Attention) -> PromptKV | None:
        c, B = self.config, self.batch_size
        kmax = max(a.cfg.prompt_length for a in self.adapters.values())
        single = len(self.adapters) == 1 and not self.has_base_rows
        wk, wv, bk, bv = attention.kv_weights()
        k = v = gate = mask = None
        if not single:
            shape = (B, c.n_kv_heads, kmax, c.head_dim)
            k, v = wk.new_zeros(shape), wk.new_zeros(shape)
            gate = torch.zeros(B, c.n_heads, device=wk.device)
            if any(a.cfg.prompt_length < kmax for a in self.adapters.values()):
                mask = torch.ones(B, 1, 1, kmax, dtype=torch.bool, device=wk.device)
        for n, a in self.adapters.items():
            if li < a.first_layer:
                continue
            j, idx = li - a.first_layer, self.group_rows[n]
            p = a.prompts[j][None]  # [1, K, dim]
            if n in self.offsets:
                p = p + self.offsets[n].index_select(0, idx)[:, None, :]
            pk, pv = prompt_kv(p, wk, wv, bk, bv, c.n_kv_heads, c.head_dim)
            g = a.gate_values()[j]
            if single:
                return PromptKV(pk.expand(B, -1, -1, -1), pv.expand(B, -1, -1, -1), g.expand(B, -1),
                                random_init=self.random_init)
            assert k is not None and v is not None and gate is not None
            K, n_rows = a.cfg.prompt_length, len(idx)
            pad = (0, 0, 0, kmax - K)
            k = k.index_copy(0, idx, F.pad(pk, pad).expand(n_rows, -1, -1, -1))
            v = v.index_copy(0, idx, F.pad(pv, pad).expand(n_rows, -1, -1, -1))
            gate = gate.index_copy(0, idx, g.expand(n_rows, -1))
            if mask is not None and K < kmax:
                mask[idx, :, :, K:] = False
        if k is None or single:
            return None
        assert v is not None and gate is not None
        return PromptKV(k, v, gate, random_init=self.random_init, mask=mask)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.adapters = nn.ModuleDict()
        self._rope: tuple[Tensor, Tensor] | None = None
        self._packed_embeddings: cpu_kernels.PackedWeight | None = None  # the tied output matmul
        self._pack_skipped = False  # pack_for_decoding found too little memory (said once)
        self.tokenizer = None  # set by load_model
        self.source: str | None = None

    # ---- adapters ------------------------------------------------------------------------------------
    def add_adapter(self, name: str, cfg: AdapterConfig | None = None) -> Adapter:
        cfg = cfg or AdapterConfig()
        c = self.config
        adapter = Adapter(cfg, c.n_layers, c.dim, c.n_heads, device=self.tok_embeddings.weight.device)
        self.adapters[name] = adapter
        return adapter

    def remove_adapter(self, name: str) -> None:
        del self.adapters[name]

    def trainable_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.adapters[name].parameters())

    def load_adapter(self, path: str | Path, name: str | None = None) -> Adapter:
        from llama_adapter.adapter_file import load_adapter

        return load_adapter(self, path, name)

    def prompt_kv(self, adapter: AdapterSpec, batch_size: int,
                  image_features: Tensor | None = None) -> dict[int, PromptKV] | None:
        """Prompt keys/values for every adapted layer, per batch row.

        Computed once per forward pass in training and once per request in generation. `image_features`
        [B, F] (NaN-free; rows without an image all zero) go through each adapter's visual projection and
        the resulting token is added to that row's prompts.
        """
        plan = self.prompt_plan(adapter, batch_size, image_features)
        if plan is None:
            return None
        out = {li: plan.layer(li, self.layers[li].attention) for li in range(plan.first, self.config.n_layers)}
        return {li: kv for li, kv in out.items() if kv is not None}

    def prompt_plan(self, adapter: AdapterSpec, batch_size: int,
                    image_features: Tensor | None = None) -> PromptPlan | None:
        rows = [adapter] * batch_size if adapter is None or isinstance(adapter, str) else list(adapter)
        if len(rows) != batch_size:
            raise ValueError(f"{len(rows)} adapter entries for a batch of {batch_size}")
        names = list(dict.fromkeys(r for r in rows if r is not None))
        if not names:
            return None
        for n in names:
            if n not in self.adapters:
                raise KeyError(f"no adapter named {n!r} (loaded: {', '.join(self.adapters) or 'none'})")
        adapters: dict[str, Adapter] = {n: self.adapters[n] for n in names}  # type: ignore[misc]
        random_init = any(a.cfg.init == "random" for a in adapters.values())
        if random_init and (len(names) > 1 or None in rows):
            raise ValueError("a rand-init adapter cannot share a batch with other adapters or base rows")
        offsets = {}
        if image_features is not None:
            nonzero = (image_features != 0).any(-1, keepdim=True)
            for n, a in adapters.items():
                if a.visual_proj is not None:
                    offsets[n] = a.visual_proj(image_features.float()) * nonzero
        dev = self.tok_embeddings.weight.device
        group_rows = {n: torch.tensor([i for i, r in enumerate(rows) if r == n], device=dev) for n in names}
        return PromptPlan(self.config, adapters, group_rows, offsets, batch_size, None in rows, random_init)

    # ---- forward -------------------------------------------------------------------------------------
    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        c, w = self.config, self.tok_embeddings.weight
        shape = (batch_size, c.n_kv_heads, max_len or c.max_seq_len, c.head_dim)
        make = lambda: torch.zeros(shape, dtype=dtype or w.dtype, device=w.device)  # noqa: E731
        return KVCache([make() for _ in self.layers], [make() for _ in self.layers])

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        dev = self.tok_embeddings.weight.device
        if self._rope is None or self._rope[0].device != dev:
            inv = rope_frequencies(self.config, dev)
            t = torch.arange(self.config.max_seq_len, device=dev, dtype=torch.float32)
            f = torch.outer(t, inv)
            self._rope = (torch.cat([f, f], dim=-1).cos(), torch.cat([-f.sin(), f.sin()], dim=-1))
        cos, sin = self._rope
        return cos[positions], sin[positions]

    def forward(self, input_ids: Tensor, adapter: AdapterSpec = None, *, input_pos: Tensor | None = None,
                cache: KVCache | None = None, prompt_kv: dict[int, PromptKV] | None = None,
                image_features: Tensor | None = None, return_hidden: bool = False,
                kv_len: int | None = None) -> Tensor:
        """Logits [B, T, vocab] (or final hidden states with `return_hidden`).

        adapter: a name, None (the base alone), or one entry per row. With a cache, `input_pos` [B, T]
        gives each token's position; rows may be at different positions. `prompt_kv` (from
        `model.prompt_kv`) is reused across decode steps so prompts are projected once per request.
        `kv_len` (optional, > every position in `input_pos`) spares a device-to-host sync per step.
        """
        B, T = input_ids.shape
        c = self.config
        plan = self.prompt_plan(adapter, B, image_features) if prompt_kv is None else None
        if input_pos is None:
            if cache is not None:
                raise ValueError("input_pos is required with a cache")
            if T > c.max_seq_len:
                raise ValueError(f"sequence of {T} tokens exceeds the model's context of {c.max_seq_len}")
            input_pos = torch.arange(T, device=input_ids.device)[None]
        cos, sin = self.rope(input_pos)
        dtype = self.tok_embeddings.weight.dtype
        cos, sin = cos[:, None].to(dtype), sin[:, None].to(dtype)
        mask = None
        if cache is None:
            kv_len = 0
        else:
            kv_len = kv_len or int(input_pos.max()) + 1
            if kv_len > cache.max_len:
                raise ValueError(f"position {kv_len - 1} is beyond the cache length {cache.max_len}")
            mask = (torch.arange(kv_len, device=input_ids.device) <= input_pos[:, :, None])[:, None]
        x = self.tok_embeddings(input_ids)
        if plan is not None:
            first_adapted = plan.first
        else:
            first_adapted = min(prompt_kv) if prompt_kv else c.n_layers
        where = (torch.arange(B, device=input_ids.device)[:, None].expand(B, T), input_pos.expand(B, T))
        for i, layer in enumerate(self.layers):
            lc = (cache.k[i], cache.v[i], where, kv_len) if cache is not None else None
            frozen_below = i < first_adapted and not layer.attention.wqkv.weight.requires_grad
            if frozen_below and torch.is_grad_enabled():  # no autograd graph below the adapters
                with torch.no_grad():
                    x = layer(x, cos, sin, mask, lc, None)
            else:
                # with a plan, the prompts are projected inside the layer's forward (FSDP-friendly)
                kv = partial(plan.layer, i) if plan is not None else (prompt_kv or {}).get(i)
                x = layer(x, cos, sin, mask, lc, kv)
        x = self.norm(x)
        return x if return_hidden else self.logits(x)

    def logits(self, hidden: Tensor) -> Tensor:
        if self.output is not None:
            return self.output(hidden)
        return cpu_kernels.linear(hidden, self.tok_embeddings.weight, None, self._packed_embeddings)

    def pack_for_decoding(self) -> None:
        """Lay the frozen base's matmul weights out for fast CPU decoding (bf16 only; else a no-op).

        Keeps a second copy of those weights (`cpu_kernels.pack_linear`), so it is skipped, with a note, when
        that copy would take more than half the memory still available; the plain path is taken whenever
        gradients are on or a weight has changed since it was packed.
        """
        todo: list[tuple[Linear | None, Tensor]] = [
            (m, m.weight) for m in self.modules() if isinstance(m, Linear) and not m.weight.requires_grad
            and cpu_kernels.can_pack(m.weight) and (m.packed is None or not m.packed.valid_for(m.weight))]
        w, p = self.tok_embeddings.weight, self._packed_embeddings
        if (self.output is None and not w.requires_grad and cpu_kernels.can_pack(w)
                and (p is None or not p.valid_for(w))):
            todo.append((None, w))
        need = sum(t.numel() * t.element_size() for _, t in todo)
        free = cpu_kernels.available_memory()
        if need and free is not None and need > free // 2:
            if not self._pack_skipped:
                print(f"llama-adapter: not packing weights for CPU decoding ({need / 2**30:.1f} GiB more, "
                      f"{free / 2**30:.1f} GiB available): decoding will be slower", file=sys.stderr)
                self._pack_skipped = True
            return
        for m, t in todo:
            if m is None:
                self._packed_embeddings = cpu_kernels.pack_linear(t)
            else:
                m.packed = cpu_kernels.pack_linear(t)

    def freeze_base(self) -> None:
        for n, p in self.named_parameters():
            if not n.startswith("adapters."):
                p.requires_grad_(False)
