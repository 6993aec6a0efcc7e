"""COCO Caption: the official annotation layout in, BLEU-1..4, METEOR, ROUGE-L and CIDEr out (`pycocoevalcap`).

Layout (as downloaded from cocodataset.org): an annotations JSON (`annotations/captions_val2014.json`:
`{"images": [{"id", "file_name"}, ...], "annotations": [{"image_id", "caption"}, ...]}`) and a folder of the
images it names (`val2014/`). Karpathy-split files in the same format (`coco_karpathy_test_gt.json` rewritten
as such) work as well.

Scoring is the COCO caption evaluation's: captions are tokenised with the Stanford PTB tokenizer (Java), then
scored with pycocoevalcap's BLEU, ROUGE-L and CIDEr (Python) and METEOR (its Java jar, with its paraphrase table).
Where Java or METEOR's resources are missing, METEOR is left out and said so, and tokenisation falls back to a
Python approximation of the PTB tokenizer's (lower case, punctuation removed) — reported in the notes, since the
numbers can differ slightly from the official ones.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_adapter.errors import EvalError
from llama_adapter.eval.answering import Item

CAPTION_COLUMNS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
DEFAULT_PROMPT = "Generate a caption for this image."
# the punctuation the COCO caption tool's PTB tokenizer step removes
PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}


@dataclass
class CaptionImage:
    """One image of the annotations: its id, file and reference captions."""

    image_id: str
    path: Path
    references: list[str]


def load_coco_captions(annotations: str | os.PathLike[str], images: str | os.PathLike[str]) -> list[CaptionImage]:
    """The images of a COCO caption annotations file that have at least one caption, in the file's order."""
    p = Path(annotations).expanduser()
    if not p.is_file():
        raise EvalError(f"{p}: annotations file not found")
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise EvalError(f"{p}: not a JSON file ({e})") from None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations"), list)
    ):
        raise EvalError(f"{p}: expected COCO caption annotations with 'images' and 'annotations' lists")
    refs: dict[str, list[str]] = {}
    for k, a in enumerate(data["annotations"]):
        if not isinstance(a, dict) or "image_id" not in a or not isinstance(a.get("caption"), str):
            raise EvalError(f"{p}: annotations[{k}] needs an 'image_id' and a 'caption' string")
        refs.setdefault(str(a["image_id"]), []).append(a["caption"])
    root = Path(images).expanduser()
    out = []
    for k, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise EvalError(f"{p}: images[{k}] needs an 'id' and a 'file_name'")
        iid = str(im["id"])
        if refs.get(iid):
            out.append(CaptionImage(iid, root / im["file_name"], refs[iid]))
    if not out:
        raise EvalError(f"{p}: no image with a caption")
    return out


def caption_items(images: Sequence[CaptionImage], prompt: str = DEFAULT_PROMPT) -> list[Item]:
    return [Item(im.image_id, prompt, {"image": str(im.path)}) for im in images]


def java_available() -> bool:
    return shutil.which("java") is not None


def meteor_available() -> tuple[bool, str]:
    """(whether METEOR can run here, why not): it needs Java and pycocoevalcap's jar with its paraphrase table."""
    if not java_available():
        return False, "METEOR needs Java (not found on PATH)"
    try:
        import pycocoevalcap.meteor.meteor as m
    except ImportError:
        return False, "METEOR needs pycocoevalcap"
    d = Path(m.__file__).parent
    missing = [n for n in ("meteor-1.5.jar", "data/paraphrase-en.gz") if not (d / n).is_file()]
    if missing:
        return False, f"METEOR's resources are missing ({', '.join(missing)} in {d})"
    return True, ""


def simple_tokenize(text: str) -> str:
    """A Python stand-in for the PTB tokenizer step: lower case, punctuation dropped, words split on spaces."""
    text = text.lower().replace("'s", " 's").replace("n't", " n't")
    return " ".join(t for t in re.findall(r"[a-z0-9]+(?:'[a-z]+)?|'[a-z]+", text) if t not in PUNCTUATION)


def tokenize(captions: dict[str, list[str]], use_java: bool) -> dict[str, list[str]]:
    """{id: [caption, ...]} tokenised as the COCO tool does (PTB tokenizer), or with `simple_tokenize`."""
    if use_java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tok: dict[str, list[str]] = PTBTokenizer().tokenize(
            {k: [{"caption": c} for c in v] for k, v in captions.items()}
        )
        return tok
    return {k: [simple_tokenize(c) for c in v] for k, v in captions.items()}


def score_captions(
    references: dict[str, list[str]], predictions: dict[str, str], meteor: bool | None = None
) -> tuple[dict[str, float | None], list[str]]:
    """(metrics x 100, notes) of predictions against references, both keyed by image id.

    meteor: True (must run), False (skip), None (where available).
    """
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError as e:
        raise EvalError(f"caption metrics need pycocoevalcap: pip install 'llama-adapter[metrics]' ({e})") from None
    ids = [k for k in references if k in predictions]
    if not ids:
        raise EvalError("no prediction for any annotated image")
    notes: list[str] = []
    java = java_available()
    if not java:
        notes.append("Java not found: captions tokenised by a Python approximation of the PTB tokenizer")
    gts = tokenize({k: references[k] for k in ids}, java)
    res = tokenize({k: [predictions[k]] for k in ids}, java)
    res = {k: [v[0] if v and v[0] else "<empty>"] for k, v in res.items()}  # the scorers need one non-empty string
    out: dict[str, float | None] = dict.fromkeys(CAPTION_COLUMNS)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        out[f"BLEU-{n + 1}"] = 100.0 * float(bleu[n])
    out["ROUGE-L"] = 100.0 * float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = 100.0 * float(Cider().compute_score(gts, res)[0])
    ok, why = meteor_available()
    if meteor and not ok:
        raise EvalError(why)
    if meteor is None and not ok:
        notes.append(f"METEOR not computed: {why}")
    if meteor is not False and ok:
        out["METEOR"] = 100.0 * meteor_score(gts, res)
    elif meteor is False:
        notes.append("METEOR not computed (--meteor off)")
    return out, notes


def meteor_score(gts: dict[str, list[str]], res: dict[str, list[str]]) -> float:
    """Corpus METEOR with pycocoevalcap's jar (one Java process, closed afterwards)."""
    from pycocoevalcap.meteor.meteor import Meteor

    m = Meteor()
    try:
        return float(m.compute_score(gts, res)[0])
    finally:
        proc: Any = getattr(m, "meteor_p", None)
        if proc is not None:
            proc.stdin.close()
            proc.kill()
            proc.wait()
