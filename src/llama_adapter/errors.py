"""The errors a user can cause, in one place.

Every one of them is a `UserError`: the command line prints its message as one line and exits 2. They also
derive from `ValueError` where the library raised a `ValueError` for the same thing before, so callers that catch
that keep working. Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input (a path, a file, a flag, a request); printed as one line."""


class CheckpointError(UserError, ValueError):
    """A checkpoint directory or file that cannot be used; the message names the file and the problem."""


class AdapterError(UserError, ValueError):
    """An adapter file that cannot be used with this base; the message names the file and both shapes."""


class TemplateError(UserError, ValueError):
    """An unknown prompt template, or a template file without the fields a template needs."""


class DataError(UserError, ValueError):
    """Training data that cannot be used (unreadable file, malformed record)."""


class MediaError(UserError, ValueError):
    """An input of a multi-modal adapter (image, audio, video) that cannot be read; the message names it."""


class ImageError(MediaError):
    """An image that cannot be read (missing file, not an image, bad data URL)."""


class AudioError(MediaError):
    """An audio clip that cannot be read (missing file, not a sound file soundfile reads, bad data URL)."""


class VideoError(MediaError):
    """A video that cannot be read (missing file, no video stream, no decodable frame, bad data URL)."""


class EvalError(UserError, ValueError):
    """A benchmark file or directory (COCO Caption, MME, open-ended QA) that cannot be read."""


class TrainingError(UserError):
    """Training cannot continue (bad configuration, non-finite loss, incompatible checkpoint)."""


class QuantizeError(UserError, ValueError):
    """A `--quantize` request that cannot run here (unknown mode, a GPU, FSDP, torchao not installed)."""


class ScienceQAError(UserError, ValueError):
    """A ScienceQA file or directory that cannot be read."""
