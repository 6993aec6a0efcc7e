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


class ImageError(UserError, ValueError):
    """An image that cannot be read (missing file, not an image, bad data URL)."""


class TrainingError(UserError):
    """Training cannot continue (bad configuration, non-finite loss, incompatible checkpoint)."""


class ScienceQAError(UserError, ValueError):
    """A ScienceQA file or directory that cannot be read."""
