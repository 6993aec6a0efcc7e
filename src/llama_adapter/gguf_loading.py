"""A frozen base from a GGUF file (llama.cpp's format): config, weights, tokenizer and chat template.

Many people keep their local models as GGUF files. One file carries what a checkpoint directory does: the
architecture numbers as metadata, the weights (often quantized), the tokenizer's vocabulary and merges, the
special token ids and the chat template. The adapter method needs floating-point weights (prompt K/V goes
through the frozen projections, gradients flow through every layer), so each weight is dequantized once, on load,
by the `gguf` package (llama.cpp's own reader and dequantizer) and then cast to the requested dtype by
`loading.load_model`. A quantized file thus loads as the model it approximates, at the size of that dtype.

What llama.cpp's converter changes, and what we undo:
- names: `token_embd`, `blk.N.attn_q/k/v/output`, `blk.N.ffn_gate/up/down`, `attn_norm`, `ffn_norm`,
  `output_norm`, `output` map to ours (q/k/v and gate/up fused, as `_hf_weights` fuses them);
- `llama` files (LLaMA 1/2/3, Mistral, TinyLlama, SmolLM: llama.cpp writes Mistral as `llama`) have the rows of
  q and k permuted per head so that rotary pairs are interleaved (Meta's layout); we rotate halves, so the
  permutation is inverted. `qwen2` files are written unpermuted. (Transformers' GGUF loader does the same:
  it un-permutes for the `llama` architecture only.)
- Llama-3.1's rope scaling is not metadata but a `rope_freqs` tensor of one divisor per frequency; it becomes
  `rope_scaling = {"rope_type": "freq_factors", "factors": [...]}`, which `model.rope_frequencies` applies
  exactly as llama.cpp does; YaRN is metadata (`rope.scaling.*`), read as transformers' yarn rope_scaling;
- a model split into parts (`NAME-00001-of-0000N.gguf`, llama-gguf-split's naming) is read from its first part:
  the metadata is there, the tensors are in all of them.

The tokenizer is rebuilt from the metadata by `transformers`' GGUF conversion (the same code that serves
`AutoTokenizer.from_pretrained(dir, gguf_file=...)`), so a GGUF base tokenizes as transformers does.
`gguf` and `transformers` are an optional extra: `pip install 'llama-adapter[gguf]'`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from llama_adapter.chat_template import ChatTemplate
from llama_adapter.config import ModelConfig, context_length
from llama_adapter.errors import CheckpointError, TemplateError
from llama_adapter.tokenizer import Tokenizer

SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")  # llama.cpp's split naming
SUPPORTED_ARCHITECTURES = ("llama", "qwen2")  # general.architecture; Mistral files say "llama"
_PERMUTED = ("llama",)  # architectures whose q/k rows llama.cpp's converter permutes for its rotary layout
_INSTALL = "pip install 'llama-adapter[gguf]'"


def is_gguf(path: str | Path) -> bool:
    """A path names a GGUF base when it ends in .gguf (it must then be a file, not a directory)."""
    return Path(path).suffix.lower() == ".gguf"


class GGUFFile:
    """One opened GGUF file: metadata values decoded on demand, tensors by name, dequantized on demand."""

    def __init__(self, path: Path, reader: Any) -> None:
        self.path, self.reader = path, reader
        no = int(self.get("split.no", 0) or 0)
        if no > 0:  # (a later part has no architecture of its own to complain about)
            count = int(self.get("split.count", 0) or 0)
            m = SPLIT_NAME.match(path.name)
            hint = f" ({path.parent / (m['stem'] + f'-00001-of-{count:05d}.gguf')})" if m else ""
            raise CheckpointError(f"{path}: part {no + 1} of a split GGUF model; pass its first part{hint}")
        self.files = [path]
        self.tensors: dict[str, Any] = {t.name: t for t in reader.tensors}
        arch = self.get("general.architecture")
        if not isinstance(arch, str):
            raise CheckpointError(f"{path}: no general.architecture in the GGUF metadata")
        self.arch = arch

    def has(self, key: str) -> bool:
        return key in self.reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        """The value of a metadata key (a list for arrays), or `default` when the file does not have it."""
        field = self.reader.fields.get(key)
        if field is None or not field.types:
            return default
        from gguf import GGUFValueType

        string = field.types[-1] == GGUFValueType.STRING
        values: list[Any] = []
        for i in field.data:
            part = field.parts[i]
            if string:
                values.append(bytes(part).decode("utf-8", errors="replace"))
            else:
                values.extend(part.tolist())
        if field.types[0] == GGUFValueType.ARRAY:
            return values
        return values[0] if values else default

    def arch_get(self, key: str, default: Any = None) -> Any:
        return self.get(f"{self.arch}.{key}", default)

    def token(self, token_id: int | None) -> str | None:
        """One entry of tokenizer.ggml.tokens, without decoding the whole vocabulary."""
        field = self.reader.fields.get("tokenizer.ggml.tokens")
        if token_id is None or field is None or not 0 <= token_id < len(field.data):
            return None
        return bytes(field.parts[field.data[token_id]]).decode("utf-8", errors="replace")

    def rows(self, name: str) -> int:
        """The number of rows (output features) of a 2-D tensor, read from its header (GGML lists dims reversed)."""
        shape = [int(d) for d in self._tensor(name).shape]
        return shape[1] if len(shape) > 1 else shape[0]

    def tensor(self, name: str) -> Tensor:
        """The tensor as float32, dequantized by `gguf.quants.dequantize` (a copy: the file stays read-only)."""
        from gguf.quants import dequantize

        t = self._tensor(name)
        try:
            values = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            kind = getattr(t.tensor_type, "name", str(t.tensor_type))
            raise CheckpointError(
                f"{self.path}: tensor {name} is stored as {kind}, which the installed gguf package cannot "
                f"dequantize (try a newer one: pip install -U gguf)"
            ) from None
        shape = tuple(reversed([int(d) for d in t.shape]))
        return torch.from_numpy(np.require(values, dtype=np.float32, requirements=["C", "W"]).reshape(shape))

    def join(self, parts: Sequence[tuple[Path, Any]]) -> None:
        """Add the tensors of a split model's other parts ((path, reader) of parts 2..n; this file, the first,
        holds the metadata)."""
        for q, r in parts:
            for t in r.tensors:
                if t.name in self.tensors:
                    raise CheckpointError(f"{q}: tensor {t.name} is also in another part of {self.path.name}'s model")
                self.tensors[t.name] = t
            self.files.append(q)

    def _tensor(self, name: str) -> Any:
        t = self.tensors.get(name)
        if t is None:
            raise CheckpointError(f"{self.path}: tensor {name} not found (a {self.arch} GGUF file should have it)")
        return t


def open_gguf(path: str | Path) -> GGUFFile:
    """The file, parsed once per version of it: load_config, the weights and the tokenizer all read it."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise CheckpointError(f"{p}: GGUF file not found ({e.strerror})") from None
    return _open(str(p), str(p.resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=1)
def _open(path: str, resolved: str, mtime_ns: int, size: int) -> GGUFFile:
    """`path` as the user wrote it (errors name it); the other arguments tell a changed or moved file apart."""
    try:
        from gguf import GGUFReader
        from gguf.quants import dequantize  # noqa: F401 -- gguf >= 0.10 has it; older releases cannot load models
    except ImportError:
        raise CheckpointError(f"{path}: reading a GGUF file needs the gguf package: {_INSTALL}") from None

    def read(p: str | Path) -> Any:
        try:
            return GGUFReader(p)
        except (ValueError, OSError, IndexError, KeyError) as e:  # bad magic, unknown version, truncated file
            raise CheckpointError(f"{p}: not a readable GGUF file ({_one_line(e)})") from None

    f = GGUFFile(Path(path), read(resolved))
    count = int(f.get("split.count", 1) or 1)
    if count > 1:
        f.join([(q, read(q)) for q in _split_parts(f, count)])
    return f


def _split_parts(first: GGUFFile, count: int) -> list[Path]:
    """Parts 2..count of a split model (llama-gguf-split, or a converter's --split-max-size), named as llama.cpp
    names them beside the first part, which must be the one given (it holds the metadata)."""
    p = first.path
    m = SPLIT_NAME.match(p.name)
    if m is None or int(m["count"]) != count:
        raise CheckpointError(
            f"{p}: the first of {count} parts of a split GGUF model, but not named NAME-00001-of-{count:05d}.gguf, "
            "so its other parts cannot be found (merge them: llama-gguf-split --merge FIRST OUT.gguf)"
        )
    parts = [p.parent / f"{m['stem']}-{i:05d}-of-{count:05d}.gguf" for i in range(2, count + 1)]
    for q in parts:
        if not q.is_file():
            raise CheckpointError(f"{q}: part of the split GGUF model {p.name} not found")
    return parts


# ---- config ------------------------------------------------------------------------------------------
def gguf_config(path: str | Path) -> ModelConfig:
    """The architecture numbers from the metadata (`{arch}.*`, `tokenizer.ggml.*`) and the tensor headers."""
    f = open_gguf(path)
    p, arch = f.path, f.arch
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{p}: GGUF architecture {arch!r} is not supported (supported: llama (LLaMA, Mistral), qwen2)"
        )
    expected = f.get("split.tensors.count")
    if expected is not None and int(expected) != len(f.tensors):
        raise CheckpointError(f"{p}: its parts hold {len(f.tensors)} tensors, the split model has {int(expected)}")
    if int(f.arch_get("expert_count", 0) or 0) > 0:
        raise CheckpointError(f"{p}: a mixture-of-experts GGUF model; only dense LLaMA-family models are supported")
    if "blk.0.attn_output.bias" in f.tensors:
        raise CheckpointError(f"{p}: the attention output projection has a bias, which this model does not support")

    def need(key: str) -> Any:
        value = f.arch_get(key)
        if value is None:
            raise CheckpointError(f"{p}: metadata {arch}.{key} missing")
        return value

    def uniform(key: str, value: Any) -> int:
        """Per-layer lists (some converters write one) are accepted when every layer has the same value."""
        if isinstance(value, list):
            if not value or len(set(value)) != 1:
                raise CheckpointError(f"{p}: {arch}.{key} differs between layers, which is not supported")
            value = value[0]
        return int(value)

    dim = int(need("embedding_length"))
    n_heads = uniform("attention.head_count", need("attention.head_count"))
    n_kv = uniform("attention.head_count_kv", f.arch_get("attention.head_count_kv", n_heads))
    head_dim = int(f.arch_get("attention.key_length") or 0) or f.rows("blk.0.attn_q.weight") // n_heads
    rotary = f.arch_get("rope.dimension_count")
    if rotary is not None and int(rotary) != head_dim:
        raise CheckpointError(f"{p}: rotary embedding on {rotary} of {head_dim} head dimensions is not supported")
    hidden = f.arch_get("feed_forward_length")
    hidden_dim = uniform("feed_forward_length", hidden) if hidden is not None else f.rows("blk.0.ffn_gate.weight")
    name = str(f.get("general.name", "") or "")
    model_type = arch if arch != "llama" else ("mistral" if "mistral" in name.lower() else "llama")
    eos: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):  # end of text, end of turn, end of message
        value = f.get(f"tokenizer.ggml.{key}")
        if value is not None and int(value) not in eos:
            eos.append(int(value))
    bos, pad = f.get("tokenizer.ggml.bos_token_id"), f.get("tokenizer.ggml.padding_token_id")
    scaling = _rope_scaling(f, head_dim)
    try:
        return ModelConfig(
            vocab_size=f.rows("token_embd.weight"),
            dim=dim,
            n_layers=int(need("block_count")),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            hidden_dim=hidden_dim,
            head_dim=head_dim,
            norm_eps=_f32(need("attention.layer_norm_rms_epsilon")),
            rope_theta=_f32(f.arch_get("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_seq_len=context_length(int(f.arch_get("context_length", 4096)), scaling),
            qkv_bias="blk.0.attn_q.bias" in f.tensors,
            tie_embeddings="output.weight" not in f.tensors,
            model_type=model_type,
            bos_token_id=int(bos) if bos is not None else None,
            eos_token_ids=eos,
            pad_token_id=int(pad) if pad is not None else None,
        )
    except CheckpointError as e:
        raise CheckpointError(f"{p}: {e}") from None


def _rope_scaling(f: GGUFFile, head_dim: int) -> dict[str, Any] | None:
    """Linear or YaRN scaling from metadata; Llama-3.1-style per-frequency divisors from the `rope_freqs` tensor."""
    kind = f.arch_get("rope.scaling.type")
    factor = f.arch_get("rope.scaling.factor")
    if kind is None and f.arch_get("rope.scale_linear") is not None:  # the first GGUF files' spelling
        kind, factor = "linear", f.arch_get("rope.scale_linear")
    if kind == "yarn":
        return _yarn_scaling(f, factor)
    if kind not in (None, "none", "linear"):
        raise CheckpointError(
            f"{f.path}: rope scaling {kind!r} is not supported (linear, yarn, or Llama-3.1's rope_freqs)"
        )
    linear = float(factor) if kind == "linear" and factor else 1.0
    if "rope_freqs.weight" in f.tensors:
        factors = (f.tensor("rope_freqs.weight").flatten() * linear).tolist()
        if len(factors) != head_dim // 2:
            raise CheckpointError(
                f"{f.path}: rope_freqs has {len(factors)} entries, head_dim {head_dim} needs {head_dim // 2}"
            )
        return {"rope_type": "freq_factors", "factors": factors}
    return {"rope_type": "linear", "factor": linear} if linear != 1.0 else None


def _yarn_scaling(f: GGUFFile, factor: Any) -> dict[str, Any]:
    """YaRN as llama.cpp's converter writes it for Qwen2.5 (factor, original context, optional betas): the same
    frequencies and cos/sin scale as transformers (`model.yarn_blend`, `model.rope_attention_factor`). The extra
    attention-scale keys DeepSeek-style files carry are refused rather than guessed at."""
    for key in ("rope.scaling.attn_factor", "rope.scaling.yarn_attn_factor", "rope.scaling.yarn_log_multiplier"):
        value = f.arch_get(key)
        if value is not None and float(value) not in (0.0, 1.0):
            raise CheckpointError(f"{f.path}: YaRN with {f.arch}.{key} = {value} is not supported")
    orig = f.arch_get("rope.scaling.original_context_length")
    if not factor or not orig:
        raise CheckpointError(f"{f.path}: YaRN rope scaling needs rope.scaling.factor and original_context_length")
    out: dict[str, Any] = {"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": int(orig)}
    for key, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
        value = f.arch_get(f"rope.scaling.{key}")
        if value is not None:
            out[name] = float(value)
    return out


def _f32(value: Any) -> float:
    """GGUF stores floats in 32 bits: 1e-6 reads back as 9.99999997e-07. The shortest decimal that is the same
    float32 is the number the source config.json said, so a GGUF base and its HF checkpoint get equal configs."""
    return float(str(np.float32(value)))


# ---- weights -----------------------------------------------------------------------------------------
def gguf_weights(path: str | Path, cfg: ModelConfig) -> Iterator[tuple[str, Tensor, Path]]:
    """Yield (our name, float32 tensor, file) in the order load_model casts and keeps them: beyond the model, memory
    holds one fp32 tensor at a time (the embedding, or one layer's fused q/k/v or gate/up)."""
    f = open_gguf(path)
    p = f.path
    yield "tok_embeddings.weight", f.tensor("token_embd.weight"), p
    yield "norm.weight", f.tensor("output_norm.weight"), p
    if not cfg.tie_embeddings:
        yield "output.weight", f.tensor("output.weight"), p
    permuted = f.arch in _PERMUTED
    for i in range(cfg.n_layers):
        blk, ours = f"blk.{i}.", f"layers.{i}."
        for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            q, k, v = (f.tensor(f"{blk}attn_{x}.{kind}") for x in "qkv")
            if permuted:
                q, k = unpermute_rope(q, cfg.n_heads), unpermute_rope(k, cfg.n_kv_heads)
            yield f"{ours}attention.wqkv.{kind}", torch.cat([q, k, v]), p
        yield f"{ours}attention.wo.weight", f.tensor(f"{blk}attn_output.weight"), p
        w13 = torch.cat([f.tensor(f"{blk}ffn_gate.weight"), f.tensor(f"{blk}ffn_up.weight")])
        yield f"{ours}feed_forward.w13.weight", w13, p
        yield f"{ours}feed_forward.w2.weight", f.tensor(f"{blk}ffn_down.weight"), p
        yield f"{ours}attention_norm.weight", f.tensor(f"{blk}attn_norm.weight"), p
        yield f"{ours}ffn_norm.weight", f.tensor(f"{blk}ffn_norm.weight"), p
    _open.cache_clear()  # load_model reads the weights last: let the file's memory map go (every tensor was copied)


def unpermute_rope(w: Tensor, n_heads: int) -> Tensor:
    """Invert llama.cpp's q/k permutation: within each head its rows come as interleaved rotary pairs
    (x0, x_{d/2}, x1, x_{d/2+1}, ...); we rotate halves (x0..x_{d/2-1} | x_{d/2}..), as Hugging Face does.
    Works for a weight [rows, in] and for a bias [rows]."""
    return w.reshape(n_heads, -1, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ---- tokenizer and chat template ---------------------------------------------------------------------
def gguf_tokenizer(path: str | Path, cfg: ModelConfig) -> Tokenizer | None:
    """The tokenizer described by tokenizer.ggml.* (None when the file has no vocabulary), built by transformers'
    GGUF conversion so that it tokenizes exactly as `AutoTokenizer.from_pretrained(dir, gguf_file=...)`."""
    f = open_gguf(path)
    if not f.has("tokenizer.ggml.tokens"):
        return None
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise CheckpointError(
            f"{f.path}: building the tokenizer of a GGUF file needs transformers: {_INSTALL}"
        ) from None
    try:
        hf = AutoTokenizer.from_pretrained(str(f.path.parent), gguf_file=f.path.name, local_files_only=True)
    except Exception as e:  # noqa: BLE001 -- transformers raises ValueError, KeyError, ... for a vocabulary it cannot build
        raise CheckpointError(f"{f.path}: cannot build the tokenizer from the GGUF metadata ({_one_line(e)})") from None
    if not cfg.eos_token_ids:
        raise CheckpointError(f"{f.path}: no EOS token id in the GGUF metadata (tokenizer.ggml.eos_token_id)")
    return Tokenizer(
        hf.backend_tokenizer, "tokenizers", cfg.bos_token_id, list(cfg.eos_token_ids), cfg.pad_token_id, f.path
    )


def gguf_chat_template(path: str | Path, name: str | None = None) -> ChatTemplate | None:
    """The file's chat template (tokenizer.chat_template, or tokenizer.chat_template.NAME), or None.

    Its special tokens (bos_token, eos_token, ...) are the vocabulary entries the tokenizer.ggml.*_token_id keys
    point at, as `ChatTemplate.from_dir` takes them from tokenizer_config.json."""
    f = open_gguf(path)
    candidates: dict[str, str] = {}
    default = f.get("tokenizer.chat_template")
    if isinstance(default, str):
        candidates["default"] = default
    for extra in f.get("tokenizer.chat_templates") or []:
        source = f.get(f"tokenizer.chat_template.{extra}")
        if isinstance(source, str):
            candidates[str(extra)] = source
    if not candidates:
        if name is not None:
            raise TemplateError(f"{f.path}: the GGUF file has no chat template (asked for {name!r})")
        return None
    key = name or ("default" if "default" in candidates else next(iter(candidates)))
    if key not in candidates:
        raise TemplateError(f"{f.path}: no chat template named {key!r} (it has: {', '.join(sorted(candidates))})")
    special = {}
    for token_key, id_key in (
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ):
        token = f.token(f.get(f"tokenizer.ggml.{id_key}"))
        if token is not None:
            special[token_key] = token
    suffix = "tokenizer.chat_template" + ("" if key == "default" else f".{key}")
    return ChatTemplate(candidates[key], special, key, f"{f.path}:{suffix}")


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())
