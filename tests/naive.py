"""An independent, deliberately naive implementation of LLaMA-Adapter (paper eq. 2-8) for the tests.

Explicit concatenation, explicit softmaxes, explicit per-head loops; nothing shared with `llama_adapter.model`
except the weights it reads. RoPE uses complex rotation of (x_i, x_{i+d/2}) pairs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _rms(x: Tensor, w: Tensor, eps: float) -> Tensor:
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def _rope(x: Tensor, theta: float) -> Tensor:
    """x: [T, d]; rotate pairs (i, i + d/2) by angle t * theta^(-2i/d)."""
    T, d = x.shape
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
    z = torch.complex(x[:, : d // 2].double(), x[:, d // 2 :].double()) * torch.polar(torch.ones_like(ang), ang)
    return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)


def naive_logits(
    model,
    ids: Tensor,
    prompts: dict[int, Tensor] | None = None,
    gates: dict[int, Tensor] | None = None,
    random_init: bool = False,
) -> Tensor:
    """Logits [T, vocab] for one sequence `ids` [T] (fp32).

    prompts[l]: [K, dim] for adapted layer l; gates[l]: [n_heads] gate values (already through tanh if any).
    With random_init: one softmax over [prompts; tokens], no gate (the paper's Table-5 baseline).
    """
    c = model.config
    sd = {k: v.float() for k, v in model.state_dict().items() if not k.startswith("adapters.")}
    H, KV, d = c.n_heads, c.n_kv_heads, c.head_dim
    T = ids.shape[0]
    x = sd["tok_embeddings.weight"][ids]
    for li in range(c.n_layers):
        p = f"layers.{li}."
        w = sd[p + "attention.wqkv.weight"]
        b = sd.get(p + "attention.wqkv.bias")
        wq, wk, wv = w[: H * d], w[H * d : (H + KV) * d], w[(H + KV) * d :]
        bq = bk = bv = None
        if b is not None:
            bq, bk, bv = b[: H * d], b[H * d : (H + KV) * d], b[(H + KV) * d :]

        def proj(inp: Tensor, wt: Tensor, bias: Tensor | None) -> Tensor:
            out = inp @ wt.T
            return out + bias if bias is not None else out

        h = _rms(x, sd[p + "attention_norm.weight"], c.norm_eps)
        q, k, v = proj(h, wq, bq), proj(h, wk, bk), proj(h, wv, bv)
        P = prompts.get(li) if prompts else None
        heads = []
        for hh in range(H):
            g = hh // (H // KV)  # the kv head this query head reads
            qh = _rope(q[:, hh * d : (hh + 1) * d], c.rope_theta)
            kh = _rope(k[:, g * d : (g + 1) * d], c.rope_theta)
            vh = v[:, g * d : (g + 1) * d]
            s = qh @ kh.T / math.sqrt(d)
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
            if P is None:
                heads.append(torch.softmax(s, -1) @ vh)
                continue
            pk = proj(P, wk, bk)[:, g * d : (g + 1) * d]  # no RoPE on prompt keys
            pv = proj(P, wv, bv)[:, g * d : (g + 1) * d]
            sp = qh @ pk.T / math.sqrt(d)  # [T, K]
            if random_init:
                a = torch.softmax(torch.cat([sp, s], dim=-1), -1)
                heads.append(a @ torch.cat([pv, vh], dim=0))
            else:
                assert gates is not None
                heads.append(torch.softmax(s, -1) @ vh + gates[li][hh] * (torch.softmax(sp, -1) @ pv))
        x = x + torch.cat(heads, dim=-1) @ sd[p + "attention.wo.weight"].T
        h = _rms(x, sd[p + "ffn_norm.weight"], c.norm_eps)
        gu = h @ sd[p + "feed_forward.w13.weight"].T
        gate, up = gu[:, : c.hidden_dim], gu[:, c.hidden_dim :]
        x = x + (torch.nn.functional.silu(gate) * up) @ sd[p + "feed_forward.w2.weight"].T
    x = _rms(x, sd["norm.weight"], c.norm_eps)
    out = sd["tok_embeddings.weight"] if c.tie_embeddings else sd["output.weight"]
    return x @ out.T


def adapter_tensors(model, name: str) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """The adapter's prompts and (activated) gates keyed by absolute layer index."""
    a = model.adapters[name]
    gv = a.gate_values().detach().float()
    prompts = {a.first_layer + j: a.prompts[j].detach().float() for j in range(a.cfg.layers)}
    gates = {a.first_layer + j: gv[j] for j in range(a.cfg.layers)}
    return prompts, gates
