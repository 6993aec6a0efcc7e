"""Reading the bytes of one multi-modal input, whatever its modality: a path, raw bytes or a base64 data URL.

One reader so that every modality names its input the same way in its one-line errors (`MediaError` subclasses:
`ImageError`, `AudioError`, `VideoError`), and so that a data URL means the same thing in a training record, on
the command line and in a server request. Decoding the bytes is each modality's own business.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path

from llama_adapter.errors import MediaError


def shown(src: str) -> str:
    """A data URL shortened for an error message (they can be megabytes long); paths as they are."""
    return src[:40] + "..." if src.startswith("data:") and len(src) > 40 else src


def read_media(src: str | os.PathLike[str] | bytes, error: type[MediaError], what: str) -> tuple[bytes, str]:
    """(bytes, name for messages) of `src`: a path, raw bytes, or a `data:<mime>;base64,<payload>` URL.

    Raises `error` ("<name>: <what> file not found", "... only base64 data URLs are supported", ...).
    """
    if isinstance(src, (bytes, bytearray)):
        return bytes(src), "<bytes>"
    if isinstance(src, str) and src.startswith("data:"):
        name = shown(src)
        header, sep, payload = src.partition(",")
        if not sep or ";base64" not in header:
            raise error(f"{name}: only base64 data URLs are supported")
        try:
            return base64.b64decode(payload, validate=False), name
        except (binascii.Error, ValueError) as e:
            raise error(f"{name}: bad base64 payload ({e})") from None
    path = Path(src).expanduser()
    try:
        if not path.is_file():
            raise error(f"{path}: {what} file not found")
        return path.read_bytes(), str(path)
    except OSError as e:
        raise error(f"{path}: cannot read {what} file ({e.strerror or e})") from None


def source_key(src: str | os.PathLike[str]) -> str:
    """A feature-cache key of an input: sha256 of the resolved path + size + mtime (files: a changed file gets new
    features), or of the whole data URL. OSError when a file is missing."""
    s = str(src)
    if s.startswith("data:"):
        return hashlib.sha256(s.encode()).hexdigest()[:32]
    p = Path(s).expanduser().resolve()
    st = p.stat()
    return hashlib.sha256(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]


def digest_dir(path: Path) -> str:
    """A cheap digest of a checkpoint directory's weights and configs (names, sizes, first and last MiB of each
    file): it changes when the weights change, without reading gigabytes."""
    h = hashlib.sha256()
    for f in sorted(path.glob("*")):
        if f.suffix in (".safetensors", ".bin", ".json") and f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}".encode())
            with f.open("rb") as fh:
                h.update(fh.read(1 << 20))
                if st.st_size > 2 << 20:
                    fh.seek(-(1 << 20), os.SEEK_END)
                    h.update(fh.read())
    return h.hexdigest()[:16]
