"""The frozen video side of multi-modal adapters: a clip in, global features out.

- `load_video`: a fixed number of frames sampled uniformly over a video (decoded with PyAV: MP4, WebM, AVI, ...),
  from a path, raw bytes or a data URL.
- `VideoEncoder`: each frame through the image encoder (`encoder.ImageEncoder`, the frozen CLIP tower), the
  frames' multi-scale features pooled over time: the mean, or mean and max side by side (`pool="mean+max"`,
  which keeps a short event that a mean would wash out). A video has its own projection in the adapter, not the
  image one: pooled features have other statistics than one image's.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from llama_adapter.errors import UserError, VideoError
from llama_adapter.multimodal.encoder import ImageEncoder
from llama_adapter.multimodal.media import read_media

POOLS = ("mean", "mean+max")
DEFAULT_FRAMES = 8


def frame_indices(n_frames: int, n: int) -> list[int]:
    """`n` frame numbers spread uniformly over `n_frames`: the middle frame of each of `n` equal segments
    (frames repeat when the video is shorter than `n` frames)."""
    if n_frames < 1 or n < 1:
        return []
    return [min(n_frames - 1, int((i + 0.5) * n_frames / n)) for i in range(n)]


def _decode(data: bytes, name: str, keep: set[int] | None) -> tuple[int, dict[int, Image.Image]]:
    """(number of frames, the frames numbered in `keep` as RGB images; all of them when `keep` is None)."""
    import av

    frames: dict[int, Image.Image] = {}
    count = 0
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise VideoError(f"{name}: no video stream")
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                if keep is None or count in keep:
                    frames[count] = frame.to_image().convert("RGB")
                count += 1
    except VideoError:
        raise
    except (av.FFmpegError, OSError, ValueError, IndexError) as e:
        raise VideoError(
            f"{name}: cannot decode video ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    if count == 0:
        raise VideoError(f"{name}: the video has no decodable frame")
    return count, frames


def _stream_header(data: bytes) -> tuple[int, int, int]:
    """(frame count, width, height) of a video's first video stream as its header gives them (0 where it does
    not say, all 0 where there is no video stream or the container cannot be read)."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                return 0, 0, 0
            stream = container.streams.video[0]
            return int(stream.frames or 0), int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
    except (av.FFmpegError, OSError, ValueError):
        return 0, 0, 0


def frame_count(data: bytes) -> int:
    """The frame count a video's header claims (0 when it does not say)."""
    return _stream_header(data)[0]


def frame_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a video's frames as its header gives them ((0, 0) when it does not say or cannot be
    read): what a server checks before it decodes a clip a client sent."""
    return _stream_header(data)[1:]


def load_video(src: str | os.PathLike[str] | bytes, n: int = DEFAULT_FRAMES) -> list[Image.Image]:
    """`n` RGB frames sampled uniformly (`frame_indices`) from a video file, raw bytes or a data URL.

    Decoding is one pass when the header gives the frame count, else two (count, then keep the chosen frames),
    so a long video is never held in memory whole.
    """
    try:
        import av  # noqa: F401
    except ImportError as e:
        raise UserError(f"video inputs need PyAV: pip install 'llama-adapter[media]' ({e})") from None
    if n < 1:
        raise UserError(f"frames per video must be >= 1, not {n}")
    data, name = read_media(src, VideoError, "video")
    claimed = frame_count(data)
    if claimed > 0:
        want = frame_indices(claimed, n)
        count, got = _decode(data, name, set(want))
        if count == claimed or all(i in got for i in want):
            return [got[i] for i in want]
    count, _ = _decode(data, name, set())  # the header was missing or wrong: count the frames, then pick
    want = frame_indices(count, n)
    _, got = _decode(data, name, set(want))
    return [got[i] for i in want]


class VideoEncoder:
    """Frames through a frozen `ImageEncoder`, pooled over time: float32 [B, feature_dim] on the CPU.

    feature_dim is the image encoder's (mean) or twice it (mean+max: the means of every scale, then the maxima).
    """

    modality = "video"

    def __init__(self, image: ImageEncoder, frames: int = DEFAULT_FRAMES, pool: str = "mean") -> None:
        if pool not in POOLS:
            raise UserError(f"video pooling {pool!r}: expected one of {', '.join(POOLS)}")
        if frames < 1:
            raise UserError(f"frames per video must be >= 1, not {frames}")
        self.image, self.frames, self.pool = image, frames, pool
        self.path = image.path
        reps = 2 if pool == "mean+max" else 1
        self.feature_dim = image.feature_dim * reps
        self.groups = list(image.groups) * reps

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        frames: int = DEFAULT_FRAMES,
        pool: str = "mean",
    ) -> VideoEncoder:
        return cls(ImageEncoder.load(path, device=device, dtype=dtype), frames=frames, pool=pool)

    def load_input(self, src: Any) -> list[Image.Image]:
        if isinstance(src, list):
            return src
        return load_video(src, self.frames)

    @torch.no_grad()
    def encode(self, videos: Sequence[list[Image.Image]], batch_size: int = 32) -> Tensor:
        if not videos:
            return torch.zeros(0, self.feature_dim)
        flat = [im for v in videos for im in v]
        feats = self.image.encode(flat, batch_size=batch_size)
        out = []
        at = 0
        for v in videos:
            f = feats[at : at + len(v)]
            at += len(v)
            pooled = [f.mean(0)] + ([f.max(0).values] if self.pool == "mean+max" else [])
            out.append(torch.cat(pooled))
        return torch.stack(out)

    def fingerprint(self) -> dict[str, Any]:
        """The image encoder's fingerprint plus the sampling and pooling (other frames, other features)."""
        return {"modality": "video", "frames": self.frames, "pool": self.pool, "image": self.image.fingerprint()}

    def fingerprint_key(self) -> str:
        return hashlib.sha256(json.dumps(self.fingerprint(), sort_keys=True).encode()).hexdigest()[:16]
