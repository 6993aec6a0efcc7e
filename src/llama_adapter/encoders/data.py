"""Data for the encoder tasks: reading and checking records, and turning them into tensors for a checkpoint.

Formats:
- images: an ImageFolder tree (`DIR/<class>/<image>`, one sub-folder per class) or JSONL lines
  `{"image": path, "label": ...}` (paths relative to the JSONL file's folder);
- text classification: JSONL lines `{"text": ..., "label": ...}` or a CSV file with a `text,label` header;
- question answering: SQuAD JSON, v1.1 or v2.0 (`is_impossible` / empty `answers` = no answer).
Labels are kept as strings (a JSON 1 and "1" are one class). A record that cannot be used is a one-line
`EncoderDataError` naming the file and the record (line, or question id).

Tensors: images through the checkpoint's own preprocessing (`preprocessor_config.json`, done with PIL + numpy by
`multimodal.encoder.ClipPreprocessor`); text through the checkpoint's `tokenizer.json` (`tokenizers`), framed
by hand ([CLS] text [SEP], [CLS] question [SEP] context [SEP]) so that the offsets of the context are known.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llama_adapter.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


class EncoderDataError(DataError):
    """Encoder task data that cannot be used; the message names the file and the record."""


@dataclass
class ImageRecord:
    image: Path
    label: str


@dataclass
class TextRecord:
    text: str
    label: str


@dataclass
class QARecord:
    id: str
    question: str
    context: str
    answers: list[str]  # [] = no answer (v2.0)
    starts: list[int] = field(default_factory=list)  # character offsets of the answers in the context


def _exists(path: Path) -> Path:
    if not path.exists():
        raise EncoderDataError(f"{path}: not found")
    return path


def _label(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value).strip() == "":
        raise EncoderDataError(f"{where}: 'label' must be a non-empty string or an integer, got {value!r}")
    return str(value).strip()


def _jsonl(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(where, object) per non-empty line; a line that is not a JSON object is an error naming it."""
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise EncoderDataError(f"{path}: cannot read ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise EncoderDataError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise EncoderDataError(f"{where}: expected a JSON object")
        out.append((where, obj))
    if not out:
        raise EncoderDataError(f"{path}: no records")
    return out


# ---- reading ----------------------------------------------------------------------------------------------
def load_image_records(path: str | Path) -> list[ImageRecord]:
    """An ImageFolder tree or a JSONL file of {"image", "label"} records; every image path is checked to exist."""
    path = _exists(Path(path))
    if path.is_dir():
        classes = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise EncoderDataError(f"{path}: no class sub-folders (expected DIR/<class>/<image>)")
        recs = [
            ImageRecord(f, c.name)
            for c in classes
            for f in sorted(c.iterdir())
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not recs:
            raise EncoderDataError(f"{path}: no images in its class sub-folders")
        return recs
    recs = []
    for where, obj in _jsonl(path):
        img = obj.get("image")
        if not isinstance(img, str) or not img:
            raise EncoderDataError(f"{where}: 'image' must be a path string")
        p = Path(img) if Path(img).is_absolute() else path.parent / img
        if not p.is_file():
            raise EncoderDataError(f"{where}: image {p} not found")
        recs.append(ImageRecord(p, _label(obj.get("label"), where)))
    return recs


def load_text_records(path: str | Path) -> list[TextRecord]:
    """JSONL {"text", "label"} lines, or a CSV file with `text` and `label` columns."""
    path = _exists(Path(path))
    recs = []
    if path.suffix.lower() == ".csv":
        try:
            with path.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                if not reader.fieldnames or not {"text", "label"} <= set(reader.fieldnames):
                    raise EncoderDataError(f"{path}: CSV needs a header with 'text' and 'label' columns")
                rows = [(f"{path}:{i + 2}", dict(r)) for i, r in enumerate(reader)]
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise EncoderDataError(f"{path}: cannot read CSV ({e})") from None
        if not rows:
            raise EncoderDataError(f"{path}: no records")
    else:
        rows = _jsonl(path)
    for where, obj in rows:
        text = obj.get("text")
        if not isinstance(text, str) or not text.strip():
            raise EncoderDataError(f"{where}: 'text' must be a non-empty string")
        recs.append(TextRecord(text, _label(obj.get("label"), where)))
    return recs


def load_squad(path: str | Path) -> list[QARecord]:
    """The questions of a SQuAD v1.1 / v2.0 file; each answer's `answer_start` must point at its text."""
    path = _exists(Path(path))
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise EncoderDataError(f"{path}: not a SQuAD JSON file ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise EncoderDataError(f"{path}: expected a SQuAD object with a 'data' list")
    recs: list[QARecord] = []
    seen: set[str] = set()
    for ai, article in enumerate(doc["data"]):
        for pi, para in enumerate(article.get("paragraphs", []) if isinstance(article, dict) else []):
            ctx = para.get("context") if isinstance(para, dict) else None
            if not isinstance(ctx, str) or not ctx:
                raise EncoderDataError(f"{path}: data[{ai}].paragraphs[{pi}]: 'context' must be a non-empty string")
            for qa in para.get("qas", []):
                qid = str(qa.get("id", "")) if isinstance(qa, dict) else ""
                where = f"{path}: question {qid!r}" if qid else f"{path}: data[{ai}].paragraphs[{pi}]"
                if not qid or not isinstance(qa.get("question"), str):
                    raise EncoderDataError(f"{where}: needs an 'id' and a 'question' string")
                if qid in seen:
                    raise EncoderDataError(f"{where}: duplicate question id")
                seen.add(qid)
                answers = [] if qa.get("is_impossible") else qa.get("answers", [])
                if not isinstance(answers, list):
                    raise EncoderDataError(f"{where}: 'answers' must be a list")
                texts, starts = [], []
                for a in answers:
                    t, s = (a.get("text"), a.get("answer_start")) if isinstance(a, dict) else (None, None)
                    if not isinstance(t, str) or not isinstance(s, int) or isinstance(s, bool):
                        raise EncoderDataError(f"{where}: each answer needs 'text' (string) and 'answer_start' (int)")
                    if ctx[s : s + len(t)] != t:
                        raise EncoderDataError(f"{where}: answer {t!r} is not at answer_start {s} of the context")
                    texts.append(t)
                    starts.append(s)
                recs.append(QARecord(qid, qa["question"], ctx, texts, starts))
    if not recs:
        raise EncoderDataError(f"{path}: no questions")
    return recs


def label_list(labels: list[str]) -> list[str]:
    """The classes of a training set, in a fixed order (sorted; numbers numerically)."""
    uniq = set(labels)
    return sorted(uniq, key=lambda s: (0, int(s), "") if s.lstrip("-").isdigit() else (1, 0, s))


def label_ids(labels: list[str], classes: list[str], source: str) -> Tensor:
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise EncoderDataError(f"{source}: label(s) {unknown[:5]} not among the trained classes {classes[:10]}")
    return torch.tensor([index[x] for x in labels])


# ---- images -------------------------------------------------------------------------------------------------
def image_preprocessor(model_dir: str | Path, image_size: int) -> Any:
    """The checkpoint's preprocessing (`preprocessor_config.json`); a ViT-style config without crop settings means
    no centre crop. Without the file: resize to the model's image size, normalise with mean = std = 0.5."""
    from llama_adapter.multimodal.encoder import ClipPreprocessor

    path = Path(model_dir) / "preprocessor_config.json"
    cfg: dict[str, Any] = {"size": {"height": image_size, "width": image_size}, "image_mean": [0.5] * 3}
    cfg["image_std"] = [0.5] * 3
    if path.is_file():
        try:
            cfg = json.loads(path.read_text())
        except ValueError as e:
            raise EncoderDataError(f"{path}: not JSON ({e})") from None
    cfg.setdefault("do_center_crop", "crop_size" in cfg)
    return ClipPreprocessor(cfg, image_size=image_size)


def image_tensor(records: list[ImageRecord], preprocess: Any, batch: int = 256) -> Tensor:
    """Preprocessed images [N, 3, H, W]; an unreadable image is an error naming it."""
    from llama_adapter.multimodal.encoder import load_image

    out = []
    for i in range(0, len(records), batch):
        out.append(preprocess([load_image(r.image) for r in records[i : i + batch]]))
    return torch.cat(out)


# ---- text ---------------------------------------------------------------------------------------------------
_CLS = ("<s>", "[CLS]", "<|startoftext|>")
_SEP = ("</s>", "[SEP]", "<|endoftext|>")
_PAD = ("<pad>", "[PAD]")


class TextEncoder:
    """A checkpoint's `tokenizer.json`, with the special tokens the encoders frame their inputs with."""

    def __init__(self, model_dir: str | Path) -> None:
        from tokenizers import Tokenizer

        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise EncoderDataError(f"{path}: the text tasks need the checkpoint's tokenizer.json")
        self.tok = Tokenizer.from_file(str(path))
        self.tok.no_truncation()
        self.tok.no_padding()
        self.cls = self._special(_CLS, path)
        self.sep = self._special(_SEP, path)
        pad = next((self.tok.token_to_id(t) for t in _PAD if self.tok.token_to_id(t) is not None), None)
        self.pad = self.sep if pad is None else int(pad)

    def _special(self, names: tuple[str, ...], path: Path) -> int:
        for t in names:
            i = self.tok.token_to_id(t)
            if i is not None:
                return int(i)
        raise EncoderDataError(f"{path}: none of the special tokens {list(names)} is in the vocabulary")

    def _pad(self, rows: list[list[int]]) -> tuple[Tensor, Tensor]:
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), self.pad, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return ids, mask

    def encode_texts(self, texts: list[str], max_length: int) -> tuple[Tensor, Tensor]:
        """[CLS] text [SEP], truncated to max_length, right-padded: (ids, attention mask)."""
        rows = [
            [self.cls, *self.tok.encode(t, add_special_tokens=False).ids[: max_length - 2], self.sep] for t in texts
        ]
        return self._pad(rows)

    def encode_qa(self, recs: list[QARecord], max_length: int) -> QABatch:
        """[CLS] question [SEP] context [SEP] with the answer's first token span as targets ([CLS] = no answer).
        A context that does not fit is cut; an answer cut off with it becomes "no answer" (counted)."""
        rows, starts, ends, spans, offsets = [], [], [], [], []
        cut = 0
        for r in recs:
            q = self.tok.encode(r.question, add_special_tokens=False).ids[: max_length // 2]
            c = self.tok.encode(r.context, add_special_tokens=False)
            room = max_length - len(q) - 3
            cids, coffs = c.ids[:room], c.offsets[:room]
            first = len(q) + 2
            rows.append([self.cls, *q, self.sep, *cids, self.sep])
            spans.append((first, first + len(cids)))
            offsets.append(list(coffs))
            s = e = 0
            if r.answers:
                a0, a1 = r.starts[0], r.starts[0] + len(r.answers[0])
                inside = [j for j, (o0, o1) in enumerate(coffs) if o1 > a0 and o0 < a1]
                if inside:
                    s, e = first + inside[0], first + inside[-1]
                else:
                    cut += 1
            starts.append(s)
            ends.append(e)
        ids, mask = self._pad(rows)
        return QABatch(ids, mask, torch.tensor(starts), torch.tensor(ends), spans, offsets, cut)


@dataclass
class QABatch:
    """Encoded questions: ids/mask [N, T], target start/end token [N] (0 = no answer), each row's context token
    range and the context tokens' character offsets (to cut the answer text out of the context)."""

    ids: Tensor
    mask: Tensor
    starts: Tensor
    ends: Tensor
    spans: list[tuple[int, int]]
    offsets: list[list[tuple[int, int]]]
    n_cut: int = 0
