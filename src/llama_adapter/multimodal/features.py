"""Multi-modal fine-tuning data: encoder features for every record, computed once and cached on disk.

Every modality the same way (`modalities`): a record's `"image"`, `"audio"` or `"video"` (a path relative to a
root, or a data URL) goes through its modality's frozen encoder; the features are cached per encoder fingerprint;
an unreadable input is a one-line `MediaError` naming the record, or drops the record with `skip_invalid`.
- `attach_projection`: give an adapter the projection(s) (eq. 10) for its encoders' features.
- `prepare_multimodal`: the fine-tuning hook: attach the projection and compute every record's condition vector
  (`rec["image_features"]`, the modalities' features side by side as the projection takes them).
- `llava_to_alpaca`, `resolve_media` / `resolve_image`: LLaVA conversations and input paths.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from llama_adapter.errors import ImageError, MediaError, UserError
from llama_adapter.multimodal.encoder import ImageEncoder
from llama_adapter.multimodal.media import source_key
from llama_adapter.multimodal.modalities import MODALITY_NOUNS, Encoder, load_encoder
from llama_adapter.zero_init_attention import MODALITIES, ConditionProjection, VisualProjection, projection_modalities

IMAGE_TOKEN = "<image>"


def attach_projection(model: Any, adapter_name: str, encoders: Mapping[str, Encoder], hidden: int = 64) -> nn.Module:
    """Give adapter `adapter_name` a projection for its encoders' features (fp32, on the model's device): a plain
    `VisualProjection` for images alone (image adapter files stay as they were), else a `ConditionProjection` with
    one per modality. An adapter that already has one (a resumed run) must take the same modalities and widths.
    Records each encoder's directory and fingerprint in the adapter's metadata."""
    adapter = model.adapters[adapter_name]
    dim = int(model.config.dim)
    mods = [m for m in MODALITIES if m in encoders]
    if not mods:
        raise UserError("no encoder to attach a projection for")
    proj = adapter.visual_proj
    if proj is not None:
        have = projection_modalities(proj)
        widths = dict(zip(have, getattr(proj, "widths", [proj.in_features]), strict=True))
        want = {m: encoders[m].feature_dim for m in mods}
        if widths != want:
            raise UserError(f"adapter {adapter_name!r} projects {widths} features, the encoders give {want}")
    else:
        dev = adapter.prompts.device
        parts = {
            m: VisualProjection(encoders[m].feature_dim, dim, hidden=hidden, groups=encoders[m].groups) for m in mods
        }
        proj = parts["image"] if mods == ["image"] else ConditionProjection(parts)
        adapter.visual_proj = proj.to(dev)
    for m in mods:
        enc = encoders[m]
        adapter.meta[f"{m}_encoder"] = os.path.abspath(enc.path)  # usable from any working directory
        adapter.meta[f"{m}_encoder_fingerprint"] = json.dumps(enc.fingerprint(), sort_keys=True)
    return proj


def attach_visual_projection(model: Any, adapter_name: str, encoder: ImageEncoder, hidden: int = 64) -> nn.Module:
    """`attach_projection` for an image encoder alone (eq. 10 as in the paper)."""
    return attach_projection(model, adapter_name, {"image": encoder}, hidden=hidden)


# ---- data ----------------------------------------------------------------------------------------------------
def llava_to_alpaca(record: dict[str, Any]) -> dict[str, Any]:
    """A LLaVA conversation record -> an Alpaca record (first human turn -> instruction, first gpt -> output).

    `{"image": "x.png", "conversations": [{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt",
    "value": "A"}]}` -> `{"instruction": "Q", "input": "", "output": "A", "image": "x.png"}`. Later turns are
    dropped (the paper's setting is single-turn). An "audio" or "video" field is kept as it is.
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
    for m in MODALITIES:
        if record.get(m):
            out[m] = record[m]
    if "id" in record:
        out["id"] = record["id"]
    return out


def _cfg(cfg: Any, name: str, default: Any = None) -> Any:
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def resolve_media(
    rec: dict[str, Any],
    modality: str,
    root: str | os.PathLike[str] | None,
    data_dir: str | os.PathLike[str] | None = None,
) -> str | Path:
    """The input of a record's `modality` field: data URLs pass through; relative paths are taken from `root`,
    else the record's `_dir` (its data file's folder, set by the data loader), else `data_dir`, else the cwd."""
    src = rec[modality]
    if not isinstance(src, str) or src.startswith("data:"):
        return src
    p = Path(src).expanduser()
    if p.is_absolute():
        return p
    for base in (root, rec.get("_dir"), data_dir):
        if base:
            return Path(base).expanduser() / p
    return p


def resolve_image(
    rec: dict[str, Any], image_root: str | os.PathLike[str] | None, data_dir: str | os.PathLike[str] | None = None
) -> str | Path:
    """`resolve_media` of the record's image."""
    return resolve_media(rec, "image", image_root, data_dir)


def _record_name(rec: dict[str, Any], i: int) -> str:
    rid = rec.get("id", rec.get("pid"))
    return f"record {i}" + (f" (id {rid})" if rid is not None else "")


class FeatureCache:
    """Encoder features on disk: `<dir>/<encoder key>/<item key>.npy`, written atomically.

    Item key: sha256 of the resolved path + size + mtime (files), or of the data URL (`media.source_key`).
    One directory per encoder fingerprint, so features of every modality and encoder can share a root.
    """

    def __init__(self, root: str | os.PathLike[str] | None, encoder: Encoder) -> None:
        self.dir = Path(root).expanduser() / encoder.fingerprint_key() if root else None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            meta = self.dir / "encoder.json"
            if not meta.is_file():
                meta.write_text(json.dumps(encoder.fingerprint(), indent=1))

    @staticmethod
    def key(src: str | Path) -> str:
        return source_key(src)

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


def _as_encoders(encoders: Encoder | Mapping[str, Encoder]) -> dict[str, Encoder]:
    if isinstance(encoders, Mapping):
        return dict(encoders)
    return {encoders.modality: encoders}


def compute_features(
    encoders: Encoder | Mapping[str, Encoder],
    records: list[dict[str, Any]],
    *,
    image_root: Any = None,
    data_dir: Any = None,
    cache_dir: Any = None,
    skip_invalid: bool = False,
    progress: bool = False,
    batch_size: int = 32,
    label: str = "train",
    modalities: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Set `rec["image_features"]` (the condition vector, float32 [F]) on every record with an input of one of
    the encoders' modalities (`{modality: encoder}`, or one encoder); returns the records kept.

    The vector has one block per modality in `modalities` (default: the encoders', in the canonical order image,
    audio, video), zeros for a modality the record lacks; with images alone it is the image features. Relative
    paths resolve against `image_root` (every modality's root), the record's folder, then `data_dir`. Unreadable
    inputs raise the modality's `MediaError` naming the record, or drop the record when `skip_invalid`. A
    record with an input for which no encoder is given is a `UserError` (it would silently train without it).
    """
    encs = _as_encoders(encoders)
    mods = modalities or [m for m in MODALITIES if m in encs]
    caches = {m: FeatureCache(cache_dir, encs[m]) for m in mods}
    keep: list[dict[str, Any]] = []
    got: dict[int, dict[str, Tensor]] = {}  # id(record) -> {modality: features}
    todo: dict[str, list[tuple[dict[str, Any], str, Any]]] = {m: [] for m in mods}
    hits = skipped = 0
    counts = dict.fromkeys(mods, 0)

    def flush(m: str) -> None:
        if not todo[m]:
            return
        feats = encs[m].encode([x for _, _, x in todo[m]], batch_size=batch_size)
        for (rec, key, _), f in zip(todo[m], feats, strict=True):
            got.setdefault(id(rec), {})[m] = f.clone()
            caches[m].put(key, f)
        todo[m].clear()

    for i, rec in enumerate(records):
        present = [m for m in MODALITIES if rec.get(m)]
        missing = [m for m in present if m not in mods]
        if missing:
            raise UserError(
                f"{label} {_record_name(rec, i)} has {', '.join(repr(m) for m in missing)} but no encoder for "
                f"{' and '.join(MODALITY_NOUNS[m] for m in missing)} was given"
                + (" (--audio-encoder DIR)" if "audio" in missing else " (--image-encoder DIR)")
            )
        if not present:
            keep.append(rec)
            continue
        pending: list[tuple[str, str, Any]] = []
        try:
            for m in present:
                src = resolve_media(rec, m, image_root, data_dir)
                try:
                    key = FeatureCache.key(src)
                except OSError:
                    raise type_error(m)(f"{src}: {m} file not found") from None
                feat = caches[m].get(key)
                if feat is not None and feat.numel() == encs[m].feature_dim:
                    got.setdefault(id(rec), {})[m] = feat
                    hits += 1
                else:
                    pending.append((m, key, encs[m].load_input(src)))
        except MediaError as e:
            got.pop(id(rec), None)
            if skip_invalid:
                skipped += 1
                continue
            raise type(e)(f"{label} {_record_name(rec, i)}: {e}") from None
        for m, key, x in pending:
            todo[m].append((rec, key, x))
            if len(todo[m]) >= batch_size:
                flush(m)
        for m in present:
            counts[m] += 1
        keep.append(rec)
    for m in mods:
        flush(m)
    for rec in keep:
        feats = got.pop(id(rec), None)
        if feats:
            rec["image_features"] = _vector(feats, mods, encs)
    if progress:
        what = ", ".join(f"{counts[m]} {MODALITY_NOUNS[m]}" for m in mods)
        print(f"features ({label}): {what}, {hits} from cache, {skipped} records skipped", flush=True)
    return keep


def type_error(modality: str) -> type[MediaError]:
    """The `MediaError` kind of a modality (ImageError, AudioError, VideoError)."""
    from llama_adapter.errors import AudioError, VideoError

    return {"image": ImageError, "audio": AudioError, "video": VideoError}[modality]


def _vector(feats: dict[str, Tensor], mods: list[str], encs: dict[str, Encoder]) -> Tensor:
    """Blocks side by side in `mods` order, zeros for absent ones (what `condition_vector` builds for a model)."""
    return torch.cat([feats[m] if m in feats else torch.zeros(encs[m].feature_dim) for m in mods])


def load_encoders(cfg: Any, device: Any, records: list[dict[str, Any]]) -> dict[str, Encoder]:
    """The encoders a run needs: image (`image_encoder`) for records with images, video (frames through the same
    image encoder, `video_frames`, `video_pool`) for records with videos, audio (`audio_encoder`) for clips.
    A modality no record has gets no encoder (and no projection)."""
    has = {m: any(r.get(m) for r in records) for m in MODALITIES}
    image_dir, audio_dir = _cfg(cfg, "image_encoder"), _cfg(cfg, "audio_encoder")
    encs: dict[str, Encoder] = {}
    if image_dir and (has["image"] or not (has["video"] or has["audio"])):
        encs["image"] = load_encoder("image", image_dir, device=device)
    if image_dir and has["video"]:
        from llama_adapter.multimodal.video import VideoEncoder

        img = encs.get("image")
        frames, pool = int(_cfg(cfg, "video_frames", 8) or 8), str(_cfg(cfg, "video_pool", "mean") or "mean")
        if isinstance(img, ImageEncoder):
            encs["video"] = VideoEncoder(img, frames=frames, pool=pool)
        else:
            encs["video"] = load_encoder("video", image_dir, device=device, frames=frames, pool=pool)
    if audio_dir:
        encs["audio"] = load_encoder("audio", audio_dir, device=device)
    return encs


def prepare_multimodal(
    model: Any, adapter_name: str, records: list[dict[str, Any]], val_records: list[dict[str, Any]] | None, cfg: Any
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Fine-tuning hook: attach the projection to the adapter and compute every record's condition vector.

    Reads from `cfg` (a TrainConfig or dict): image_encoder (CLIP dir, for images and video frames),
    audio_encoder (Whisper/CLAP dir), video_frames, video_pool (nothing happens when no encoder is set),
    image_root (the root of every relative input path), feature_cache, skip_invalid, progress, and data (the data
    file, or the first of a list, whose folder resolves relative paths when neither image_root nor a record's
    `_dir` is given). The encoders run on the model's device in fp32 and are dropped afterwards; features live on
    the CPU.
    """
    if not (_cfg(cfg, "image_encoder") or _cfg(cfg, "audio_encoder")):
        return records, val_records
    dev = model.tok_embeddings.weight.device
    encoders = load_encoders(cfg, dev, records)
    if not encoders:
        raise UserError(
            f"an encoder was given but none of the {len(records)} training records has an input for it "
            "('image' or 'video' for --image-encoder, 'audio' for --audio-encoder)"
        )
    attach_projection(model, adapter_name, encoders)
    mods = projection_modalities(model.adapters[adapter_name].visual_proj)
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
        modalities=mods,
    )
    records = compute_features(encoders, records, label="train", **kw)
    if val_records is not None:
        val_records = compute_features(encoders, val_records, label="val", **kw)
    if not any("image_features" in r for r in records):
        flags = " / ".join(sorted({"--image-encoder" if m != "audio" else "--audio-encoder" for m in mods}))
        raise UserError(f"{flags} given but none of the {len(records)} training records has an input for it")
    return records, val_records
