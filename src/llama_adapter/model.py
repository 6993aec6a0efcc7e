"""The frozen LLaMA-family decoder with zero-init attention adapters, in plain PyTorch.

RMSNorm, rotary embeddings (with Llama-3.1 scaling), SwiGLU, grouped-query attention, optional q/k/v bias,
tied or untied embeddings, and a static KV cache with per-row positions (rows of a batch may be at different
lengths, which is what batched and continuous decoding need). Adapters live in `model.adapters`; a forward
pass picks one per batch row (`adapter_batch`), and each attention layer computes the method's zero-init
attention (`zero_init_attention.ZeroInitAttention`).

No device branches: the model is plain PyTorch everywhere. A compute backend (`llama_adapter.backends`, chosen
once when a base is loaded) swaps faster modules in from outside, as gpt-fast's quantiser swaps `Linear`s.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama_adapter.adapter_batch import AdapterSpec, KVWeights, LazyPromptKV, PromptPlan
from llama_adapter.chat_template import ChatTemplate
from llama_adapter.config import ModelConfig
from llama_adapter.tokenizer import Tokenizer
from llama_adapter.zero_init_attention import Adapter, AdapterConfig, PromptKV, ZeroInitAttention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def add_norm(self, x: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        """(x + a, its norm): a block's residual sum and the norm that reads it (a backend may fuse the two)."""
        h = x + a
        return h, self(h)


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
    elif s and s["rope_type"] == "freq_factors":  # GGUF files (llama.cpp): one divisor per frequency (Llama-3.1)
        inv = inv / torch.tensor(s["factors"], dtype=torch.float32, device=device)
    elif s and s["rope_type"] == "yarn":  # YaRN (Peng et al., 2023; Qwen2.5's long context): see yarn_blend
        inv = yarn_blend(inv, d, cfg.rope_theta, s)
    return inv


def yarn_blend(inv: Tensor, d: int, theta: float, s: dict[str, Any]) -> Tensor:
    """YaRN's frequencies: the ones that turn fewer than `beta_slow` (default 1) times over the original context are
    divided by `factor` (interpolated), those that turn more than `beta_fast` (default 32) times are kept
    (extrapolated), and in between the two blend along a linear ramp over the frequency index, whose ends are
    those turn counts' indices, rounded outwards unless `truncate` is false (as transformers places them)."""
    factor, old = float(s["factor"]), float(s["original_max_position_embeddings"])
    fast, slow = float(s.get("beta_fast") or 32), float(s.get("beta_slow") or 1)

    def index_of(turns: float) -> float:  # the frequency index that turns `turns` times over `old` positions
        return d * math.log(old / (turns * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = index_of(fast), index_of(slow)
    if s.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, d - 1)
    ramp = ((torch.arange(d // 2, dtype=torch.float32, device=inv.device) - lo) / ((hi - lo) or 0.001)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (the frequency as it is), 0: interpolate
    return inv / factor * (1 - keep) + inv * keep


def rope_attention_factor(cfg: ModelConfig) -> float:
    """The scale YaRN puts on cos and sin (so on q . k twice): `attention_factor` where the config gives it, else
    0.1 ln(factor) + 1 (DeepSeek's `mscale` / `mscale_all_dim` form where both are given); 1 for other ropes."""
    s = cfg.rope_scaling
    if not s or s["rope_type"] != "yarn":
        return 1.0
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])

    def mscale(factor: float, m: float = 1.0) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    factor = float(s["factor"])
    if s.get("mscale") and s.get("mscale_all_dim"):
        return mscale(factor, float(s["mscale"])) / mscale(factor, float(s["mscale_all_dim"]))
    return mscale(factor)


def apply_rope(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """Rotate (x_i, x_{i+d/2}) pairs; `signed_sin` is [-sin, sin] so the half swap is a single roll."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


# one layer's view of the cache in a forward: (keys, values, (row, position) of each new token, length to read)
LayerCache = tuple[Tensor, Tensor, tuple[Tensor, Tensor], int]


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
        self.wqkv = nn.Linear(cfg.dim, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.wo = nn.Linear(self.q_size, cfg.dim, bias=False)
        self.attend = ZeroInitAttention()  # eq. 5-8; a backend may swap in a faster subclass

    def kv_weights(self) -> KVWeights:
        """The frozen key/value projections (weights, biases) through which the prompts pass (eq. 2-4)."""
        w, b, q = self.wqkv.weight, self.wqkv.bias, self.q_size
        wk, wv = w[q : q + self.kv_size], w[q + self.kv_size :]
        if b is None:
            return wk, wv, None, None
        return wk, wv, b[q : q + self.kv_size], b[q + self.kv_size :]

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        cache: LayerCache | None,
        pkv: PromptKV | LazyPromptKV | None,
    ) -> Tensor:
        if callable(pkv):
            pkv = pkv(self.kv_weights())
        B, T, _ = x.shape
        q, k, v = self.heads(self.wqkv(x), cos, sin)
        if cache is not None:
            k, v = self.cached(cache, k, v)
        y = self.attend(q, k, v, mask, pkv)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.q_size))

    def cached(self, cache: LayerCache, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write this forward's keys/values [B, n_kv, T, d] into the layer's cache at each row's positions and give
        back what to attend over: each row's cached prefix."""
        kc, vc, (rows, pos), kv_len = cache
        self.store(kc, vc, k, v, rows, pos)
        return kc[: k.shape[0], :, :kv_len], vc[: k.shape[0], :, :kv_len]

    def store(self, kc: Tensor, vc: Tensor, k: Tensor, v: Tensor, rows: Tensor, pos: Tensor) -> None:
        """kc/vc[rows, :, pos] = k/v in the cache's dtype (a backend may swap in a fused write)."""
        kc.transpose(1, 2)[rows, pos] = k.transpose(1, 2).to(kc.dtype)
        vc.transpose(1, 2)[rows, pos] = v.transpose(1, 2).to(vc.dtype)

    def heads(self, qkv: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The fused projection's output [B, T, (H + 2 n_kv) d] -> queries [B, H, T, d], keys and values
        [B, n_kv, T, d]; queries and keys rotated (a backend may swap in a fused version)."""
        B, T, _ = qkv.shape
        qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        # one rotation for queries and keys together: [B, H + n_kv, T, d]
        qk = apply_rope(qk.view(B, T, self.n_heads + self.n_kv, self.head_dim).transpose(1, 2), cos, sin)
        q, k = qk.split([self.n_heads, self.n_kv], dim=1)
        return q, k, v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.hidden = cfg.hidden_dim
        self.w13 = nn.Linear(cfg.dim, 2 * cfg.hidden_dim, bias=False)  # gate and up, fused
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(self.swiglu(self.w13(x)))

    def swiglu(self, h: Tensor) -> Tensor:
        """silu(gate) * up of the fused projection's output h = [gate | up] (a backend's kernel may take it)."""
        gate, up = h.split(self.hidden, dim=-1)
        return F.silu(gate) * up


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        cache: LayerCache | None,
        pkv: PromptKV | LazyPromptKV | None,
    ) -> Tensor:
        h, normed = self.ffn_norm.add_norm(x, self.attention(self.attention_norm(x), cos, sin, mask, cache, pkv))
        return h + self.feed_forward(normed)


class Blocks(nn.ModuleList):
    """The decoder blocks: an `nn.ModuleList` whose items are typed as `Block`."""

    def __iter__(self) -> Iterator[Block]:
        return super().__iter__()  # type: ignore[return-value]  # every item is a Block

    @overload
    def __getitem__(self, idx: slice) -> Blocks: ...

    @overload
    def __getitem__(self, idx: int) -> Block: ...

    def __getitem__(self, idx: int | slice) -> Block | Blocks:
        return super().__getitem__(idx)  # type: ignore[return-value]  # every item is a Block


class Adapters(nn.ModuleDict):
    """The loaded adapters by name: an `nn.ModuleDict` whose values are typed as `Adapter`."""

    def __getitem__(self, key: str) -> Adapter:
        return super().__getitem__(key)  # type: ignore[return-value]  # every value is an Adapter

    def values(self) -> Iterable[Adapter]:  # type: ignore[override]  # narrower value type
        return super().values()  # type: ignore[return-value]  # every value is an Adapter

    def items(self) -> Iterable[tuple[str, Adapter]]:  # type: ignore[override]  # narrower value type
        return super().items()  # type: ignore[return-value]  # every value is an Adapter


class Embedding(nn.Embedding):
    """nn.Embedding that leaves a meta-device table uninitialised: `load_model` builds on the meta device and assigns
    every weight, and ATen's normal_ on meta is a Python reference whose first call imports torch._dynamo (about a
    second of every load)."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embeddings = Embedding(cfg.vocab_size, cfg.dim)
        self.layers = Blocks(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.adapters = Adapters()
        self._rope: tuple[Tensor, Tensor] | None = None
        self.tokenizer: Tokenizer | None = None  # set by load_model
        self.chat_template: ChatTemplate | None = None  # the base's own chat template, if it has one (load_model)
        self.backend: Any = None  # the compute backend, set once by llama_adapter.backends.install
        # a quantized base's tied output head as int8 rows and fp32 row scales, for decoding's logits (set by
        # llama_adapter.quantize; the CPU backend's `logits` takes it where no gradient is wanted)
        self.int8_head: tuple[Tensor, Tensor] | None = None
        self.source: str | None = None

    # ---- adapters ------------------------------------------------------------------------------------
    def new_adapter(self, cfg: AdapterConfig) -> Adapter:
        """A fresh adapter shaped for this base, on its device, not registered (see `adapter_file.build_adapter`)."""
        c = self.config
        return Adapter(cfg, c.n_layers, c.dim, c.n_heads, device=self.tok_embeddings.weight.device)

    def add_adapter(self, name: str, cfg: AdapterConfig | None = None) -> Adapter:
        adapter = self.new_adapter(cfg or AdapterConfig())
        self.adapters[name] = adapter
        return adapter

    def remove_adapter(self, name: str) -> None:
        del self.adapters[name]

    def trainable_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.adapters[name].parameters())

    def load_adapter(self, path: str | Path, name: str | None = None) -> Adapter:
        from llama_adapter.adapter_file import load_adapter

        return load_adapter(self, path, name)

    def prompt_kv(
        self, adapter: AdapterSpec, batch_size: int, image_features: Tensor | None = None
    ) -> dict[int, PromptKV] | None:
        """Prompt keys/values for every adapted layer, per batch row.

        Computed once per forward pass in training and once per request in generation. `image_features`
        [B, F] (NaN-free; rows without an image all zero) go through each adapter's visual projection and
        the resulting token is added to that row's prompts.
        """
        plan = self.prompt_plan(adapter, batch_size, image_features)
        if plan is None:
            return None
        out = {
            li: plan.layer(li, self.layers[li].attention.kv_weights()) for li in range(plan.first, self.config.n_layers)
        }
        return {li: kv for li, kv in out.items() if kv is not None}

    def prompt_plan(
        self, adapter: AdapterSpec, batch_size: int, image_features: Tensor | None = None
    ) -> PromptPlan | None:
        """Which adapter each row uses (`adapter_batch.PromptPlan`); None when no row has one."""
        device = self.tok_embeddings.weight.device
        return PromptPlan.build(self.config, dict(self.adapters.items()), adapter, batch_size, image_features, device)

    # ---- forward -------------------------------------------------------------------------------------
    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        c, w = self.config, self.tok_embeddings.weight
        shape = (batch_size, c.n_kv_heads, max_len or c.max_seq_len, c.head_dim)
        make = lambda: torch.zeros(shape, dtype=dtype or w.dtype, device=w.device)  # noqa: E731
        return KVCache([make() for _ in self.layers], [make() for _ in self.layers])

    def rope_table(self) -> tuple[Tensor, Tensor]:
        """cos and (sign-folded) sin [max_seq_len, head_dim] fp32 of every position, made once per device."""
        dev = self.tok_embeddings.weight.device
        if self._rope is None or self._rope[0].device != dev:
            inv = rope_frequencies(self.config, dev)
            t = torch.arange(self.config.max_seq_len, device=dev, dtype=torch.float32)
            f = torch.outer(t, inv)
            a = rope_attention_factor(self.config)  # 1 but for YaRN
            cos, sin = torch.cat([f, f], dim=-1).cos(), torch.cat([-f.sin(), f.sin()], dim=-1)
            self._rope = (cos * a, sin * a) if a != 1.0 else (cos, sin)
        return self._rope

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        cos, sin = self.rope_table()
        return cos[positions], sin[positions]

    def forward(
        self,
        input_ids: Tensor,
        adapter: AdapterSpec = None,
        *,
        input_pos: Tensor | None = None,
        cache: KVCache | None = None,
        prompt_kv: dict[int, PromptKV] | None = None,
        image_features: Tensor | None = None,
        return_hidden: bool = False,
        kv_len: int | None = None,
    ) -> Tensor:
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
        window = c.sliding_window
        if cache is None:
            kv_len = 0
            if window is not None and T > window:  # keys are the same tokens: each query sees the last `window`
                mask = self._window_mask(input_pos, input_pos, window)
        else:
            kv_len = kv_len or int(input_pos.max()) + 1
            if kv_len > cache.max_len:
                raise ValueError(f"position {kv_len - 1} is beyond the cache length {cache.max_len}")
            key_pos = torch.arange(kv_len, device=input_ids.device)[None]
            if window is not None and kv_len > window:
                mask = self._window_mask(input_pos, key_pos, window)
            else:
                mask = (key_pos[:, None] <= input_pos[:, :, None])[:, None]
                if T > 1 and kv_len == T and bool((input_pos == key_pos).all()):
                    mask = None  # a prefill from position 0: plain causal attention (SDPA's causal kernel is faster)
        x = self.tok_embeddings(input_ids)
        if plan is not None:
            first_adapted = plan.first
        else:
            first_adapted = min(prompt_kv) if prompt_kv else c.n_layers
        where = (torch.arange(B, device=input_ids.device)[:, None].expand(B, T), input_pos.expand(B, T))
        for i, layer in enumerate(self.layers):
            lc = (cache.k[i], cache.v[i], where, kv_len) if cache is not None else None
            frozen_below = i < first_adapted and not layer.attention.wqkv.weight.requires_grad
            if frozen_below and torch.is_grad_enabled() and first_adapted < c.n_layers:
                # a training step: no autograd graph below the adapters, since nothing there requires a gradient
                # once x is cut off (as under no_grad), while grad mode still tells a backend this is training (the
                # CPU backend's training kernels then run these layers too: 30.7 -> 23.6 ms a layer of the
                # SmolLM2-135M benchmark)
                x = layer(x.detach(), cos, sin, mask, lc, None)
            elif frozen_below and torch.is_grad_enabled():  # the base alone: its inference forward, exactly
                with torch.no_grad():
                    x = layer(x, cos, sin, mask, lc, None)
            else:
                # with a plan, the prompts are projected inside the layer's forward (FSDP-friendly)
                kv = partial(plan.layer, i) if plan is not None else (prompt_kv or {}).get(i)
                x = layer(x, cos, sin, mask, lc, kv)
        x = self.norm(x)
        return x if return_hidden else self.logits(x)

    @staticmethod
    def _window_mask(query_pos: Tensor, key_pos: Tensor, window: int) -> Tensor:
        """[B, 1, T, S]: query t sees key s where pos_s <= pos_t < pos_s + window (a sliding-window causal mask;
        positions [B or 1, T] and [B or 1, S])."""
        q, k = query_pos[:, :, None], key_pos[:, None, :]
        return ((k <= q) & (q - k < window))[:, None]

    def logits(self, hidden: Tensor) -> Tensor:
        """The output projection (the embedding matrix itself when the checkpoint ties them)."""
        if self.output is not None:
            return self.output(hidden)
        return F.linear(hidden, self.tok_embeddings.weight)

    def freeze_base(self) -> None:
        for n, p in self.named_parameters():
            if not n.startswith("adapters."):
                p.requires_grad_(False)
