"""The method: adaption prompts in the top L layers, attended through zero-init gated attention.

Paper, sec. 3.1-3.3, for adapted layer l with learnable prompts P_l (K x dim):
  eq. 2-4   keys/values of the prompts come from the layer's own frozen k/v projections, without rotary
            embedding (`prompt_kv`);
  eq. 5-7   each query attends to the prompts and to the tokens through two separate softmaxes;
  eq. 8     the prompt part is scaled per query head by a gate g_l initialised to zero (optionally through
            tanh), and added: out = softmax(q K_t^T / sqrt(d)) V_t + g_l * softmax(q K_p^T / sqrt(d)) V_p
            (`ZeroInitAttention`);
  eq. 10    for images, a projection of the frozen encoder's global features gives one token that is added to
            every adapted layer's prompts (`VisualProjection`).
So a fresh adapter leaves the base's outputs bit-for-bit unchanged: out = out_tokens + 0 * out_prompts.

`init="random"` is the paper's Table-5 baseline: one softmax over [prompts; tokens] and no gate.

This module has no device-specific code: a compute backend (`llama_adapter.backends`) may replace
`ZeroInitAttention` modules with a subclass that computes the same values with faster kernels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama_adapter.errors import AdapterError

Gate = Literal["tanh", "linear"]
Init = Literal["zero", "random"]
# Table 5's two attentions have one meaning under two spellings: the paper's ("zero-init", "rand-init": the
# `--attention` flag, TrainConfig.attention) and the short one an adapter file records ("zero", "random").
# Either is accepted wherever one is asked for.
INIT_NAMES: dict[str, Init] = {"zero": "zero", "zero-init": "zero", "random": "random", "rand-init": "random"}
ATTENTION_NAMES: dict[str, str] = {
    "zero": "zero-init",
    "zero-init": "zero-init",
    "random": "rand-init",
    "rand-init": "rand-init",
}


@dataclass
class AdapterConfig:
    prompt_length: int = 10  # K, prompts per adapted layer
    layers: int = 30  # L, adapted layers counted from the top
    gate: Gate = "tanh"  # g_l enters as tanh(g_l) or as is
    init: Init = "zero"  # "zero": zero-init gated attention (the method); "random": Table 5's baseline

    def __post_init__(self) -> None:
        self.init = INIT_NAMES.get(self.init, self.init)
        if self.prompt_length < 1 or self.layers < 1:
            raise ValueError("prompt_length and layers must be >= 1")
        if self.gate not in ("tanh", "linear"):
            raise ValueError(f"gate must be 'tanh' or 'linear', not {self.gate!r}")
        if self.init not in ("zero", "random"):
            raise ValueError(f"init must be 'zero' or 'random', not {self.init!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Adapter(nn.Module):
    """The trainable state of one adapter: prompts [L, K, dim] and per-head gates [L, n_heads] (fp32).

    `visual_proj` (multi-modal adapters, eq. 10) maps image features [B, F] to one token [B, dim] that is added
    to every adapted layer's prompts.
    """

    def __init__(
        self, cfg: AdapterConfig, n_layers: int, dim: int, n_heads: int, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        if cfg.layers > n_layers:
            raise ValueError(f"adapter wants {cfg.layers} layers but the base has only {n_layers}")
        self.cfg = cfg
        self.first_layer = n_layers - cfg.layers
        self.prompts = nn.Parameter(torch.randn(cfg.layers, cfg.prompt_length, dim, device=device))
        self.gates = nn.Parameter(torch.zeros(cfg.layers, n_heads, device=device))  # zero-init: the method's point
        self.visual_proj: VisualProjection | ConditionProjection | None = None
        self.meta: dict[str, str] = {}  # free-form extras recorded in the adapter file (e.g. template)

    def gate_values(self) -> Tensor:
        return torch.tanh(self.gates) if self.cfg.gate == "tanh" else self.gates


class VisualProjection(nn.Module):
    """Eq. 10: image features [B, F] -> one image token [B, dim], added to every adapted layer's prompts.

    Each scale (group of channels) is layer-normalised on its own, since intermediate class-token states and
    the final embedding differ in scale; then Linear(F, hidden) -> GELU -> Linear(hidden, dim). With the
    default hidden=64 at LLaMA-7B / ViT-L/14 shapes (F = 4 x 1024 + 768, dim 4096) this is ~0.59M parameters,
    the paper's ~0.6M.
    """

    def __init__(self, in_features: int, dim: int, hidden: int = 64, groups: Sequence[int] | None = None) -> None:
        super().__init__()
        groups = list(groups) if groups else [in_features]
        if sum(groups) != in_features:
            raise ValueError(f"groups {groups} do not sum to in_features={in_features}")
        self.in_features, self.dim, self.hidden, self.groups = in_features, dim, hidden, groups
        self.norm_weight = nn.Parameter(torch.ones(in_features))
        self.norm_bias = nn.Parameter(torch.zeros(in_features))
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        parts = [F.layer_norm(p, (p.shape[-1],)) for p in x.split(self.groups, dim=-1)]
        x = torch.cat(parts, dim=-1) * self.norm_weight + self.norm_bias
        return self.fc2(F.gelu(self.fc1(x)))

    def config_dict(self) -> dict[str, Any]:
        return {
            "type": "mlp",
            "in_features": self.in_features,
            "dim": self.dim,
            "hidden": self.hidden,
            "groups": list(self.groups),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], dim: int) -> VisualProjection:
        """The projection an adapter file's `visual` metadata (`config_dict()`) describes."""
        if config.get("type", "mlp") != "mlp" or "in_features" not in config:
            raise AdapterError(f"unsupported or missing visual projection config {config!r}")
        if int(config.get("dim", dim)) != dim:
            raise AdapterError(f"visual projection outputs {config['dim']} channels, the base has dim {dim}")
        return cls(int(config["in_features"]), dim, hidden=int(config.get("hidden", 64)), groups=config.get("groups"))


MODALITIES = ("image", "audio", "video")  # the order of the modalities' feature blocks in a condition vector


class ConditionProjection(nn.Module):
    """Eq. 10 for other modalities and for several at once: one `VisualProjection` per modality, summed.

    Input: the modalities' global features side by side in `modalities` order ([B, sum of their F]); a block
    that is all zero means the row has no input of that modality, and its projection adds nothing, so one record
    may carry an image, a clip and a video, another only one of them. Each modality has its own projection
    because the features of different encoders differ in scale and meaning; the tokens are summed, as the paper
    adds its one visual token to every adapted layer's prompts. (A projection for images alone stays a plain
    `VisualProjection`, so image adapter files are unchanged.)
    """

    def __init__(self, parts: dict[str, VisualProjection]) -> None:
        super().__init__()
        unknown = [m for m in parts if m not in MODALITIES]
        if unknown or not parts:
            raise ValueError(f"modalities {list(parts)}: expected some of {list(MODALITIES)}")
        dims = {p.dim for p in parts.values()}
        if len(dims) != 1:
            raise ValueError(f"projections to different widths {sorted(dims)}")
        self.modalities = [m for m in MODALITIES if m in parts]
        self.parts = nn.ModuleDict({m: parts[m] for m in self.modalities})  # registered: saved as parts.<m>.*
        self.projections = {m: parts[m] for m in self.modalities}  # the same modules, typed
        self.widths = [parts[m].in_features for m in self.modalities]
        self.in_features, self.dim = sum(self.widths), dims.pop()

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor | None = None
        for m, block in zip(self.modalities, x.float().split(self.widths, dim=-1), strict=True):
            present = (block != 0).any(-1, keepdim=True)
            token = self.projections[m](block) * present
            out = token if out is None else out + token
        assert out is not None  # at least one modality (checked in __init__)
        return out

    def config_dict(self) -> dict[str, Any]:
        return {
            "type": "multi",
            "dim": self.dim,
            "parts": [{"modality": m, **self.projections[m].config_dict()} for m in self.modalities],
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], dim: int) -> ConditionProjection:
        parts = config.get("parts")
        if not isinstance(parts, list) or not parts or not all(isinstance(p, dict) for p in parts):
            raise AdapterError(f"condition projection config without a list of parts: {config!r}")
        built: dict[str, VisualProjection] = {}
        for part in parts:
            m = part.get("modality")
            if m not in MODALITIES or m in built:
                raise AdapterError(f"condition projection part with modality {m!r} (one each of {list(MODALITIES)})")
            built[str(m)] = VisualProjection.from_config({k: v for k, v in part.items() if k != "modality"}, dim)
        return cls(built)


def projection_from_config(config: dict[str, Any], dim: int) -> VisualProjection | ConditionProjection:
    """The projection an adapter file's `visual` metadata describes: one for images, or one per modality."""
    if config.get("type") == "multi":
        return ConditionProjection.from_config(config, dim)
    return VisualProjection.from_config(config, dim)


def projection_modalities(proj: VisualProjection | ConditionProjection | None) -> list[str]:
    """The modalities a projection takes, in the order of their feature blocks (images alone: ["image"])."""
    if proj is None:
        return []
    return list(proj.modalities) if isinstance(proj, ConditionProjection) else ["image"]


def projection_parameter_count(in_features: int = 4 * 1024 + 768, dim: int = 4096, hidden: int = 64) -> int:
    """Parameters of the default projection (defaults: LLaMA-7B width, ViT-L/14 multi-scale features)."""
    return 2 * in_features + (in_features + 1) * hidden + (hidden + 1) * dim


@dataclass
class PromptKV:
    """Per-row prompt keys/values and gates of one adapted layer, computed once per forward/request.

    k, v: [B, n_kv_heads, K, head_dim]; gate: [B, n_heads] (0 for rows without adapter);
    random_init: the single-softmax baseline (then gate is unused and every row has an adapter);
    mask: [B, 1, 1, K] where adapters of different prompt lengths share a batch (False = padding).
    """

    k: Tensor
    v: Tensor
    gate: Tensor
    random_init: bool = False
    mask: Tensor | None = None


def prompt_kv(
    prompts: Tensor, wk: Tensor, wv: Tensor, bk: Tensor | None, bv: Tensor | None, n_kv_heads: int, head_dim: int
) -> tuple[Tensor, Tensor]:
    """Eq. 2-4: keys/values of prompts [B, K, dim] through the frozen projections; no rotary embedding."""
    B, K, _ = prompts.shape
    p = prompts.to(wk.dtype)
    k = F.linear(p, wk, bk).view(B, K, n_kv_heads, head_dim).transpose(1, 2)
    v = F.linear(p, wv, bv).view(B, K, n_kv_heads, head_dim).transpose(1, 2)
    return k, v


class ZeroInitAttention(nn.Module):
    """Eq. 5-8: attention of queries over the tokens plus the gated attention over the layer's prompts.

    q [B, H, T, d]; k/v [B, n_kv, S, d] (grouped-query heads: H is a multiple of n_kv); mask [B, 1, T, S] of
    allowed positions, or None for causal attention over T == S tokens. No parameters: the prompts and gates
    arrive per batch row in `PromptKV`.
    """

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, prompts: PromptKV | None) -> Tensor:
        if prompts is not None and prompts.random_init:
            return self.single_softmax(q, k, v, mask, prompts)
        y = self.token_attention(q, k, v, mask)
        return y if prompts is None else self.add_gated_prompt_attention(y, q, prompts)

    def add_gated_prompt_attention(self, y: Tensor, q: Tensor, prompts: PromptKV) -> Tensor:
        """Eq. 8's sum: the token attention y plus the gated prompt attention (a backend may fuse the two)."""
        return y + self.gated_prompt_attention(q, prompts)

    def token_attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """softmax(q k^T / sqrt(d) + causal mask) v: the frozen base's own attention (eq. 5, token part)."""
        causal = mask is None and q.shape[2] > 1
        return sdpa(q, k, v, mask, causal)

    def gated_prompt_attention(self, q: Tensor, prompts: PromptKV) -> Tensor:
        """g_l * softmax(q K_p^T / sqrt(d)) V_p: the prompt half of eq. 8, its own softmax (eq. 7).

        Grouped-query heads are folded into the sequence axis so the prompt K/V [B, n_kv, K, d] are shared by
        their query heads without being copied. Prompt K/V may be held in a wider dtype than the queries (a
        decoder's choice); the result comes back in the queries' dtype.
        """
        B, H, T, d = q.shape
        n_kv = prompts.k.shape[1]
        qg = q.reshape(B, n_kv, (H // n_kv) * T, d).to(prompts.k.dtype)
        out = self.few_keys_attention(qg, prompts.k, prompts.v, prompts.mask).view(B, H, T, d)
        return (out * prompts.gate.to(out.dtype)[:, :, None, None]).to(q.dtype)

    def few_keys_attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """softmax(q k^T / sqrt(d)) v against the K prompt keys of a key/value group (no causal mask)."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def single_softmax(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, prompts: PromptKV) -> Tensor:
        """Table 5's rand-init baseline: one softmax over [prompts; tokens], no gate."""
        B, _, T, _ = q.shape
        Kp = prompts.k.shape[2]
        k, v = torch.cat([prompts.k.to(k.dtype), k], dim=2), torch.cat([prompts.v.to(v.dtype), v], dim=2)
        causal = mask if mask is not None else torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        causal = causal.expand(B, 1, T, -1) if causal.dim() == 4 else causal.expand(B, 1, T, T)
        return self.token_attention(q, k, v, torch.cat([causal.new_ones(B, 1, T, Kp), causal], dim=-1))


def _sdpa_takes_enable_gqa() -> bool:
    """Whether this torch's SDPA shares key/value heads itself (`enable_gqa`, torch >= 2.5).

    Asked by calling it once on tiny tensors: robust to stripped docstrings (`python -OO`) and to builds whose
    signature the inspect module cannot read.
    """
    try:
        x = torch.zeros(1, 2, 1, 2)
        F.scaled_dot_product_attention(x, x[:, :1], x[:, :1], enable_gqa=True)
        return True
    except TypeError:
        return False


SDPA_GQA = _sdpa_takes_enable_gqa()


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
    """`F.scaled_dot_product_attention` with grouped-query heads on every torch this project supports."""
    if k.shape[1] == q.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    if SDPA_GQA:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
    rep = q.shape[1] // k.shape[1]  # torch < 2.5
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
