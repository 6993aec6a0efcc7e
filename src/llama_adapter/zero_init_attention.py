"""The method: adaption prompts in the top L layers, attended through zero-init gated attention.

Paper, sec. 3.1-3.2. For adapted layer l with learnable prompts P_l (K x dim):
  keys/values of the prompts come from the layer's own frozen k/v projections, without rotary embedding;
  each query attends to the prompts and to the tokens through two separate softmaxes;
  the prompt part is scaled per query head by a gate g_l initialised to zero (optionally through tanh).
So a fresh adapter leaves the base's outputs bit-for-bit unchanged: out = out_tokens + 0 * out_prompts.

`init="random"` is the paper's Table-5 baseline: one softmax over [prompts; tokens] and no gate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama_adapter.backends.cpu import kernels as cpu_kernels

Gate = Literal["tanh", "linear"]
Init = Literal["zero", "random"]


@dataclass
class AdapterConfig:
    prompt_length: int = 10  # K
    layers: int = 30  # L, counted from the top
    gate: Gate = "tanh"
    init: Init = "zero"

    def __post_init__(self) -> None:
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

    `visual_proj` (multi-modal adapters) maps image features [B, F] to one token [B, dim] that is added
    to every adapted layer's prompts (paper sec. 3.3).
    """

    def __init__(self, cfg: AdapterConfig, n_layers: int, dim: int, n_heads: int,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if cfg.layers > n_layers:
            raise ValueError(f"adapter wants {cfg.layers} layers but the base has only {n_layers}")
        self.cfg = cfg
        self.first_layer = n_layers - cfg.layers
        self.prompts = nn.Parameter(torch.randn(cfg.layers, cfg.prompt_length, dim, device=device))
        self.gates = nn.Parameter(torch.zeros(cfg.layers, n_heads, device=device))
        self.visual_proj: nn.Module | None = None
        self.meta: dict[str, str] = {}  # free-form extras recorded in the adapter file (e.g. template)

    def gate_values(self) -> Tensor:
        return torch.tanh(self.gates) if self.cfg.gate == "tanh" else self.gates


@dataclass
class PromptKV:
    """Per-row prompt keys/values and gates of one adapted layer, computed once per forward/request.

    k, v: [B, n_kv_heads, K, head_dim] in the base dtype; gate: [B, n_heads] (0 for rows without adapter);
    random_init: the single-softmax baseline (then gate is unused and every row has an adapter);
    mask: [B, 1, 1, K] where adapters of different prompt lengths share a batch (False = padding).
    """

    k: Tensor
    v: Tensor
    gate: Tensor
    random_init: bool = False
    mask: Tensor | None = None


def prompt_kv(prompts: Tensor, wk: Tensor, wv: Tensor, bk: Tensor | None, bv: Tensor | None,
              n_kv_heads: int, head_dim: int) -> tuple[Tensor, Tensor]:
    """Keys/values of prompts [B, K, dim] through the frozen projections; no rotary embedding."""
    B, K, _ = prompts.shape
    p = prompts.to(wk.dtype)
    k = F.linear(p, wk, bk).view(B, K, n_kv_heads, head_dim).transpose(1, 2)
    v = F.linear(p, wv, bv).view(B, K, n_kv_heads, head_dim).transpose(1, 2)
    return k, v


def gated_prompt_attention(q: Tensor, pkv: PromptKV) -> Tensor:
    """softmax(q pk^T / sqrt(d)) pv, scaled per head by the gate: the prompt half of equation 8.

    q: [B, H, T, d]. Grouped-query heads are folded into the sequence axis so the prompt K/V
    [B, n_kv, K, d] are shared by their query heads without being copied.
    """
    B, H, T, d = q.shape
    n_kv = pkv.k.shape[1]
    qg = q.reshape(B, n_kv, (H // n_kv) * T, d).to(pkv.k.dtype)  # a CPU decoder keeps prompt K/V in fp32
    if cpu_kernels.use_cpu_training_kernels(q):
        out = cpu_kernels.few_keys_attention(qg, pkv.k, pkv.v, pkv.mask).view(B, H, T, d)
    else:
        out = F.scaled_dot_product_attention(qg, pkv.k, pkv.v, attn_mask=pkv.mask).view(B, H, T, d)
    return (out * pkv.gate.to(out.dtype)[:, :, None, None]).to(q.dtype)
