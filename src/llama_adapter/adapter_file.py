"""Adapter files: safetensors with a JSON header that describes the adapter and the base it fits.

Tensors: `prompts` [L, K, dim], `gates` [L, n_heads], and `visual_proj.*` for multi-modal adapters.
Metadata (all strings, as safetensors requires): format, format_version, adapter (JSON AdapterConfig),
base (JSON fingerprint), dtype, and free-form extras such as the prompt template.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from llama_adapter.config import ModelConfig
from llama_adapter.errors import AdapterError
from llama_adapter.zero_init_attention import Adapter, AdapterConfig, VisualProjection

FORMAT = "llama-adapter"
FORMAT_VERSION = "1"
FINGERPRINT_KEYS = ("n_layers", "dim", "n_heads", "n_kv_heads", "head_dim", "vocab_size")


class AdaptableModel(Protocol):
    """What adapter files need of a model (`llama_adapter.model.Transformer` has it; this module never imports it,
    so the model may offer `load_adapter` without an import circle)."""

    config: ModelConfig
    adapters: Any

    def add_adapter(self, name: str, cfg: AdapterConfig | None = None) -> Adapter: ...


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
    if isinstance(a.visual_proj, VisualProjection):
        meta["visual"] = json.dumps(a.visual_proj.config_dict())
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def read_adapter(path: str | Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"{path}: adapter file not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{path}: not a safetensors adapter file ({e})") from None
    if meta.get("format") != FORMAT:
        raise AdapterError(f"{path}: not a llama-adapter file (use `llama-adapter convert` for other formats)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdapterError(f"{path}: format version {meta.get('format_version')} is not supported")
    for k in ("prompts", "gates"):
        if k not in tensors:
            raise AdapterError(f"{path}: tensor {k!r} missing")
    return meta, tensors


def load_adapter(model: AdaptableModel, path: str | Path, name: str | None = None) -> Adapter:
    path = Path(path)
    meta, tensors = read_adapter(path)
    base = json.loads(meta["base"])
    mine = fingerprint(model.config)
    if base != mine:
        raise AdapterError(f"{path}: adapter was made for base {base}, this base is {mine}")
    cfg = AdapterConfig(**json.loads(meta["adapter"]))
    name = name or path.stem
    adapter = model.add_adapter(name, cfg)
    if tuple(tensors["prompts"].shape) != tuple(adapter.prompts.shape):
        del model.adapters[name]
        raise AdapterError(
            f"{path}: prompts {tuple(tensors['prompts'].shape)}, expected {tuple(adapter.prompts.shape)}"
        )
    with torch.no_grad():
        adapter.prompts.copy_(tensors["prompts"])
        adapter.gates.copy_(tensors["gates"])
    visual = {k.removeprefix("visual_proj."): v for k, v in tensors.items() if k.startswith("visual_proj.")}
    if visual:
        proj = VisualProjection.from_config(json.loads(meta.get("visual", "{}")), model.config.dim)
        proj.load_state_dict(visual)
        adapter.visual_proj = proj.to(adapter.prompts.device)
    adapter.meta = {k: v for k, v in meta.items() if k not in ("format", "format_version", "adapter", "base", "dtype")}
    return adapter
