"""Architecture description shared by every LLaMA-family checkpoint we load.

One dataclass covers LLaMA 1/2/3, Mistral, Qwen2, TinyLlama and SmolLM: the families differ only in
numbers (GQA, head_dim, rope theta/scaling, q/k/v bias, tied embeddings), never in code paths.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from llama_adapter.errors import CheckpointError

# Weight dtypes by name, everywhere a dtype is named (CLI flags, TrainConfig): bf16 / fp16 / fp32, and the long
# spellings torch uses as aliases.
DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass
class ModelConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int
    head_dim: int = 0  # 0 -> dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # rope_type: linear, llama3, yarn, or freq_factors (GGUF's rope_freqs)
    max_seq_len: int = 4096
    qkv_bias: bool = False
    tie_embeddings: bool = False
    model_type: str = "llama"
    bos_token_id: int | None = 1
    eos_token_ids: list[int] = field(default_factory=lambda: [2])
    pad_token_id: int | None = None
    # each query attends to at most this many positions, its own included (Mistral-7B-v0.1's 4096); None: all before
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if not self.head_dim:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise CheckpointError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def num_parameters(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        if self.qkv_bias:
            attn += self.head_dim * (self.n_heads + 2 * self.n_kv_heads)
        layer = attn + 3 * self.dim * self.hidden_dim + 2 * self.dim
        emb = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * layer + emb + self.dim

    # ---- readers -------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, path: str | Path) -> ModelConfig:
        """Read a Hugging Face `config.json` (transformers 4 and 5 spellings of rope settings)."""
        path = Path(path)
        c = _read_json(path)
        mtype = c.get("model_type", "llama")
        if mtype not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"{path}: model_type {mtype!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        try:
            rope = dict(c.get("rope_parameters") or {})  # transformers >= 5
            theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
            scaling = c.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
            if scaling is not None:
                scaling = dict(scaling)
                kind = scaling.get("rope_type") or scaling.get("type") or "default"
                scaling["rope_type"] = kind
                if kind == "default":
                    scaling = None
                elif kind not in ("llama3", "linear", "yarn"):
                    raise CheckpointError(f"{path}: rope scaling {kind!r} is not supported (llama3, linear, yarn)")
                elif kind == "yarn":  # as transformers fills them in
                    scaling.setdefault("original_max_position_embeddings", c.get("max_position_embeddings", 4096))
                    if scaling.get("factor") is None:
                        scaling["factor"] = c["max_position_embeddings"] / scaling["original_max_position_embeddings"]
            eos = c.get("eos_token_id", 2)
            n_heads = int(c["num_attention_heads"])
            window = c.get("sliding_window") if mtype == "mistral" else None
            if mtype == "qwen2" and c.get("use_sliding_window"):  # transformers: the layers from max_window_layers on
                raise CheckpointError(f"{path}: Qwen2's per-layer sliding window (use_sliding_window) is not supported")
            max_positions = context_length(int(c.get("max_position_embeddings", 4096)), scaling)
            return cls(
                vocab_size=int(c["vocab_size"]),
                dim=int(c["hidden_size"]),
                n_layers=int(c["num_hidden_layers"]),
                n_heads=n_heads,
                n_kv_heads=int(c.get("num_key_value_heads") or n_heads),
                hidden_dim=int(c["intermediate_size"]),
                head_dim=int(c.get("head_dim") or 0),
                norm_eps=float(c.get("rms_norm_eps", 1e-6)),
                rope_theta=float(theta),
                rope_scaling=scaling,
                max_seq_len=max_positions,
                qkv_bias=bool(c.get("attention_bias", mtype == "qwen2")),
                tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                model_type=mtype,
                bos_token_id=c.get("bos_token_id"),
                eos_token_ids=[int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None],
                pad_token_id=c.get("pad_token_id"),
                # a window as long as the context takes nothing away
                sliding_window=int(window) if window and int(window) < max_positions else None,
            )
        except KeyError as e:
            raise CheckpointError(f"{path}: missing field {e.args[0]!r}") from None

    @classmethod
    def from_meta(cls, path: str | Path, vocab_size: int | None = None) -> ModelConfig:
        """Read Meta's `params.json` (LLaMA 1/2/3 reference layout)."""
        path = Path(path)
        p = _read_json(path)
        try:
            dim, n_heads = int(p["dim"]), int(p["n_heads"])
            vocab = int(p.get("vocab_size", -1))
            if vocab <= 0:
                if vocab_size is None:
                    raise CheckpointError(f"{path}: vocab_size is -1 and no tokenizer/weights tell it")
                vocab = vocab_size
            hidden = p.get("hidden_dim")
            if hidden is None:  # Meta's rule for the SwiGLU width
                hidden = int(2 * 4 * dim / 3)
                if p.get("ffn_dim_multiplier"):
                    hidden = int(p["ffn_dim_multiplier"] * hidden)
                m = int(p.get("multiple_of", 256))
                hidden = m * ((hidden + m - 1) // m)
            scaling = None
            if p.get("use_scaled_rope"):
                scaling = dict(
                    rope_type="llama3",
                    factor=8.0,
                    low_freq_factor=1.0,
                    high_freq_factor=4.0,
                    original_max_position_embeddings=8192,
                )
            return cls(
                vocab_size=vocab,
                dim=dim,
                n_layers=int(p["n_layers"]),
                n_heads=n_heads,
                n_kv_heads=int(p.get("n_kv_heads") or n_heads),
                hidden_dim=int(hidden),
                norm_eps=float(p.get("norm_eps", 1e-5)),
                rope_theta=float(p.get("rope_theta", 10000.0)),
                rope_scaling=scaling,
                max_seq_len=int(p.get("max_seq_len", 4096)),
            )
        except KeyError as e:
            raise CheckpointError(f"{path}: missing field {e.args[0]!r}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` a Hugging Face tool would write for this architecture."""
        d: dict[str, Any] = {
            "architectures": [
                {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[
                    self.model_type
                ]
            ],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "intermediate_size": self.hidden_dim,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_seq_len,
            "attention_bias": self.qkv_bias,
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": self.bos_token_id,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else self.eos_token_ids,
            "hidden_act": "silu",
        }
        if self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        return d


def context_length(max_positions: int, rope_scaling: dict[str, Any] | None) -> int:
    """The positions a model can take: its `max_position_embeddings`, or, with YaRN, the original context times the
    factor where that is longer (Qwen2.5 enables 128K by adding YaRN to a config that still says 32K; vLLM reads
    it the same way)."""
    if rope_scaling and rope_scaling.get("rope_type") == "yarn":
        stretched = float(rope_scaling["factor"]) * float(rope_scaling["original_max_position_embeddings"])
        return max(max_positions, int(stretched))
    return max_positions


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data
