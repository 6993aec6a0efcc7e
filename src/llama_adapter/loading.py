"""Load a frozen base from a local directory, Hugging Face or Meta layout, straight into dtype and device.

The model is built on the meta device and each weight is assigned as it is read, so peak memory is one copy
of the weights plus one tensor (a 7B model loads in ~14 GB in bf16). Meta `.pth` shards are read with
`weights_only=True` and memory-mapped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from llama_adapter.backends import install as install_backend
from llama_adapter.chat_template import ChatTemplate
from llama_adapter.config import DTYPES, ModelConfig
from llama_adapter.errors import CheckpointError
from llama_adapter.gguf_loading import (
    gguf_chat_template,
    gguf_config,
    gguf_tokenizer,
    gguf_weights,
    is_gguf,
    open_gguf,
)
from llama_adapter.model import Transformer
from llama_adapter.tokenizer import Tokenizer, find_tokenizer

_HF_LAYER = {
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
}
_META_LAYER = {
    "attention_norm.weight": "attention_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "attention.wo.weight": "attention.wo.weight",
    "feed_forward.w2.weight": "feed_forward.w2.weight",
}


def detect_layout(path: Path) -> str:
    if is_gguf(path):
        return "gguf"
    if (path / "config.json").is_file():
        return "hf"
    if (path / "params.json").is_file():
        return "meta"
    raise CheckpointError(f"{path}: neither config.json (Hugging Face) nor params.json (Meta) found")


def resolve_base(path: str | Path) -> Path:
    if str(path) == "builtin":
        from llama_adapter.builtin import builtin_base_dir

        return builtin_base_dir()
    p = Path(path).expanduser()
    if is_gguf(p):  # a llama.cpp GGUF file (llama_adapter.gguf_loading)
        if not p.is_file():
            raise CheckpointError(f"{p}: GGUF file not found")
        return p
    if not p.is_dir():
        raise CheckpointError(f"{p}: checkpoint directory not found")
    return p


def load_config(path: str | Path) -> tuple[ModelConfig, str]:
    p = resolve_base(path)
    layout = detect_layout(p)
    if layout == "gguf":
        return gguf_config(p), layout
    if layout == "hf":
        cfg = ModelConfig.from_hf(p / "config.json")
        gen = p / "generation_config.json"
        if gen.is_file():  # Llama-3 lists several EOS ids here
            g = json.loads(gen.read_text())
            eos = g.get("eos_token_id")
            for e in eos if isinstance(eos, list) else [eos] if eos is not None else []:
                if int(e) not in cfg.eos_token_ids:
                    cfg.eos_token_ids.append(int(e))
        return cfg, layout
    shards = _meta_shards(p)
    first = _torch_load(shards[0])
    vocab = int(first["tok_embeddings.weight"].shape[0]) if "tok_embeddings.weight" in first else None
    return ModelConfig.from_meta(p / "params.json", vocab_size=vocab), layout


def load_model(
    path: str | Path,
    dtype: torch.dtype | str = torch.bfloat16,
    device: str | torch.device = "cpu",
    tokenizer: bool = True,
    chat_template: str | None = None,
    quantize: str | None = None,
) -> Transformer:
    """The frozen base: weights in `dtype` (a torch dtype or its name as the CLI spells it: "bf16", "fp16", "fp32",
    "bfloat16", ...) on `device`, every parameter requires_grad=False.

    `chat_template` names one of the checkpoint's named chat templates (default: the one called "default").
    `quantize` ("int8", "int4"; `llama_adapter.quantize`) quantizes the base's projections as they are read, so
    a full-precision copy of the weights never exists at once."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)} (or a torch.dtype)")
        dtype = DTYPES[dtype]
    if quantize is not None:  # refused (one line) before anything is read
        from llama_adapter.quantize import check_quantize

        check_quantize(quantize, device)
    p = resolve_base(path)
    cfg, layout = load_config(p)
    with torch.device("meta"):
        model = Transformer(cfg)
    if layout == "gguf":  # tokenizer first: a missing package or vocabulary fails before minutes of dequantizing
        gguf_extras = (gguf_tokenizer(p, cfg), gguf_chat_template(p, chat_template)) if tokenizer else (None, None)
        weights = gguf_weights(p, cfg)  # dequantized there, cast to dtype below
    else:
        # quantizing: read without a memory map, so the full-precision pages do not all stay resident
        weights = (
            _hf_weights(p, cfg, unmapped=quantize is not None, quantize=quantize)
            if layout == "hf"
            else _meta_weights(p, cfg)
        )
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state: dict[str, Tensor] = {}
    for name, t, src in weights:
        if name not in expected:
            continue
        if tuple(t.shape) != tuple(expected[name]):
            raise CheckpointError(
                f"{src}: {name} has shape {tuple(t.shape)}, the config implies {tuple(expected[name])}"
            )
        if quantize is not None:
            from llama_adapter.quantize import is_quantized, mode_for, quantize_weight, quantizes

            if isinstance(t, FileRows):  # read and quantized a block of rows at a time
                t = quantize_weight(_CastRows(t, dtype), mode_for(name, quantize)) if quantizes(name) else t.read()
            if is_quantized(t):  # quantized by the reader, part by part, or just above
                state[name] = t
                continue
        state[name] = t.to(device=device, dtype=dtype)
        if quantize is not None and quantizes(name):
            state[name] = quantize_weight(state[name], mode_for(name, quantize))
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(
            f"{p}: weights missing from the checkpoint: {', '.join(missing[:5])}"
            + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        )
    model.load_state_dict(state, assign=True, strict=True)
    del state
    model.freeze_base()
    model.eval()
    if quantize is not None:  # the quantized projections' modules (llama_adapter.quantize)
        from llama_adapter.quantize import quantize_model

        quantize_model(model, quantize)
    install_backend(model)  # the compute backend for this device, chosen once (llama_adapter.backends)
    model.source = str(p)
    if layout == "gguf":  # the vocabulary and the chat template are metadata of the same file
        model.tokenizer, model.chat_template = gguf_extras
        return model
    tok_file = find_tokenizer(p) if tokenizer else None
    model.tokenizer = Tokenizer.from_file(tok_file, cfg) if tok_file else None
    model.chat_template = ChatTemplate.from_dir(tok_file.parent, chat_template) if tok_file else None
    return model


# ---- Hugging Face ------------------------------------------------------------------------------------
def _hf_files(p: Path) -> list[Path]:
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        paths = [p / f for f in files]
        for f in paths:
            if not f.is_file():
                raise CheckpointError(f"{f}: shard listed in {index.name} not found")
        return paths
    if (p / "model.safetensors").is_file():
        return [p / "model.safetensors"]
    bins = sorted(p.glob("pytorch_model*.bin"))
    if bins:
        return bins
    raise CheckpointError(f"{p}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class FileRows:
    """A tensor of a safetensors file, read whole (`load`) or, a matrix, a block of rows at a time (`rows`:
    `quantize.RowSource`; `read` for all its rows), each read a plain one into fresh memory: quantizing it as it is
    read then holds one block in full precision, not the matrix (`load_model(..., quantize=)`)."""

    def __init__(self, path: Path, key: str, offset: int, dtype: torch.dtype, shape: list[int]) -> None:
        self.path, self.key, self.offset, self.dtype, self.shape = path, key, offset, dtype, torch.Size(shape)

    def _bytes(self, start: int, n: int) -> Tensor:
        buf = torch.empty(n, dtype=torch.uint8)
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset + start)
                if fh.readinto(buf.numpy().data) != n:
                    raise OSError(f"{self.key} is cut short")
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read safetensors ({type(e).__name__}: {e})") from None
        return buf

    def rows(self, start: int, stop: int) -> Tensor:
        if not 0 <= start <= stop <= self.shape[0]:
            raise IndexError(f"{self.key}: rows {start}..{stop} of {self.shape[0]}")
        row_bytes = self.shape[1:].numel() * self.dtype.itemsize
        block = self._bytes(start * row_bytes, (stop - start) * row_bytes)
        return block.view(self.dtype).view(stop - start, *self.shape[1:])

    def read(self) -> Tensor:
        """The matrix whole (what its consumer asks for where it is not quantized by blocks)."""
        return self.rows(0, self.shape[0])

    def load(self) -> Tensor:
        """Any tensor of the file whole, of any shape (the reader's own reads)."""
        return self._bytes(0, self.shape.numel() * self.dtype.itemsize).view(self.dtype).view(self.shape)


def _read_safetensors_unmapped(f: Path, rows_of: Callable[[str], bool] = lambda k: False) -> Iterator[tuple[str, Any]]:
    """A safetensors file one tensor at a time with plain reads into fresh memory, no memory map; the matrices
    `rows_of(key)` names as `FileRows`, read later by whoever quantizes them.

    A map keeps every page it has touched in the process's resident memory until it is closed, so a base that is
    quantized as it is read would peak at the whole file plus its quantized copy; read this way it peaks at the
    quantized weights plus one block of rows in full precision (`load_model(..., quantize=)`)."""
    try:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f}: cannot read safetensors ({type(e).__name__}: {e})") from None
    for k, info in header.items():
        if k == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            dtype, shape = _SAFETENSORS_DTYPES[info["dtype"]], info["shape"]
            if end - start != torch.Size(shape).numel() * dtype.itemsize:
                raise ValueError(f"{k}: {end - start} bytes for shape {shape}")
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{f}: cannot read safetensors ({type(e).__name__}: {e})") from None
        stored = FileRows(f, k, 8 + n + start, dtype, shape)
        # (read here, the tensor is yielded with no reference left in this frame: the reader may free it while we wait)
        yield k, stored if len(shape) == 2 and rows_of(k) else stored.load()


class _CastRows:
    """`FileRows` whose blocks come cast to `dtype` (as a weight read whole is cast before it is quantized)."""

    def __init__(self, rows: FileRows, dtype: torch.dtype) -> None:
        self.source, self.dtype, self.shape = rows, dtype, rows.shape

    def rows(self, start: int, stop: int) -> Tensor:
        return self.source.rows(start, stop).to(self.dtype)


def _whole(t: Any) -> Tensor:
    """A tensor as read, or a `FileRows` read whole."""
    return t.read() if isinstance(t, FileRows) else t


def _read_tensors(
    f: Path, unmapped: bool = False, rows_of: Callable[[str], bool] = lambda k: False
) -> Iterator[tuple[str, Any]]:
    if f.suffix == ".bin":
        yield from _torch_load(f).items()
        return
    if unmapped:
        yield from _read_safetensors_unmapped(f, rows_of)
        return
    try:
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            for k in fh.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                yield k, fh.get_tensor(k)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{f}: cannot read safetensors ({e})") from None


def _hf_weights(
    p: Path, cfg: ModelConfig, unmapped: bool = False, quantize: str | None = None
) -> Iterator[tuple[str, Tensor, Path]]:
    """Yield (our name, tensor, file); q/k/v and gate/up are fused as soon as all parts of a layer arrive. With
    `quantize`, parts that can be quantized on their own are, on arrival (`quantize.quantize_part`), and their
    packs joined: the full-precision copy of a fused projection is then never made."""
    pending: dict[str, dict[str, Tensor]] = {}
    prepare: Callable[[str, Any], Tensor] = lambda key, t: t  # noqa: E731
    join: Callable[[list[Tensor]], Tensor] = torch.cat
    rows_of: Callable[[str], bool] = lambda k: False  # noqa: E731
    if quantize is not None:
        from llama_adapter.quantize import join_rows, quantize_part

        def prepare(key: str, t: Any) -> Tensor:  # a part quantized on its own, or read whole to be joined
            return _whole(quantize_part(key, t, cfg=cfg, mode=quantize))

        join = join_rows

        def rows_of(key: str) -> bool:  # the matrices quantized: read a block of rows at a time, by whoever does
            # (a fused projection's parts `quantize_part` cannot take are read whole; a tied checkpoint's stored head
            # is never read)
            return key == "lm_head.weight" or (key.endswith(".weight") and "_proj." in key)

    fuse = {
        "q_proj": ("wqkv", 0),
        "k_proj": ("wqkv", 1),
        "v_proj": ("wqkv", 2),
        "gate_proj": ("w13", 0),
        "up_proj": ("w13", 1),
    }
    pat = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(weight|bias)$")
    for f in _hf_files(p):
        for k, t in _read_tensors(f, unmapped, rows_of):
            if k == "model.embed_tokens.weight":
                yield "tok_embeddings.weight", t, f
            elif k == "model.norm.weight":
                yield "norm.weight", t, f
            elif k == "lm_head.weight":
                if not cfg.tie_embeddings:
                    yield "output.weight", t, f
            elif (m := pat.match(k)) and m.group(3) in fuse:
                i, part, kind = m.group(1), m.group(3), m.group(4)
                fused, slot = fuse[part]
                parent = "attention" if fused == "wqkv" else "feed_forward"
                key = f"layers.{i}.{parent}.{fused}.{kind}"
                parts = pending.setdefault(key, {})
                parts[str(slot)] = prepare(key, t)
                del t
                if len(parts) == (3 if fused == "wqkv" else 2):
                    yield key, join([parts[str(j)] for j in range(len(parts))]), f
                    del pending[key]
            elif k.startswith("model.layers."):
                i, rest = k[len("model.layers.") :].split(".", 1)
                if rest in _HF_LAYER:
                    yield f"layers.{i}.{_HF_LAYER[rest]}", t, f
    if pending:
        raise CheckpointError(f"{p}: incomplete fused weights for {', '.join(sorted(pending)[:3])}")


# ---- Meta --------------------------------------------------------------------------------------------
def _meta_shards(p: Path) -> list[Path]:
    shards = sorted(p.glob("consolidated.*.pth"))
    if not shards:
        raise CheckpointError(f"{p}: params.json found but no consolidated.*.pth")
    return shards


def _permute_rope(w: Tensor, n_heads: int, head_dim: int) -> Tensor:
    """Meta rotates interleaved pairs; we rotate halves (as Hugging Face does): permute q/k rows."""
    return w.view(n_heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(n_heads * head_dim, -1)


def load_error_line(e: BaseException) -> str:
    """One line for a failed `torch.load`: torch's refusal of an unsafe pickle is a paragraph of advice
    (re-run with weights_only=False, ...), of which only the "WeightsUnpickler error: ..." line says what is
    wrong; a CLI error must be one line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    found = next((ln for ln in lines if ln.startswith("WeightsUnpickler error:")), None)
    if found is not None:
        return "unsafe pickle refused: " + found.removeprefix("WeightsUnpickler error:").strip()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _torch_load(f: Path) -> dict[str, Any]:
    """A .pth/.bin state dict, read with weights_only=True; CheckpointError (one line) when it cannot be."""
    try:
        return torch.load(f, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unpickling failure means an unusable file
        raise CheckpointError(f"{f}: cannot load with weights_only=True ({load_error_line(e)})") from None


def _meta_weights(p: Path, cfg: ModelConfig) -> Iterator[tuple[str, Tensor, Path]]:
    shards = _meta_shards(p)
    sds = []
    for s in shards:
        sds.append(_torch_load(s))
    d, hd = cfg.dim, cfg.head_dim
    full_shapes = {
        "tok_embeddings.weight": (cfg.vocab_size, d),
        "output.weight": (cfg.vocab_size, d),
        "norm.weight": (d,),
        "attention.wq.weight": (cfg.n_heads * hd, d),
        "attention.wk.weight": (cfg.n_kv_heads * hd, d),
        "attention.wv.weight": (cfg.n_kv_heads * hd, d),
        "attention.wo.weight": (d, cfg.n_heads * hd),
        "feed_forward.w1.weight": (cfg.hidden_dim, d),
        "feed_forward.w2.weight": (d, cfg.hidden_dim),
        "feed_forward.w3.weight": (cfg.hidden_dim, d),
        "attention_norm.weight": (d,),
        "ffn_norm.weight": (d,),
    }

    def merged(key: str) -> Tensor:
        parts = [sd[key] for sd in sds if key in sd]
        if not parts:
            raise CheckpointError(f"{p}: {key} not found in {', '.join(s.name for s in shards)}")
        if len(parts) == 1:
            return parts[0]
        generic = re.sub(r"^layers\.\d+\.", "", key)
        full = full_shapes.get(generic)
        if full is None or tuple(parts[0].shape) == tuple(full):
            return parts[0]  # replicated (norms)
        for dim in range(parts[0].dim()):
            if parts[0].shape[dim] * len(parts) == full[dim]:
                return torch.cat(parts, dim=dim)
        raise CheckpointError(f"{p}: cannot merge shards of {key} {tuple(parts[0].shape)} into {full}")

    src = shards[0]
    yield "tok_embeddings.weight", merged("tok_embeddings.weight"), src
    yield "norm.weight", merged("norm.weight"), src
    if not cfg.tie_embeddings:
        yield "output.weight", merged("output.weight"), src
    for i in range(cfg.n_layers):
        pre = f"layers.{i}."
        wq = _permute_rope(merged(pre + "attention.wq.weight"), cfg.n_heads, hd)
        wk = _permute_rope(merged(pre + "attention.wk.weight"), cfg.n_kv_heads, hd)
        yield pre + "attention.wqkv.weight", torch.cat([wq, wk, merged(pre + "attention.wv.weight")]), src
        w13 = torch.cat([merged(pre + "feed_forward.w1.weight"), merged(pre + "feed_forward.w3.weight")])
        yield pre + "feed_forward.w13.weight", w13, src
        for k, ours in _META_LAYER.items():
            yield pre + ours, merged(pre + k), src


def checkpoint_files(path: str | Path) -> list[Path]:
    p = resolve_base(path)
    if is_gguf(p):
        return list(open_gguf(p).files)  # a split model's every part
    return _hf_files(p) if detect_layout(p) == "hf" else _meta_shards(p)
