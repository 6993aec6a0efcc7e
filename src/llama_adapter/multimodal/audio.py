"""The frozen audio side of multi-modal adapters: a clip in, global features out (like `encoder` for images).

- `load_audio`: mono float32 samples and their rate from a path, raw bytes or a data URL (`soundfile`: WAV,
  FLAC, OGG, ...).
- `resample`: to the encoder's rate with `soxr` (its high-quality default).
- `AudioEncoder`: a frozen `transformers` audio encoder read from a local checkpoint directory (`config.json`,
  weights, `preprocessor_config.json`): the Whisper encoder or CLAP's audio tower. The log-mel features come from
  the checkpoint's own feature extractor, so they are exactly what the model was trained on. Features are
  multi-scale, as for images: the time-averaged states of evenly spaced layers plus a final embedding.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from llama_adapter.errors import AudioError, UserError
from llama_adapter.multimodal.encoder import default_layers
from llama_adapter.multimodal.media import digest_dir, read_media
from llama_adapter.progress import quiet_transformers

AUDIO_KINDS = ("whisper", "clap")


@dataclass
class Audio:
    """A decoded clip: mono float32 samples in [-1, 1] and their sampling rate."""

    samples: np.ndarray
    rate: int

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.rate


def load_audio(src: str | os.PathLike[str] | bytes | Audio) -> Audio:
    """A mono clip from a path, raw bytes or a `data:audio/...;base64,` URL (channels are averaged)."""
    if isinstance(src, Audio):
        return src
    data, name = read_media(src, AudioError, "audio")
    try:
        import soundfile as sf
    except ImportError as e:
        raise UserError(f"audio inputs need soundfile: pip install 'llama-adapter[media]' ({e})") from None
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (RuntimeError, ValueError, TypeError, sf.LibsndfileError) as e:
        raise AudioError(
            f"{name}: cannot read audio ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    if samples.shape[0] == 0:
        raise AudioError(f"{name}: the clip has no samples")
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    if not np.isfinite(mono).all():
        raise AudioError(f"{name}: the clip has non-finite samples")
    return Audio(np.ascontiguousarray(mono, dtype=np.float32), int(rate))


def resample(audio: Audio, rate: int) -> np.ndarray:
    """The clip's samples at `rate` (soxr, high quality); unchanged when the rates agree."""
    if audio.rate == rate:
        return audio.samples
    import soxr

    return np.asarray(soxr.resample(audio.samples, audio.rate, rate), dtype=np.float32)


def audio_kind(config: dict[str, Any]) -> str:
    """'whisper' or 'clap' from a checkpoint's config.json (its `model_type`)."""
    mt = str(config.get("model_type", ""))
    if mt == "whisper":
        return "whisper"
    if mt == "clap":  # a full ClapModel checkpoint (its audio tower and audio projection are used)
        return "clap"
    raise UserError(f"audio encoder model_type {mt!r} is not supported (expected one of {', '.join(AUDIO_KINDS)})")


class AudioEncoder:
    """Frozen Whisper encoder or CLAP audio tower with multi-scale global features.

    `encode(clips)` -> float32 [B, feature_dim] on the CPU.
    - Whisper: for each layer in `layers` the mean over the clip's own frames of that layer's hidden states
      ([B, d_model]), then the mean of the final, layer-normed states. Whisper pads every clip to its 30 s window;
      averaging over the padding would make a short clip's features mostly silence, so the padding is masked out
      (the extractor's attention mask, at the encoder's stride of 2).
    - CLAP: for each Swin stage the spatial mean of its hidden states ([B, stage width]), then the audio embedding
      (pooled, projected and L2-normalised, `ClapModel.get_audio_features`).
    Clips longer than the extractor's window are cut to their first window here: CLAP's extractor would otherwise
    pick a random crop, and the same clip must always give the same features (they are cached).
    """

    modality = "audio"

    def __init__(
        self,
        kind: str,
        model: nn.Module,
        projection: nn.Module | None,
        extractor: Any,
        path: Path,
        layers: list[int],
        groups: list[int],
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.kind, self.model, self.projection, self.extractor, self.path = kind, model, projection, extractor, path
        self.layers, self.groups = layers, groups
        self.device, self.dtype = device, dtype
        self.sampling_rate = int(extractor.sampling_rate)
        self.feature_dim = sum(groups)
        self.window = int(getattr(extractor, "n_samples", 0) or getattr(extractor, "nb_max_samples", 0))
        self._fp: dict[str, Any] | None = None

    @staticmethod
    def load_input(src: Any) -> Audio:
        return load_audio(src)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        layers: Sequence[int] | None = None,
    ) -> AudioEncoder:
        try:
            from transformers import AutoFeatureExtractor, ClapModel, WhisperModel
        except ImportError as e:
            raise UserError(f"audio encoders need transformers: pip install 'llama-adapter[media]' ({e})") from None
        p = Path(path).expanduser()
        if not (p / "config.json").is_file():
            raise UserError(f"{p}: not an audio encoder checkpoint directory (config.json not found)")
        if not (p / "preprocessor_config.json").is_file():
            raise UserError(f"{p}: preprocessor_config.json not found (the checkpoint's feature extractor)")
        try:
            raw = json.loads((p / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{p}: cannot read config.json ({e})") from None
        kind = audio_kind(raw)
        try:
            with quiet_transformers():
                extractor = AutoFeatureExtractor.from_pretrained(p)
                projection: nn.Module | None = None
                if kind == "whisper":
                    full = WhisperModel.from_pretrained(p)
                    model: nn.Module = cast(nn.Module, full.get_encoder())
                    n = int(full.config.encoder_layers)
                    width = int(full.config.d_model)
                else:
                    clap = ClapModel.from_pretrained(p)
                    model, projection = clap.audio_model, clap.audio_projection
                    acfg: Any = clap.config.audio_config
                    n = len(acfg.depths)
                    base = int(acfg.patch_embeds_hidden_size)
                    widths = [base * 2 ** min(i, n - 1) for i in range(1, n + 1)]  # stage i's width, 1-based
                    width = int(clap.config.projection_dim)
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"{p}: cannot load the {kind} audio encoder ({str(e).splitlines()[0]})") from None
        chosen = list(layers) if layers else default_layers(n)
        if any(not 1 <= i <= n for i in chosen):
            raise UserError(f"{p}: layers {chosen} out of range 1..{n}")
        if kind == "whisper":
            groups = [width] * (len(chosen) + 1)
        else:
            groups = [widths[i - 1] for i in chosen] + [width]
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        if projection is not None:
            projection = projection.to(device=device, dtype=dtype).eval().requires_grad_(False)
        return cls(kind, model, projection, extractor, p, chosen, groups, torch.device(device), dtype)

    def waveform(self, clip: Audio) -> np.ndarray:
        """The samples the extractor sees: resampled to the encoder's rate, cut to its window."""
        x = resample(clip, self.sampling_rate)
        return x[: self.window] if self.window else x

    @torch.no_grad()
    def encode(self, clips: Sequence[Audio], batch_size: int = 16) -> Tensor:
        outs = []
        for i in range(0, len(clips), batch_size):
            waves = [self.waveform(c) for c in clips[i : i + batch_size]]
            outs.append(self._whisper(waves) if self.kind == "whisper" else self._clap(waves))
        if not outs:
            return torch.zeros(0, self.feature_dim)
        return torch.cat(outs)

    def _whisper(self, waves: list[np.ndarray]) -> Tensor:
        inp = self.extractor(waves, sampling_rate=self.sampling_rate, return_tensors="pt", return_attention_mask=True)
        o = self.model(inp["input_features"].to(self.device, self.dtype), output_hidden_states=True)
        T = o.last_hidden_state.shape[1]
        frames = inp["attention_mask"][:, ::2][:, :T].to(self.device, torch.float32)  # conv stride 2
        frames[:, 0] = 1.0  # at least one frame, even for an empty clip
        w = (frames / frames.sum(1, keepdim=True))[:, :, None]
        feats = [(o.hidden_states[li].float() * w).sum(1) for li in self.layers]
        feats.append((o.last_hidden_state.float() * w).sum(1))
        return torch.cat(feats, dim=-1).cpu()

    def _clap(self, waves: list[np.ndarray]) -> Tensor:
        inp = self.extractor(waves, sampling_rate=self.sampling_rate, return_tensors="pt")
        x = inp["input_features"].to(self.device, self.dtype)
        o = self.model(input_features=x, is_longer=inp.get("is_longer"), output_hidden_states=True)
        feats = [o.hidden_states[li].float().mean(dim=(2, 3)) for li in self.layers]  # [0]: patch embeddings
        assert self.projection is not None
        emb = self.projection(o.pooler_output)
        feats.append(torch.nn.functional.normalize(emb.float(), dim=-1))
        return torch.cat(feats, dim=-1).cpu()

    def fingerprint(self) -> dict[str, Any]:
        """What identifies these features: kind, layers, rate, window, widths and a digest of the weights."""
        if self._fp is None:
            self._fp = {
                "modality": "audio",
                "kind": self.kind,
                "name": self.path.name,
                "sampling_rate": self.sampling_rate,
                "window": self.window,
                "layers": list(self.layers),
                "groups": list(self.groups),
                "feature_dim": self.feature_dim,
                "digest": digest_dir(self.path),
            }
        return dict(self._fp)

    def fingerprint_key(self) -> str:
        return hashlib.sha256(json.dumps(self.fingerprint(), sort_keys=True).encode()).hexdigest()[:16]
