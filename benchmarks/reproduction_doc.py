"""docs/reproduction.md is assembled from one section per benchmark, so that each can regenerate its own.

`reproduce_paper.py` writes the built-in base's section and the document's head; every other benchmark
(`reproduce_real.py`, `multimodal_demo.py`, ...) writes its part to `docs/parts/<name>.md` and calls `splice`,
which replaces that part's marked span in the document (or appends it). `parts()` lists what is there, in
`ORDER`, for `reproduce_paper.py` to keep when it rewrites the document.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reproduction.md"
PARTS = ROOT / "docs" / "parts"
# reproduction parts in document order (a part not listed here goes last)
ORDER = ["reproduction_real", "reproduction_multimodal", "reproduction_av", "reproduction_encoders"]


def _marked(name: str, text: str) -> str:
    return f"<!-- {name} -->\n{text.rstrip()}\n<!-- /{name} -->\n"


def parts() -> str:
    """Every reproduction part under docs/parts/, marked, in ORDER."""
    names = sorted(
        (p.stem for p in PARTS.glob("reproduction_*.md")),
        key=lambda n: (n not in ORDER, ORDER.index(n) if n in ORDER else 0, n),
    )
    return "\n".join(_marked(n, (PARTS / f"{n}.md").read_text()) for n in names)


def splice(name: str, text: str, doc: Path = DOC) -> None:
    """Write docs/parts/<name>.md and put it into the document in place of its previous version."""
    (PARTS / f"{name}.md").write_text(text.rstrip() + "\n")
    body = doc.read_text() if doc.is_file() else ""
    start, end = f"<!-- {name} -->\n", f"<!-- /{name} -->\n"
    if start in body and end in body:
        a, b = body.index(start), body.index(end) + len(end)
        body = body[:a] + _marked(name, text) + body[b:]
    else:
        body = body.rstrip() + "\n\n" + _marked(name, text)
    doc.write_text(body)
