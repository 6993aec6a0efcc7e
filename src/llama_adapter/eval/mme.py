"""MME: yes/no questions about images in 14 subtasks; accuracy, accuracy+ and the perception/cognition totals.

Layout (the released `MME_Benchmark_release_version/`): one folder per subtask. Either the image and a `.txt` of
the same stem side by side (`existence/000000006040.jpg` + `existence/000000006040.txt`), or `images/` and
`questions_answers_YN/` subfolders (artwork, celebrity, landmark, posters, scene). Each `.txt` line is
`question<TAB>Yes|No`; there are two questions per image (one answered yes, one no).

Scores as the MME tool computes them: an answer is read as yes / no from its first word (else "other", which is
wrong); per subtask, acc = % of questions right, acc+ = % of images with both questions right, score = acc +
acc+ (at most 200); perception = the sum of the 10 perception subtasks' scores (at most 2000), cognition of the 4
cognition subtasks (at most 800). Subtasks absent from the data are left out of the totals (and shown as '-').
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_adapter.errors import EvalError
from llama_adapter.eval.answering import Item

PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass
class MMEQuestion:
    subtask: str
    image: Path
    question: str
    answer: str  # "yes" or "no"

    @property
    def id(self) -> str:
        return f"{self.subtask}/{self.image.name}/{self.question}"


def _image_for(folder: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        for s in (suffix, suffix.upper()):
            if (folder / (stem + s)).is_file():
                return folder / (stem + s)
    return None


def load_mme(root: str | os.PathLike[str], subtasks: Sequence[str] | None = None) -> list[MMEQuestion]:
    """Every question of the subtask folders under `root` (all of PERCEPTION + COGNITION that exist, or `subtasks`)."""
    r = Path(root).expanduser()
    if not r.is_dir():
        raise EvalError(f"{r}: MME directory not found")
    names = list(subtasks) if subtasks else [n for n in (*PERCEPTION, *COGNITION) if (r / n).is_dir()]
    if not names:
        raise EvalError(f"{r}: no MME subtask folder (expected some of {', '.join((*PERCEPTION, *COGNITION))})")
    out: list[MMEQuestion] = []
    for name in names:
        d = r / name
        if not d.is_dir():
            raise EvalError(f"{d}: subtask folder not found")
        qa_dir, img_dir = (
            (d / "questions_answers_YN", d / "images") if (d / "questions_answers_YN").is_dir() else (d, d)
        )
        for txt in sorted(qa_dir.glob("*.txt")):
            image = _image_for(img_dir, txt.stem)
            if image is None:
                raise EvalError(f"{txt}: no image {txt.stem}.* next to it (in {img_dir})")
            for n, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                q, sep, a = line.rpartition("\t")
                if not sep or a.strip().lower() not in ("yes", "no"):
                    raise EvalError(f"{txt}:{n}: expected 'question<TAB>Yes|No'")
                out.append(MMEQuestion(name, image, q.strip(), a.strip().lower()))
    if not out:
        raise EvalError(f"{r}: no questions in {', '.join(names)}")
    return out


def mme_items(questions: Sequence[MMEQuestion]) -> list[Item]:
    return [Item(q.id, q.question, {"image": str(q.image)}) for q in questions]


def parse_yes_no(answer: str) -> str:
    """'yes', 'no' or 'other' as the MME tool reads an answer: the whole answer, else its first four characters."""
    a = answer.strip().lower()
    if a in ("yes", "no"):
        return a
    head = a[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def mme_scores(questions: Sequence[MMEQuestion], answers: Sequence[str]) -> dict[str, Any]:
    """{"subtasks": {name: {"acc", "acc_plus", "score", "questions"}}, "perception", "cognition"} (percent)."""
    per_image: dict[str, dict[Path, list[bool]]] = {}
    for q, a in zip(questions, answers, strict=True):
        per_image.setdefault(q.subtask, {}).setdefault(q.image, []).append(parse_yes_no(a) == q.answer)
    subtasks: dict[str, dict[str, float]] = {}
    for name, imgs in per_image.items():
        flat = [c for cs in imgs.values() for c in cs]
        acc = 100.0 * sum(flat) / len(flat)
        acc_plus = 100.0 * sum(all(cs) for cs in imgs.values()) / len(imgs)
        subtasks[name] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus, "questions": float(len(flat))}

    def total(names: Sequence[str]) -> float | None:
        have = [subtasks[n]["score"] for n in names if n in subtasks]
        return sum(have) if have else None

    return {"subtasks": subtasks, "perception": total(PERCEPTION), "cognition": total(COGNITION)}


def format_mme_table(label: str, scores: dict[str, Any]) -> str:
    """Per-subtask acc / acc+ / score, then the perception and cognition totals (the MME tool's report)."""
    lines = [f"{label}", f"{'subtask':24}{'acc':>9}{'acc+':>9}{'score':>9}"]
    for group, names in (("Perception", PERCEPTION), ("Cognition", COGNITION)):
        for n in names:
            s = scores["subtasks"].get(n)
            if s is None:
                lines.append(f"{n:24}{'-':>9}{'-':>9}{'-':>9}")
            else:
                lines.append(f"{n:24}{s['acc']:9.2f}{s['acc_plus']:9.2f}{s['score']:9.2f}")
        t = scores[group.lower()]
        lines.append(f"{group + ' total':24}{'':>18}{'-' if t is None else f'{t:.2f}':>9}")
    return "\n".join(lines)
