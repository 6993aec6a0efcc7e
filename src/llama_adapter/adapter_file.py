"""Adapter files: safetensors with a JSON header that describes the adapter and the base it fits.

Tensors: `prompts` [L, K, dim], `gates` [L, n_heads], and `visual_proj.*` for multi-modal adapters (one
projection for images; `visual_proj.parts.<modality>.*` for audio, video or several modalities).
Metadata (all strings, as safetensors requires): format, format_version, adapter (JSON AdapterConfig),
base (JSON fingerprint), dtype, and free-form extras such as the prompt template.
"""

from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from llama_adapter.config import ModelConfig
from llama_adapter.errors import AdapterError
from llama_adapter.zero_init_attention import (
    Adapter,
    AdapterConfig,
    ConditionProjection,
    VisualProjection,
    projection_from_config,
)

FORMAT = "llama-adapter"
FORMAT_VERSION = "1"
FINGERPRINT_KEYS = ("n_layers", "dim", "n_heads", "n_kv_heads", "head_dim", "vocab_size")
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
ADAPTER_NAME_RULE = "1-64 characters, letters, digits, '_' and '-', starting with a letter or digit"


class AdaptableModel(Protocol):
    """What adapter files need of a model (`llama_adapter.model.Transformer` has it; this module never imports it,
    so the model may offer `load_adapter` without an import circle)."""

    config: ModelConfig
    adapters: Any

    def add_adapter(self, name: str, cfg: AdapterConfig | None = None) -> Adapter: ...

    def new_adapter(self, cfg: AdapterConfig) -> Adapter: ...


def fingerprint(cfg: ModelConfig) -> dict[str, int]:
    return {k: int(getattr(cfg, k)) for k in FINGERPRINT_KEYS}


def save_adapter(
    model: AdaptableModel,
    name: str,
    path: str | Path,
    extra: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write adapter `name` atomically (temp file + rename)."""
    a: Adapter = model.adapters[name]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"prompts": a.prompts.detach(), "gates": a.gates.detach()}
    if a.visual_proj is not None:
        tensors.update({f"visual_proj.{k}": v.detach() for k, v in a.visual_proj.state_dict().items()})
    tensors = {k: v.to("cpu", dtype).contiguous() for k, v in tensors.items()}
    meta = {k: str(v) for k, v in a.meta.items()}
    meta.update({k: (v if isinstance(v, str) else json.dumps(v)) for k, v in (extra or {}).items()})
    meta.update(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "adapter": json.dumps(a.cfg.to_dict()),
            "base": json.dumps(fingerprint(model.config)),
            "dtype": str(dtype).removeprefix("torch."),
        }
    )
    if isinstance(a.visual_proj, (VisualProjection, ConditionProjection)):
        meta["visual"] = json.dumps(a.visual_proj.config_dict())
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def check_adapter_name(name: object) -> str:
    """`name` if it may name an adapter, else AdapterError.

    Names are ids, never paths: `ADAPTER_NAME` has no '/', no '.' (torch refuses module names with dots, and so
    no '..' either) and no spaces, so a name can be put in a URL, a log line or `DIR/NAME.safetensors` as is.
    """
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        shown = repr(name) if not isinstance(name, str) or len(name) <= 80 else repr(name[:80] + "...")
        raise AdapterError(f"adapter name {shown} is not allowed: {ADAPTER_NAME_RULE}")
    return name


def json_metadata(path: Path, meta: dict[str, str], key: str) -> Any:
    """A JSON field of a file's metadata, decoded; AdapterError when it is missing or not JSON."""
    if key not in meta:
        raise AdapterError(f"{path}: metadata {key!r} missing")
    try:
        return json.loads(meta[key])
    except ValueError:
        raise AdapterError(f"{path}: metadata {key!r} is not JSON") from None


def read_safetensors(path: Path, what: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a whole safetensors file (never unpickled); AdapterError, naming `what` the file
    should be, when it is missing or unreadable."""
    if path.is_dir():  # (a run directory given for the adapter.safetensors inside it, say)
        inside = " (it holds adapter.safetensors)" if (path / "adapter.safetensors").is_file() else ""
        raise AdapterError(f"{path}: a directory, not a {what}{inside}")
    if not path.is_file():
        raise AdapterError(f"{path}: adapter file not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise AdapterError(f"{path}: not a {what} ({e})") from None


def _json_meta(path: Path, meta: dict[str, str], key: str) -> dict[str, Any]:
    value = json_metadata(path, meta, key)
    if not isinstance(value, dict):
        raise AdapterError(f"{path}: metadata {key!r} is not a JSON object")
    return value


def adapter_config(path: Path, meta: dict[str, str]) -> AdapterConfig:
    """The AdapterConfig a file records; AdapterError (never KeyError/TypeError) when it is missing or malformed."""
    raw = _json_meta(path, meta, "adapter")
    known = {f.name for f in fields(AdapterConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise AdapterError(f"{path}: unknown adapter config key(s) {unknown} (known: {sorted(known)})")
    if not all(isinstance(raw.get(k, 1), int) for k in ("prompt_length", "layers")):
        raise AdapterError(f"{path}: adapter config prompt_length and layers must be integers")
    try:
        return AdapterConfig(**raw)
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{path}: bad adapter config: {e}") from None


def _check_tensors(path: Path, cfg: AdapterConfig, tensors: dict[str, torch.Tensor]) -> None:
    """What a file must hold whatever the base: float tensors, finite values, prompts [L, K, dim] and gates
    [L, heads] with L and K as the config says."""
    for k, t in tensors.items():
        if not t.is_floating_point():
            raise AdapterError(f"{path}: tensor {k!r} has dtype {t.dtype}, expected a floating-point dtype")
        if not bool(torch.isfinite(t).all()):
            raise AdapterError(f"{path}: non-finite values in {k}")
    prompts, gates = tensors["prompts"], tensors["gates"]
    want = (cfg.layers, cfg.prompt_length)
    if prompts.dim() != 3 or tuple(prompts.shape[:2]) != want:
        raise AdapterError(f"{path}: prompts {tuple(prompts.shape)}, expected {want} + (dim,) as its config says")
    if gates.dim() != 2 or gates.shape[0] != cfg.layers:
        raise AdapterError(f"{path}: gates {tuple(gates.shape)}, expected ({cfg.layers}, n_heads) as its config says")


def read_adapter(path: str | Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Metadata and tensors of an adapter file, checked for everything that needs no base (format, metadata,
    config, dtypes, finite values, prompts and gates consistent with the config): `info` refuses what `load`
    would."""
    path = Path(path)
    meta, tensors = read_safetensors(path, "safetensors adapter file")
    if meta.get("format") != FORMAT:
        raise AdapterError(f"{path}: not a llama-adapter file (use `llama-adapter convert` for other formats)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdapterError(f"{path}: format version {meta.get('format_version')} is not supported")
    for k in ("prompts", "gates"):
        if k not in tensors:
            raise AdapterError(f"{path}: tensor {k!r} missing")
    base = _json_meta(path, meta, "base")
    if not all(isinstance(v, int) for v in base.values()):
        raise AdapterError(f"{path}: metadata 'base' must map {list(FINGERPRINT_KEYS)} to integers")
    cfg = adapter_config(path, meta)
    _check_tensors(path, cfg, tensors)
    if any(k.startswith("visual_proj.") for k in tensors):
        _json_meta(path, meta, "visual")
    return meta, tensors


def build_adapter(model: AdaptableModel, path: str | Path) -> Adapter:
    """The adapter in `path`, read and checked against `model`'s base, but NOT registered: everything that can
    fail happens here, so a caller that registers the result afterwards never leaves a half-loaded adapter (and
    the server can do this slow part outside its model lock)."""
    path = Path(path)
    meta, tensors = read_adapter(path)
    base = json.loads(meta["base"])
    mine = fingerprint(model.config)
    if base != mine:
        raise AdapterError(f"{path}: adapter was made for base {base}, this base is {mine}")
    cfg = adapter_config(path, meta)
    try:
        adapter = model.new_adapter(cfg)
    except ValueError as e:
        raise AdapterError(f"{path}: {e}") from None
    for k in ("prompts", "gates"):
        got, want = tuple(tensors[k].shape), tuple(getattr(adapter, k).shape)
        if got != want:
            raise AdapterError(f"{path}: {k} {got}, expected {want} for this base")
    with torch.no_grad():
        adapter.prompts.copy_(tensors["prompts"])
        adapter.gates.copy_(tensors["gates"])
    visual = {k.removeprefix("visual_proj."): v for k, v in tensors.items() if k.startswith("visual_proj.")}
    if visual:
        try:
            proj = projection_from_config(_json_meta(path, meta, "visual"), model.config.dim)
        except ValueError as e:  # a config the projections refuse (AdapterError is one too)
            raise AdapterError(f"{path}: {e}") from None
        try:
            proj.load_state_dict(visual)
        except RuntimeError as e:  # missing/unexpected keys or shapes that contradict the recorded config
            first = str(e).strip().splitlines()[0]
            raise AdapterError(f"{path}: visual projection does not match its config: {first}") from None
        adapter.visual_proj = proj.to(adapter.prompts.device)
    adapter.meta = {k: v for k, v in meta.items() if k not in ("format", "format_version", "adapter", "base", "dtype")}
    return adapter


def load_adapter(model: AdaptableModel, path: str | Path, name: str | None = None) -> Adapter:
    """Read, check and then register the adapter in `path` as `name` (default: the file's stem). Registration is
    the last step: on any error `model.adapters` is left exactly as it was."""
    path = Path(path)
    name = check_adapter_name(name or path.stem)
    adapter = build_adapter(model, path)
    model.adapters[name] = adapter
    return adapter
