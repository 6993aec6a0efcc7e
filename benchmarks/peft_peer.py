"""PEFT's LLaMA-Adapter (`AdaptionPromptConfig`, on transformers' Llama) as a peer of the benchmarks, on one of our
shapes; and the SmolLM2-135M shape the CPU benchmarks share.

PEFT and transformers are the optional `bench` extra (`pip install -e ".[bench]"`).
"""

from __future__ import annotations

from typing import Any

import torch

# SmolLM2-135M (random weights in the benchmarks): our ModelConfig's keys
SMOLLM2_135M: dict[str, Any] = dict(
    vocab_size=49152,
    dim=576,
    n_layers=30,
    n_heads=9,
    n_kv_heads=3,
    hidden_dim=1536,
    tie_embeddings=True,
    rope_theta=100000.0,
    max_seq_len=2048,
    bos_token_id=1,
    eos_token_ids=[2],
)


def hf_llama_config(shape: dict[str, Any]) -> Any:
    """transformers' LlamaConfig for `shape` (our keys; rope_theta, max_seq_len and tie_embeddings optional)."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["dim"],
        intermediate_size=shape["hidden_dim"],
        num_hidden_layers=shape["n_layers"],
        num_attention_heads=shape["n_heads"],
        num_key_value_heads=shape["n_kv_heads"],
        tie_word_embeddings=shape.get("tie_embeddings", False),
        max_position_embeddings=shape.get("max_seq_len", 2048),
        rope_theta=shape.get("rope_theta", 10000.0),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def build_peft(
    shape: dict[str, Any],
    prompt_length: int,
    layers: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Any:
    """transformers' Llama on `shape` with random weights made directly in `dtype` on `device` (a 7B model made in
    fp32 first would be 28 GB), wrapped with PEFT's adaption prompt on its top `layers` layers (seed 0)."""
    import transformers
    from peft import AdaptionPromptConfig, get_peft_model

    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            base = transformers.LlamaForCausalLM(hf_llama_config(shape))
    finally:
        torch.set_default_dtype(old)
    return get_peft_model(
        base, AdaptionPromptConfig(adapter_len=prompt_length, adapter_layers=layers, task_type="CAUSAL_LM")
    )
