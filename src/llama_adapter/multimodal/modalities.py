"""One encoder interface for every modality, and the condition vector an adapter's projection takes.

Every modality works the same way (paper eq. 10, widened): a frozen encoder turns one input into global
features [F]; the adapter's projection for that modality (per-scale LayerNorm + MLP, `VisualProjection`) maps them
to one token added to every adapted layer's prompts. The encoders:
- image: `encoder.ImageEncoder` (CLIP vision tower), inputs are images;
- audio: `audio.AudioEncoder` (Whisper encoder or CLAP audio tower), inputs are clips;
- video: `video.VideoEncoder` (frames through the image encoder, pooled over time), inputs are videos.
An adapter records, per modality, its encoder's directory (`<modality>_encoder`) and fingerprint
(`<modality>_encoder_fingerprint`), so generation, evaluation and the server find the same encoder again and
refuse one whose features differ. The model's plumbing carries one tensor per row (`image_features` in its
API, for history): the modalities' features side by side in the projection's order, zeros for a missing one.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from llama_adapter.errors import UserError
from llama_adapter.zero_init_attention import Adapter, projection_modalities

MODALITY_NOUNS = {"image": "images", "audio": "audio clips", "video": "videos"}
ENCODER_FLAGS = {"image": "--image-encoder", "audio": "--audio-encoder", "video": "--image-encoder"}


class Encoder(Protocol):
    """What every modality's frozen encoder offers (`ImageEncoder`, `AudioEncoder`, `VideoEncoder`)."""

    modality: str
    path: Path
    feature_dim: int
    groups: list[int]

    def load_input(self, src: Any) -> Any:
        """The decoded input (image, clip, frames) of a path, raw bytes or data URL; a `MediaError` if unreadable."""
        ...

    def encode(self, inputs: Sequence[Any], batch_size: int = ...) -> Tensor:
        """Global features [B, feature_dim] (float32, CPU) of decoded inputs."""
        ...

    def fingerprint(self) -> dict[str, Any]: ...

    def fingerprint_key(self) -> str: ...


def load_encoder(
    modality: str,
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    frames: int | None = None,
    pool: str | None = None,
) -> Encoder:
    """The frozen encoder of `modality` from a local checkpoint directory (video: the image encoder's)."""
    if modality == "image":
        from llama_adapter.multimodal.encoder import ImageEncoder

        return ImageEncoder.load(path, device=device)
    if modality == "audio":
        from llama_adapter.multimodal.audio import AudioEncoder

        return AudioEncoder.load(path, device=device)
    if modality == "video":
        from llama_adapter.multimodal.video import DEFAULT_FRAMES, VideoEncoder

        return VideoEncoder.load(path, device=device, frames=frames or DEFAULT_FRAMES, pool=pool or "mean")
    raise UserError(f"unknown modality {modality!r} (expected image, audio or video)")


def block_widths(adapter: Adapter) -> dict[str, int]:
    """Each modality's feature width in the adapter's projection, in the projection's order."""
    proj = adapter.visual_proj
    if proj is None:
        return {}
    mods = projection_modalities(proj)
    widths = getattr(proj, "widths", [proj.in_features])
    return dict(zip(mods, (int(w) for w in widths), strict=True))


def condition_vector(adapter: Adapter, features: Mapping[str, Tensor]) -> Tensor:
    """The projection's input [B, F] from per-modality features ({modality: [B, F_m]}): blocks side by side in
    the projection's order, zeros for modalities not given. UserError for a modality the adapter does not take."""
    widths = block_widths(adapter)
    extra = [m for m in features if m not in widths]
    if extra:
        takes = ", ".join(widths) or "nothing"
        raise UserError(f"this adapter does not take {', '.join(MODALITY_NOUNS[m] for m in extra)} (it takes {takes})")
    B = next(iter(features.values())).shape[0] if features else 1
    blocks = []
    for m, w in widths.items():
        f = features.get(m)
        if f is not None and f.shape[-1] != w:
            raise UserError(f"{m} features have {f.shape[-1]} channels, the adapter's projection takes {w}")
        blocks.append(f.float().cpu() if f is not None else torch.zeros(B, w))
    return torch.cat(blocks, dim=-1) if blocks else torch.zeros(B, 0)


def recorded_video_options(adapter: Adapter) -> tuple[int | None, str | None]:
    """(frames, pooling) the adapter's video features were made with (from its recorded fingerprint)."""
    raw = adapter.meta.get("video_encoder_fingerprint")
    if not raw:
        return None, None
    try:
        fp = json.loads(raw)
        return int(fp["frames"]), str(fp["pool"])
    except (ValueError, KeyError, TypeError):
        return None, None


class AdapterEncoders:
    """The encoders an adapter needs, loaded once per (modality, directory) and reused (generation, the server,
    evaluation). A directory in `dirs` (`generate --image-encoder`, `--audio-encoder`) wins over the adapter's
    record; one in `defaults` (`serve --image-encoder`, `--audio-encoder`) is used where the adapter records none.
    Keys: "image" (also for video frames) and "audio"."""

    def __init__(
        self,
        device: str | torch.device = "cpu",
        dirs: Mapping[str, str | None] | None = None,
        defaults: Mapping[str, str | None] | None = None,
    ) -> None:
        self.device = device
        self.dirs = {k: v for k, v in (dirs or {}).items() if v}
        self.defaults = {k: v for k, v in (defaults or {}).items() if v}
        self._loaded: dict[tuple[str, str, int | None, str | None], Encoder] = {}
        self._noted: set[tuple[int, str, str]] = set()

    def encoder(self, adapter: Adapter, modality: str, adapter_label: str = "the adapter") -> Encoder:
        widths = block_widths(adapter)
        if modality not in widths:
            takes = ", ".join(MODALITY_NOUNS[m] for m in widths) or "no images, audio or video"
            raise UserError(f"{adapter_label} does not take {MODALITY_NOUNS[modality]} (it takes {takes})")
        dir_key = "image" if modality == "video" else modality
        enc_dir = self.dirs.get(dir_key) or adapter.meta.get(f"{modality}_encoder") or self.defaults.get(dir_key)
        if not enc_dir:
            raise UserError(f"{adapter_label} does not name its {modality} encoder; pass {ENCODER_FLAGS[modality]} DIR")
        frames, pool = recorded_video_options(adapter) if modality == "video" else (None, None)
        key = (modality, str(enc_dir), frames, pool)
        if key not in self._loaded:
            self._loaded[key] = load_encoder(modality, enc_dir, device=self.device, frames=frames, pool=pool)
        enc = self._loaded[key]
        if enc.feature_dim != widths[modality]:
            raise UserError(
                f"{enc_dir}: gives {enc.feature_dim} {modality} features, {adapter_label} was trained on "
                f"{widths[modality]}"
            )
        self._check_fingerprint(adapter, modality, enc, adapter_label)
        return enc

    def _check_fingerprint(self, adapter: Adapter, modality: str, enc: Encoder, adapter_label: str) -> None:
        """A note (stderr, once per encoder) when the encoder is not the one the adapter recorded: same widths,
        other weights or settings, so the answers are those of features the adapter never saw."""
        raw = adapter.meta.get(f"{modality}_encoder_fingerprint")
        if not raw or (id(adapter), modality, str(enc.path)) in self._noted:
            return
        try:
            recorded = json.loads(raw)
        except ValueError:
            return
        if recorded != enc.fingerprint():
            self._noted.add((id(adapter), modality, str(enc.path)))
            print(
                f"note: {enc.path} is not the {modality} encoder {adapter_label} was trained with (its fingerprint "
                "differs: other weights or settings)",
                file=sys.stderr,
                flush=True,
            )

    def features(self, adapter: Adapter, inputs: Mapping[str, Any], adapter_label: str = "the adapter") -> Tensor:
        """The condition vector [1, F] of one request's inputs ({modality: path, bytes, data URL or decoded})."""
        feats = {}
        for m, src in inputs.items():
            enc = self.encoder(adapter, m, adapter_label)
            feats[m] = enc.encode([enc.load_input(src)])
        return condition_vector(adapter, feats)
