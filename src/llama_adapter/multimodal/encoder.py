"""The frozen image side of multi-modal adapters (paper sec. 3.3): images in, global features out.

- `load_image`: an RGB image from a path, raw bytes, a data URL or a PIL image.
- `ClipPreprocessor`: CLIP's resize / crop / normalise, done with PIL + numpy (no torchvision needed).
- `ImageEncoder`: a frozen CLIP vision tower read from a local `transformers` checkpoint directory
  (`config.json` + weights, preprocessing from `preprocessor_config.json`). Its features are multi-scale: the
  class-token states of 4 evenly spaced layers plus the final pooled, projected embedding, concatenated along
  channels ([B, 4 * hidden + projection_dim]).
The learnable part, `VisualProjection` (eq. 10), is part of the method: `llama_adapter.zero_init_attention`.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn

from llama_adapter.errors import ImageError, UserError
from llama_adapter.progress import quiet_transformers

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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
            out[:, t : t + h, left : left + w] = a
            a, (_, h, w) = out, out.shape
        top, left = (h - ch) // 2, (w - cw) // 2
        return a[:, top : top + ch, left : left + cw]

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

    modality = "image"

    def __init__(
        self,
        model: nn.Module,
        preprocess: ClipPreprocessor,
        path: Path,
        layers: list[int],
        has_projection: bool,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.model, self.preprocess, self.path = model, preprocess, path
        self.layers, self.has_projection = layers, has_projection
        self.device, self.dtype = device, dtype
        c = self.vision_config
        self.hidden_size = int(c.hidden_size)
        self.final_dim = int(c.projection_dim) if has_projection else self.hidden_size
        self.feature_dim = len(layers) * self.hidden_size + self.final_dim
        self.groups = [self.hidden_size] * len(layers) + [self.final_dim]
        self._fp: dict[str, Any] | None = None

    @staticmethod
    def load_input(src: Any) -> Image.Image:
        return load_image(src)

    @property
    def vision_config(self) -> Any:
        return self.model.config

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        layers: Sequence[int] | None = None,
    ) -> ImageEncoder:
        try:
            from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection
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
        try:
            with quiet_transformers():
                model: nn.Module
                info: dict[str, Any]
                # with output_loading_info=True, from_pretrained returns (model, loading info), not the model alone
                model, info = cast(
                    tuple[nn.Module, dict[str, Any]],
                    CLIPVisionModelWithProjection.from_pretrained(p, config=vcfg, output_loading_info=True),
                )
                missing = set(info.get("missing_keys", []))
                has_projection = not any("visual_projection" in k for k in missing)
                if not has_projection:  # a CLIPVisionModel checkpoint: use its pooled output instead
                    model = CLIPVisionModel.from_pretrained(p, config=vcfg)
                elif missing:
                    raise UserError(f"{p}: checkpoint lacks weights: {', '.join(sorted(missing)[:5])}")
        except (OSError, RuntimeError, ValueError) as e:
            raise UserError(f"{p}: cannot load CLIP vision weights ({str(e).splitlines()[0]})") from None
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        pre_file = p / "preprocessor_config.json"
        pre = json.loads(pre_file.read_text()) if pre_file.is_file() else {}
        image_size = vcfg.image_size
        if image_size is None or isinstance(image_size, (list, tuple)):
            raise UserError(f"{p}: CLIP vision config image_size must be a single number, got {image_size!r}")
        pre_cfg = ClipPreprocessor(pre, image_size=int(image_size))
        n = int(vcfg.num_hidden_layers)
        chosen = list(layers) if layers else default_layers(n)
        if any(not 1 <= i <= n for i in chosen):
            raise UserError(f"{p}: layers {chosen} out of range 1..{n}")
        return cls(model, pre_cfg, p, chosen, has_projection, torch.device(device), dtype)

    @torch.no_grad()
    def encode(self, images: Sequence[Image.Image], batch_size: int = 32) -> Tensor:
        outs = []
        for i in range(0, len(images), batch_size):
            px = self.preprocess(images[i : i + batch_size]).to(self.device, self.dtype)
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
                "name": self.path.name,
                "hidden_size": int(c.hidden_size),
                "num_hidden_layers": int(c.num_hidden_layers),
                "image_size": int(c.image_size),
                "patch_size": int(c.patch_size),
                "projection_dim": self.final_dim if self.has_projection else 0,
                "layers": list(self.layers),
                "feature_dim": self.feature_dim,
                "digest": h.hexdigest()[:16],
            }
        return dict(self._fp)

    def fingerprint_key(self) -> str:
        return hashlib.sha256(json.dumps(self.fingerprint(), sort_keys=True).encode()).hexdigest()[:16]
