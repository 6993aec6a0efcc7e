"""Encoder adapters on disk: safetensors tensors (only what the method trained) and JSON metadata.

Metadata (strings, as safetensors requires): format "llama-adapter-encoder", format_version, task, method, labels
(JSON list: the classes, in head order), prompts (JSON PromptConfig, or null), encoder (JSON fingerprint of the
checkpoint's shape), and free-form extras (e.g. the CLIP class-name template). Tensors are named as the task model's
parameters ("prompts.encoder.prompts", "head.weight", ...). Reading checks everything before any weight is copied:
format, metadata, that the file fits the encoder, and that it holds exactly the tensors its method trains, each
finite and of the expected shape. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from llama_adapter.adapter_file import json_metadata, read_safetensors
from llama_adapter.encoders.heads import METHODS, TASKS, TaskModel
from llama_adapter.encoders.prompts import GatedPrompts, PromptConfig
from llama_adapter.errors import AdapterError

FORMAT = "llama-adapter-encoder"
FORMAT_VERSION = "1"
_SHAPE_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
    "image_size",
    "patch_size",
    "max_position_embeddings",
    "projection_dim",
)


def fingerprint(encoder: nn.Module) -> dict[str, Any]:
    """The encoder's shape, from its config (both towers for CLIP): what an adapter must match."""
    cfg: Any = getattr(encoder, "config", None)
    if cfg is None:
        raise AdapterError(f"{type(encoder).__name__}: not a transformers model (no config)")

    def shape(c: Any) -> dict[str, Any]:
        return {k: getattr(c, k) for k in _SHAPE_KEYS if isinstance(getattr(c, k, None), (int, str))}

    out = shape(cfg)
    for tower in ("vision_config", "text_config"):
        sub = getattr(cfg, tower, None)
        if sub is not None:
            out[tower] = shape(sub)
    return out


def save_encoder_adapter(
    model: TaskModel, path: str | Path, labels: list[str], extra: dict[str, Any] | None = None
) -> Path:
    """Write the trained tensors and the metadata atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {n: p.detach().to("cpu", torch.float32).contiguous() for n, p in model.trainable().items()}
    meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in (extra or {}).items()}
    meta.update(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "task": model.task,
            "method": model.method,
            "labels": json.dumps(labels),
            "prompts": json.dumps(model.prompt_cfg.to_dict() if model.prompt_cfg else None),
            "encoder": json.dumps(fingerprint(model.encoder)),
        }
    )
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def read_encoder_adapter(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata with its JSON fields decoded, tensors), checked for everything that needs no encoder."""
    path = Path(path)
    raw, tensors = read_safetensors(path, "safetensors file")
    if raw.get("format") != FORMAT:
        raise AdapterError(f"{path}: not an encoder adapter (format {raw.get('format')!r}, expected {FORMAT!r})")
    if raw.get("format_version") != FORMAT_VERSION:
        raise AdapterError(f"{path}: format version {raw.get('format_version')!r} is not supported")
    meta: dict[str, Any] = dict(raw)
    if meta.get("task") not in TASKS:
        raise AdapterError(f"{path}: unknown task {meta.get('task')!r} (known: {', '.join(TASKS)})")
    if meta.get("method") not in METHODS:
        raise AdapterError(f"{path}: unknown method {meta.get('method')!r} (known: {', '.join(METHODS)})")
    labels = json_metadata(path, raw, "labels")
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise AdapterError(f"{path}: metadata 'labels' must be a JSON list of strings")
    meta["labels"] = labels
    prompts = json_metadata(path, raw, "prompts")
    if prompts is not None:
        try:
            meta["prompts"] = PromptConfig(**prompts)
        except (TypeError, ValueError) as e:
            raise AdapterError(f"{path}: bad prompt config: {e}") from None
    else:
        meta["prompts"] = None
    meta["encoder"] = json_metadata(path, raw, "encoder")
    for k, t in tensors.items():
        if not t.is_floating_point():
            raise AdapterError(f"{path}: tensor {k!r} has dtype {t.dtype}, expected floating point")
        if not bool(torch.isfinite(t).all()):
            raise AdapterError(f"{path}: non-finite values in {k!r}")
    return meta, tensors


def load_encoder_adapter(encoder: nn.Module, path: str | Path) -> tuple[TaskModel, dict[str, Any]]:
    """The task model the file describes, built on `encoder` and holding the file's weights; the metadata.

    Everything is checked before the weights are copied: the encoder fingerprint, then that the file holds
    exactly the tensors the method trains for this task, with this encoder's shapes.
    """
    path = Path(path)
    meta, tensors = read_encoder_adapter(path)
    mine = fingerprint(encoder)
    if meta["encoder"] != mine:
        diff = sorted(k for k in set(mine) | set(meta["encoder"]) if mine.get(k) != meta["encoder"].get(k))
        raise AdapterError(f"{path}: adapter was made for another encoder (differs in {', '.join(diff)})")
    try:
        model = TaskModel(encoder, meta["task"], meta["method"], len(meta["labels"]), meta["prompts"])
    except (ValueError, TypeError) as e:
        raise AdapterError(f"{path}: {e}") from None
    want = {n: tuple(p.shape) for n, p in model.trainable().items()}
    got = {n: tuple(t.shape) for n, t in tensors.items()}
    problem = ""
    if set(want) != set(got):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        problem = f"tensors do not fit its method: missing {missing[:3]}, unexpected {extra[:3]}"
    elif bad := [n for n in want if want[n] != got[n]]:
        problem = f"{bad[0]} has shape {got[bad[0]]}, this encoder needs {want[bad[0]]}"
    if problem:
        for p in model.prompts.values():  # leave the encoder as it was
            if isinstance(p, GatedPrompts):
                p.remove()
        raise AdapterError(f"{path}: {problem}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)
    return model, meta
