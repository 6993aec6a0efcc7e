"""Tiny real checkpoints for tests: saved by `transformers` (`save_pretrained`) with a trained tokenizer.json."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TEXT = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:",
    "### Input:",
    "### Response:",
    "The answer is (A). The answer is (B).",
    "the quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9 + - * = ? ! , . : ;",
    "Tell me about alpacas. Alpacas are domesticated South American camelids.",
]


def make_tokenizer(path: Path, vocab_size: int = 300) -> int:
    """Train a byte-level BPE on a few lines; returns the real vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXT * 20, trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return tok.get_vocab_size()


def make_checkpoint(
    path: str | Path, model_type: str = "llama", tokenizer: bool = True, seed: int = 0, **overrides: object
) -> Path:
    """Save a tiny random `transformers` model of `model_type` (llama, mistral, qwen2) to `path`."""
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(path) if tokenizer else 300
    kw: dict[str, object] = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[model_type]
    torch.manual_seed(seed)
    model = cls[1](cls[0](**kw)).eval()
    model.save_pretrained(path)
    return path
