"""litgpt's LLaMA-Adapter (`litgpt.adapter`) as a peer of the benchmarks: its model built on one of our shapes.

litgpt is optional and pins huggingface-hub<1.4, so it usually lives in a venv of its own; this module imports only
torch and litgpt, so that venv needs nothing of ours.
"""

from __future__ import annotations

from typing import Any

import torch


def build_litgpt(
    shape: dict[str, Any], prompt_length: int, layers: int, device: torch.device | str = "cpu", bf16: bool = True
) -> Any:
    """litgpt's adapter GPT in the LLaMA layout (RMSNorm, SwiGLU, grouped-query attention) on `shape` (our keys:
    vocab_size, dim, n_layers, n_heads, n_kv_heads, hidden_dim, optional tie_embeddings and rope_theta), with its
    adapter on the top `layers` layers and only the adapter trainable; weights in bf16, or fp32 with `bf16=False`
    (for its bf16-mixed mode)."""
    from litgpt.adapter import GPT, Config, mark_only_adapter_as_trainable

    cfg = Config(
        block_size=2048,
        vocab_size=shape["vocab_size"],
        padded_vocab_size=shape["vocab_size"],
        n_layer=shape["n_layers"],
        n_head=shape["n_heads"],
        n_embd=shape["dim"],
        n_query_groups=shape["n_kv_heads"],
        intermediate_size=shape["hidden_dim"],
        rotary_percentage=1.0,
        rope_base=int(shape.get("rope_theta", 10000)),
        parallel_residual=False,
        bias=False,
        norm_class_name="RMSNorm",
        mlp_class_name="LLaMAMLP",
        adapter_prompt_length=prompt_length,
        adapter_start_layer=shape["n_layers"] - layers,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(cfg)
    if shape.get("tie_embeddings"):
        model.lm_head.weight = model.transformer.wte.weight
    if bf16:
        model = model.to(torch.bfloat16)
    mark_only_adapter_as_trainable(model)
    return model


def fresh_prompt_kv(model: Any) -> None:
    """Drop the adapter keys/values litgpt keeps from the first forward, also while training (so a second backward
    fails: Lightning-AI/litgpt#1287, fix open in #2327): call before each training step, as the fix would."""
    for m in model.modules():
        if hasattr(m, "adapter_kv_cache"):
            m.adapter_kv_cache = None
