"""Multi-modal fine-tuning data: image features for every record, computed once and cached on disk.

- `attach_visual_projection`: give an adapter the projection (eq. 10) for an encoder's features.
- `prepare_multimodal`: the fine-tuning hook. It attaches the projection to an adapter and computes (and caches
  on disk, `FeatureCache`) the encoder features of every record that has an `"image"` field.
- `llava_to_alpaca`, `resolve_image`: LLaVA conversations and image paths.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from llama_adapter.errors import ImageError, UserError
from llama_adapter.multimodal.encoder import ImageEncoder, load_image
from llama_adapter.zero_init_attention import VisualProjection

IMAGE_TOKEN = "<image>"


def attach_visual_projection(model: Any, adapter_name: str, encoder: ImageEncoder, hidden: int = 64) -> nn.Module:
    """Give adapter `adapter_name` a projection for `encoder`'s features (fp32, on the model's device)."""
    adapter = model.adapters[adapter_name]
    dim = int(model.config.dim)
    proj = adapter.visual_proj
    if proj is not None:
        if getattr(proj, "in_features", encoder.feature_dim) != encoder.feature_dim:
            raise UserError(
                f"adapter {adapter_name!r} projects {proj.in_features} image features, the encoder "
                f"{encoder.path} gives {encoder.feature_dim}"
            )
    else:
        dev = adapter.prompts.device
        proj = VisualProjection(encoder.feature_dim, dim, hidden=hidden, groups=encoder.groups).to(dev)
        adapter.visual_proj = proj
    adapter.meta["image_encoder"] = os.path.abspath(encoder.path)  # usable from any working directory
    adapter.meta["image_encoder_fingerprint"] = json.dumps(encoder.fingerprint(), sort_keys=True)
    return proj


# ---- data ----------------------------------------------------------------------------------------------------
def llava_to_alpaca(record: dict[str, Any]) -> dict[str, Any]:
    """A LLaVA conversation record -> an Alpaca record (first human turn -> instruction, first gpt -> output).

    `{"image": "x.png", "conversations": [{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt",
    "value": "A"}]}` -> `{"instruction": "Q", "input": "", "output": "A", "image": "x.png"}`. Later turns are
    dropped (the paper's setting is single-turn).
    """
    conv = record.get("conversations")
    if not isinstance(conv, list):
        raise ValueError("not a LLaVA record (no 'conversations' list)")
    human = next((t.get("value", "") for t in conv if t.get("from") in ("human", "user")), None)
    gpt = next((t.get("value", "") for t in conv if t.get("from") in ("gpt", "assistant")), None)
    if human is None or gpt is None:
        raise ValueError("LLaVA record needs a human and a gpt turn")
    text = human.replace(IMAGE_TOKEN + "\n", "").replace("\n" + IMAGE_TOKEN, "").replace(IMAGE_TOKEN, "").strip()
    out: dict[str, Any] = {"instruction": text, "input": "", "output": gpt.strip()}
    if record.get("image"):
        out["image"] = record["image"]
    if "id" in record:
        out["id"] = record["id"]
    return out


def _cfg(cfg: Any, name: str, default: Any = None) -> Any:
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def resolve_image(
    rec: dict[str, Any], image_root: str | os.PathLike[str] | None, data_dir: str | os.PathLike[str] | None = None
) -> str | Path:
    """The image of a record: data URLs pass through; relative paths are taken from `image_root`, else the
    record's `_dir` (its data file's folder, set by the data loader), else `data_dir`, else the cwd."""
    src = rec["image"]
    if not isinstance(src, str) or src.startswith("data:"):
        return src
    p = Path(src).expanduser()
    if p.is_absolute():
        return p
    for base in (image_root, rec.get("_dir"), data_dir):
        if base:
            return Path(base).expanduser() / p
    return p


def _record_name(rec: dict[str, Any], i: int) -> str:
    rid = rec.get("id", rec.get("pid"))
    return f"record {i}" + (f" (id {rid})" if rid is not None else "")


class FeatureCache:
    """Encoder features on disk: `<dir>/<encoder key>/<item key>.npy`, written atomically.

    Item key: sha256 of the resolved path + size + mtime (files), or of the bytes (data URLs).
    """

    def __init__(self, root: str | os.PathLike[str] | None, encoder: ImageEncoder) -> None:
        self.dir = Path(root).expanduser() / encoder.fingerprint_key() if root else None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            meta = self.dir / "encoder.json"
            if not meta.is_file():
                meta.write_text(json.dumps(encoder.fingerprint(), indent=1))

    @staticmethod
    def key(src: str | Path) -> str:
        if isinstance(src, str) and src.startswith("data:"):
            return hashlib.sha256(src.encode()).hexdigest()[:32]
        p = Path(src).resolve()
        st = p.stat()
        return hashlib.sha256(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]

    def get(self, key: str) -> Tensor | None:
        if self.dir is None:
            return None
        f = self.dir / f"{key}.npy"
        if not f.is_file():
            return None
        try:
            return torch.from_numpy(np.load(f))
        except (OSError, ValueError):
            return None

    def put(self, key: str, feat: Tensor) -> None:
        if self.dir is None:
            return
        f = self.dir / f"{key}.npy"
        tmp = self.dir / f".{key}.{os.getpid()}.tmp.npy"
        np.save(tmp, feat.float().numpy())
        tmp.replace(f)


def compute_features(
    encoder: ImageEncoder,
    records: list[dict[str, Any]],
    *,
    image_root: Any = None,
    data_dir: Any = None,
    cache_dir: Any = None,
    skip_invalid: bool = False,
    progress: bool = False,
    batch_size: int = 32,
    label: str = "train",
) -> list[dict[str, Any]]:
    """Set `rec["image_features"]` (float32 [F]) on every record with an `"image"`; returns the records kept.

    Unreadable images raise `ImageError` naming the record, or drop the record when `skip_invalid`.
    """
    cache = FeatureCache(cache_dir, encoder)
    keep: list[dict[str, Any]] = []
    todo: list[tuple[dict[str, Any], str, Image.Image]] = []
    hits = skipped = 0

    def flush() -> None:
        if not todo:
            return
        feats = encoder.encode([im for _, _, im in todo], batch_size=batch_size)
        for (rec, key, _), f in zip(todo, feats, strict=True):
            rec["image_features"] = f.clone()
            cache.put(key, f)
        todo.clear()

    for i, rec in enumerate(records):
        if not rec.get("image"):
            keep.append(rec)
            continue
        try:
            src = resolve_image(rec, image_root, data_dir)
            try:
                key = FeatureCache.key(src)
            except OSError:
                raise ImageError(f"{src}: image file not found") from None
            feat = cache.get(key)
            if feat is not None:
                if feat.numel() != encoder.feature_dim:
                    feat = None
                else:
                    rec["image_features"] = feat
                    hits += 1
            if feat is None:
                todo.append((rec, key, load_image(src)))
        except ImageError as e:
            if skip_invalid:
                skipped += 1
                continue
            raise ImageError(f"{label} {_record_name(rec, i)}: {e}") from None
        keep.append(rec)
        if len(todo) >= batch_size:
            flush()
    flush()
    if progress:
        n_img = sum(1 for r in keep if "image_features" in r)
        print(f"image features ({label}): {n_img} images, {hits} from cache, {skipped} skipped", flush=True)
    return keep


def prepare_multimodal(
    model: Any, adapter_name: str, records: list[dict[str, Any]], val_records: list[dict[str, Any]] | None, cfg: Any
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Fine-tuning hook: attach the projection to the adapter and compute every record's image features.

    Reads from `cfg` (a TrainConfig or dict): image_encoder (dir; nothing happens when unset), image_root,
    feature_cache, skip_invalid, progress, and data (the data file, or the first of a list, whose folder
    resolves relative image paths when neither image_root nor a record's `_dir` is given). The encoder runs
    on the model's device in fp32 and is dropped afterwards; features live on the CPU.
    """
    enc_dir = _cfg(cfg, "image_encoder")
    if not enc_dir:
        return records, val_records
    dev = model.tok_embeddings.weight.device
    encoder = ImageEncoder.load(enc_dir, device=dev, dtype=torch.float32)
    attach_visual_projection(model, adapter_name, encoder)
    data = _cfg(cfg, "data")
    first = (data[0] if data else None) if isinstance(data, (list, tuple)) else data
    data_dir = None
    if first:
        fp = Path(first).expanduser()
        data_dir = fp if fp.is_dir() else fp.parent
    kw: dict[str, Any] = dict(
        image_root=_cfg(cfg, "image_root"),
        data_dir=data_dir,
        cache_dir=_cfg(cfg, "feature_cache"),
        skip_invalid=bool(_cfg(cfg, "skip_invalid", False)),
        progress=bool(_cfg(cfg, "progress", False)),
    )
    records = compute_features(encoder, records, label="train", **kw)
    if val_records is not None:
        val_records = compute_features(encoder, val_records, label="val", **kw)
    if not any("image_features" in r for r in records):
        raise UserError(f"--image-encoder given but none of the {len(records)} training records has an 'image'")
    return records, val_records
