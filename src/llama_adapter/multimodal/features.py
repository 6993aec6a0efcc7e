"""Multi-modal LLaMA-Adapter (paper sec. 3.3): one image token added to every adapted layer's prompts.

- `ImageEncoder`: a frozen CLIP vision tower read from a local `transformers` checkpoint directory
  (`config.json` + weights, preprocessing from `preprocessor_config.json`, done here with PIL + numpy).
  Its features are multi-scale: the class-token states of 4 evenly spaced layers plus the final pooled,
  projected embedding, concatenated along channels ([B, 4 * hidden + projection_dim]).
- `VisualProjection`: the learnable network (per-scale LayerNorm, then a low-rank MLP) that maps those
  features to one token of the LLM's width. The model adds it to the K prompts of every adapted layer
  (`P_l + repeat(I_p)`); rows whose features are all zero get the plain prompts.
- `prepare_multimodal`: the fine-tuning hook. It attaches the projection to an adapter and computes (and
  caches on disk) the encoder features of every record that has an `"image"` field.
- `load_image`, `llava_to_alpaca`: input helpers for files, bytes, data URLs and LLaVA conversations.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn

from llama_adapter.errors import ImageError, UserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_TOKEN = "<image>"


# ---- images ---------------------------------------------------------------------------------------------
def load_image(src: str | os.PathLike[str] | bytes | Image.Image) -> Image.Image:
    """An RGB PIL image from a path, raw bytes, a `data:image/...;base64,` URL, or a PIL image."""
    if isinstance(src, Image.Image):
        return src.convert("RGB")
    name = "<bytes>"
    try:
        if isinstance(src, (bytes, bytearray)):
            data = bytes(src)
        elif isinstance(src, str) and src.startswith("data:"):
            name = src[:40] + ("..." if len(src) > 40 else "")
            header, sep, payload = src.partition(",")
            if not sep or ";base64" not in header:
                raise ImageError(f"{name}: only base64 data URLs are supported")
            data = base64.b64decode(payload, validate=False)
        else:
            path = Path(src).expanduser()
            name = str(path)
            if not path.is_file():
                raise ImageError(f"{path}: image file not found")
            data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.convert("RGB")
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError) as e:  # binascii.Error is a ValueError
        raise ImageError(f"{name}: cannot read image ({e})") from None


def _size_dict(v: Any, square: bool) -> dict[str, int]:
    if isinstance(v, int):
        return {"height": v, "width": v} if square else {"shortest_edge": v}
    return {k: int(x) for k, x in dict(v).items() if x is not None}


class ClipPreprocessor:
    """CLIP image preprocessing from a `preprocessor_config.json` dict, in PIL + numpy.

    Resize (shortest edge, or to height x width) with the configured resampling filter on the uint8 image,
    centre crop, rescale to [0, 1], normalise; the same steps and rounding as `transformers`'
    `CLIPImageProcessor`. Output: float32 [B, 3, H, W].
    """

    def __init__(self, cfg: dict[str, Any] | None = None, image_size: int = 224) -> None:
        cfg = dict(cfg or {})
        self.do_resize = bool(cfg.get("do_resize", True))
        self.size = _size_dict(cfg.get("size", image_size), square=False)
        self.do_center_crop = bool(cfg.get("do_center_crop", True))
        self.crop_size = _size_dict(cfg.get("crop_size", image_size), square=True)
        self.do_rescale = bool(cfg.get("do_rescale", True))
        self.rescale_factor = float(cfg.get("rescale_factor", 1 / 255))
        self.do_normalize = bool(cfg.get("do_normalize", True))
        self.mean = np.asarray(cfg.get("image_mean", CLIP_MEAN), dtype=np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(cfg.get("image_std", CLIP_STD), dtype=np.float32).reshape(-1, 1, 1)
        self.resample = int(cfg.get("resample", 3))  # 3 = bicubic

    def _resize(self, im: Image.Image) -> Image.Image:
        w, h = im.size
        if "shortest_edge" in self.size:
            s = self.size["shortest_edge"]
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(s * long / short)
            nw, nh = (s, new_long) if w <= h else (new_long, s)
        else:
            nh, nw = self.size["height"], self.size["width"]
        return im.resize((nw, nh), resample=self.resample)  # PIL filter id (3 = bicubic)

    def _crop(self, a: np.ndarray) -> np.ndarray:  # a: [C, H, W]
        ch, cw = self.crop_size["height"], self.crop_size["width"]
        _, h, w = a.shape
        if h < ch or w < cw:  # pad with zeros, centred, like transformers
            out = np.zeros((a.shape[0], max(h, ch), max(w, cw)), dtype=a.dtype)
            t, left = math.ceil((out.shape[1] - h) / 2), math.ceil((out.shape[2] - w) / 2)
            out[:, t:t + h, left:left + w] = a
            a, (_, h, w) = out, out.shape
        top, left = (h - ch) // 2, (w - cw) // 2
        return a[:, top:top + ch, left:left + cw]

    def __call__(self, images: Sequence[Image.Image]) -> Tensor:
        out = []
        for im in images:
            im = im.convert("RGB")
            if self.do_resize:
                im = self._resize(im)
            a = np.asarray(im).transpose(2, 0, 1)
            if self.do_center_crop:
                a = self._crop(a)
            a = a.astype(np.float32)
            if self.do_rescale:
                a = a * np.float32(self.rescale_factor)
            if self.do_normalize:
                a = (a - self.mean) / self.std
            out.append(np.ascontiguousarray(a, dtype=np.float32))
        return torch.from_numpy(np.stack(out))


# ---- the frozen encoder ------------------------------------------------------------------------------------
def default_layers(n_layers: int, n: int = 4) -> list[int]:
    """`n` evenly spaced encoder layers (1-based, the last one included): 24 layers -> [6, 12, 18, 24]."""
    return sorted({max(1, round((i + 1) * n_layers / n)) for i in range(n)})


class ImageEncoder:
    """Frozen CLIP vision tower with multi-scale global features.

    `encode(images)` -> float32 [B, feature_dim] on the CPU: for each layer in `layers` the class-token
    hidden state ([B, hidden]), then the final pooled embedding through the visual projection
    ([B, projection_dim]; the pooled, post-layernormed class token when the checkpoint has no projection).
    """

    def __init__(self, model: nn.Module, preprocess: ClipPreprocessor, path: Path, layers: list[int],
                 has_projection: bool, device: torch.device, dtype: torch.dtype) -> None:
        self.model, self.preprocess, self.path = model, preprocess, path
        self.layers, self.has_projection = layers, has_projection
        self.device, self.dtype = device, dtype
        c = self.vision_config
        self.hidden_size = int(c.hidden_size)
        self.final_dim = int(c.projection_dim) if has_projection else self.hidden_size
        self.feature_dim = len(layers) * self.hidden_size + self.final_dim
        self.groups = [self.hidden_size] * len(layers) + [self.final_dim]
        self._fp: dict[str, Any] | None = None

    @property
    def vision_config(self) -> Any:
        return self.model.config

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, layers: Sequence[int] | None = None) -> ImageEncoder:
        try:
            from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection
            from transformers.utils import logging as hf_logging
        except ImportError as e:
            raise UserError(f"image encoders need transformers: pip install 'llama-adapter[vision]' ({e})") from None

        p = Path(path).expanduser()
        if not (p / "config.json").is_file():
            raise UserError(f"{p}: not a CLIP vision checkpoint directory (config.json not found)")
        try:
            vcfg = CLIPVisionConfig.from_pretrained(p)
            raw = json.loads((p / "config.json").read_text())
            if "vision_config" in raw and "projection_dim" in raw:  # a full CLIPModel: its projection size
                vcfg.projection_dim = int(raw["projection_dim"])
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"{p}: cannot read the CLIP vision config ({e})") from None
        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            model, info = CLIPVisionModelWithProjection.from_pretrained(p, config=vcfg, output_loading_info=True)
            missing = set(info.get("missing_keys", []))
            has_projection = not any("visual_projection" in k for k in missing)
            if not has_projection:  # a CLIPVisionModel checkpoint: use its pooled output instead
                model = CLIPVisionModel.from_pretrained(p, config=vcfg)
            elif missing:
                raise UserError(f"{p}: checkpoint lacks weights: {', '.join(sorted(missing)[:5])}")
        except (OSError, RuntimeError, ValueError) as e:
            raise UserError(f"{p}: cannot load CLIP vision weights ({str(e).splitlines()[0]})") from None
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        pre_file = p / "preprocessor_config.json"
        pre = json.loads(pre_file.read_text()) if pre_file.is_file() else {}
        pre_cfg = ClipPreprocessor(pre, image_size=int(vcfg.image_size))
        n = int(vcfg.num_hidden_layers)
        chosen = list(layers) if layers else default_layers(n)
        if any(not 1 <= i <= n for i in chosen):
            raise UserError(f"{p}: layers {chosen} out of range 1..{n}")
        return cls(model, pre_cfg, p, chosen, has_projection, torch.device(device), dtype)

    @torch.no_grad()
    def encode(self, images: Sequence[Image.Image], batch_size: int = 32) -> Tensor:
        outs = []
        for i in range(0, len(images), batch_size):
            px = self.preprocess(images[i:i + batch_size]).to(self.device, self.dtype)
            o = self.model(pixel_values=px, output_hidden_states=True)
            feats = [o.hidden_states[li][:, 0] for li in self.layers]
            feats.append(o.image_embeds if self.has_projection else o.pooler_output)
            outs.append(torch.cat(feats, dim=-1).float().cpu())
        if not outs:
            return torch.zeros(0, self.feature_dim)
        return torch.cat(outs)

    def fingerprint(self) -> dict[str, Any]:
        """What identifies these features: architecture, chosen layers, preprocessing and a weights digest."""
        if self._fp is None:
            c = self.vision_config
            h = hashlib.sha256()
            for f in sorted(self.path.glob("*")):
                if f.suffix in (".safetensors", ".bin", ".json") and f.is_file():
                    st = f.stat()
                    h.update(f"{f.name}:{st.st_size}".encode())
                    with f.open("rb") as fh:  # head and tail: cheap, and changes when weights change
                        h.update(fh.read(1 << 20))
                        if st.st_size > 2 << 20:
                            fh.seek(-(1 << 20), os.SEEK_END)
                            h.update(fh.read())
            self._fp = {
                "name": self.path.name, "hidden_size": int(c.hidden_size),
                "num_hidden_layers": int(c.num_hidden_layers), "image_size": int(c.image_size),
                "patch_size": int(c.patch_size), "projection_dim": self.final_dim if self.has_projection else 0,
                "layers": list(self.layers), "feature_dim": self.feature_dim,
                "digest": h.hexdigest()[:16],
            }
        return dict(self._fp)

    def fingerprint_key(self) -> str:
        return hashlib.sha256(json.dumps(self.fingerprint(), sort_keys=True).encode()).hexdigest()[:16]


# ---- the learnable projection --------------------------------------------------------------------------------
class VisualProjection(nn.Module):
    """Image features [B, F] -> one image token [B, dim].

    Each scale (group of channels) is layer-normalised on its own, since intermediate class-token states and
    the final embedding differ in scale; then Linear(F, hidden) -> GELU -> Linear(hidden, dim). With the
    default hidden=64 at LLaMA-7B / ViT-L/14 shapes (F = 4 x 1024 + 768, dim 4096) this is ~0.59M parameters,
    the paper's ~0.6M.
    """

    def __init__(self, in_features: int, dim: int, hidden: int = 64, groups: Sequence[int] | None = None) -> None:
        super().__init__()
        groups = list(groups) if groups else [in_features]
        if sum(groups) != in_features:
            raise ValueError(f"groups {groups} do not sum to in_features={in_features}")
        self.in_features, self.dim, self.hidden, self.groups = in_features, dim, hidden, groups
        self.norm_weight = nn.Parameter(torch.ones(in_features))
        self.norm_bias = nn.Parameter(torch.zeros(in_features))
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        parts = [nn.functional.layer_norm(p, (p.shape[-1],)) for p in x.split(self.groups, dim=-1)]
        x = torch.cat(parts, dim=-1) * self.norm_weight + self.norm_bias
        return self.fc2(nn.functional.gelu(self.fc1(x)))

    def config_dict(self) -> dict[str, Any]:
        return {"type": "mlp", "in_features": self.in_features, "dim": self.dim, "hidden": self.hidden,
                "groups": list(self.groups)}


def build_visual_projection(config: dict[str, Any], dim: int) -> VisualProjection:
    """The projection described by an adapter file's `visual` metadata (`VisualProjection.config_dict()`)."""
    kind = config.get("type", "mlp")
    if kind != "mlp" or "in_features" not in config:
        from llama_adapter.errors import AdapterError

        raise AdapterError(f"unsupported or missing visual projection config {config!r}")
    if int(config.get("dim", dim)) != dim:
        from llama_adapter.errors import AdapterError

        raise AdapterError(f"visual projection outputs {config['dim']} channels, the base has dim {dim}")
    return VisualProjection(int(config["in_features"]), dim, hidden=int(config.get("hidden", 64)),
                            groups=config.get("groups"))


def projection_parameter_count(in_features: int = 4 * 1024 + 768, dim: int = 4096, hidden: int = 64) -> int:
    """Parameters of the default projection (defaults: LLaMA-7B width, ViT-L/14 multi-scale features)."""
    return 2 * in_features + (in_features + 1) * hidden + (hidden + 1) * dim


def attach_visual_projection(model: Any, adapter_name: str, encoder: ImageEncoder, hidden: int = 64) -> nn.Module:
    """Give adapter `adapter_name` a projection for `encoder`'s features (fp32, on the model's device)."""
    adapter = model.adapters[adapter_name]
    dim = int(model.config.dim)
    proj = adapter.visual_proj
    if proj is not None:
        if getattr(proj, "in_features", encoder.feature_dim) != encoder.feature_dim:
            raise UserError(f"adapter {adapter_name!r} projects {proj.in_features} image features, the encoder "
                            f"{encoder.path} gives {encoder.feature_dim}")
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


def resolve_image(rec: dict[str, Any], image_root: str | os.PathLike[str] | None,
                  data_dir: str | os.PathLike[str] | None = None) -> str | Path:
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


def compute_features(encoder: ImageEncoder, records: list[dict[str, Any]], *, image_root: Any = None,
                     data_dir: Any = None, cache_dir: Any = None, skip_invalid: bool = False,
                     progress: bool = False, batch_size: int = 32, label: str = "train") -> list[dict[str, Any]]:
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


def prepare_multimodal(model: Any, adapter_name: str, records: list[dict[str, Any]],
                       val_records: list[dict[str, Any]] | None, cfg: Any
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
    attach_visual_projection(model, adapter_name, encoder, hidden=int(_cfg(cfg, "visual_hidden", 64) or 64))
    data = _cfg(cfg, "data")
    first = (data[0] if data else None) if isinstance(data, (list, tuple)) else data
    data_dir = None
    if first:
        fp = Path(first).expanduser()
        data_dir = fp if fp.is_dir() else fp.parent
    kw = dict(image_root=_cfg(cfg, "image_root"), data_dir=data_dir, cache_dir=_cfg(cfg, "feature_cache"),
              skip_invalid=bool(_cfg(cfg, "skip_invalid", False)), progress=bool(_cfg(cfg, "progress", False)))
    records = compute_features(encoder, records, label="train", **kw)  # type: ignore[arg-type]
    if val_records is not None:
        val_records = compute_features(encoder, val_records, label="val", **kw)  # type: ignore[arg-type]
    if not any("image_features" in r for r in records):
        raise UserError(f"--image-encoder given but none of the {len(records)} training records has an 'image'")
    return records, val_records


def stack_features(records: Iterable[dict[str, Any]], feature_dim: int) -> Tensor:
    """[B, F] for a batch of records: their `image_features`, zeros for rows without an image."""
    rows = [r.get("image_features") for r in records]
    out = torch.zeros(len(rows), feature_dim)
    for i, f in enumerate(rows):
        if f is not None:
            out[i] = f
    return out


def feature_dim_of(model: Any, adapter_name: str) -> int | None:
    proj = model.adapters[adapter_name].visual_proj
    return None if proj is None else int(proj.in_features)
