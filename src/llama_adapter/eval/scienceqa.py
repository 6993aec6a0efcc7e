"""ScienceQA (paper Table 2): data readers, prompts, answer extraction, evaluation and accuracy by group.

Two inputs are read:
- the official layout: `problems.json` + `pid_splits.json` (+ `images/<split>/<pid>/image.png`);
- LLaVA's converted test file (`llava_test_CQM-A.json`), which lacks subject and grade: only the
  TXT / IMG / NO groups (from the hint and image fields) can be computed from it.

Prompt (the instruction, wrapped by the adapter's template): the question, the context, the options as
"(A) ... (B) ...", and the answer is trained and expected as "The answer is (X).".
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from llama_adapter.errors import ScienceQAError
from llama_adapter.progress import Progress

LETTERS = "ABCDE"
GROUPS = ["NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12"]
TABLE_COLUMNS = ["Average", *GROUPS]
SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
# The paper's Table 2 rows that this project can be compared with.
PAPER_TABLE2 = {
    "LLaMA-Adapter_T (text-only, paper)": [78.31, 79.00, 73.79, 80.55, 78.30, 70.35, 83.14, 79.77, 75.68],
    "LLaMA-Adapter (image-conditioned, paper)": [85.19, 84.37, 88.30, 84.36, 83.72, 80.32, 86.90, 85.83, 84.05],
}


@dataclass
class Problem:
    pid: str
    question: str
    choices: list[str]
    answer: int | None  # index into choices
    hint: str = ""
    image: str | None = None  # resolved path (or None)
    subject: str | None = None
    grade: str | None = None
    split: str | None = None
    lecture: str = ""
    solution: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def answer_letter(self) -> str | None:
        return None if self.answer is None else LETTERS[self.answer]

    def groups(self) -> list[str]:
        """The Table-2 groups this problem belongs to (only those its fields allow)."""
        g = []
        if self.subject and self.subject.lower() in SUBJECTS:
            g.append(SUBJECTS[self.subject.lower()])
        if self.hint.strip():
            g.append("TXT")
        if self.image:
            g.append("IMG")
        if not self.hint.strip() and not self.image:
            g.append("NO")
        if self.grade:
            m = re.search(r"(\d+)", self.grade)
            if m:
                g.append("G1-6" if int(m.group(1)) <= 6 else "G7-12")
        return g


# ---- readers -------------------------------------------------------------------------------------------------
def load_official(
    data_dir: str | os.PathLike[str], split: str = "test", image_root: str | os.PathLike[str] | None = None
) -> list[Problem]:
    """`problems.json` + `pid_splits.json`; images at `<image_root or data_dir/images>/<split>/<pid>/<image>`."""
    d = Path(data_dir).expanduser()
    pf, sf = d / "problems.json", d / "pid_splits.json"
    if not pf.is_file():
        raise ScienceQAError(
            f"{d}: problems.json not found (official ScienceQA layout: problems.json, "
            "pid_splits.json, images/<split>/<pid>/image.png; or pass LLaVA's "
            "llava_test_CQM-A.json file)"
        )
    problems = json.loads(pf.read_text())
    if sf.is_file():
        splits = json.loads(sf.read_text())
        if split not in splits:
            raise ScienceQAError(f"{sf}: no split {split!r} (have: {', '.join(splits)})")
        pids = [str(p) for p in splits[split]]
    else:
        pids = [pid for pid, p in problems.items() if p.get("split") == split]
    root = Path(image_root).expanduser() if image_root else d / "images"
    out = []
    for pid in pids:
        if pid not in problems:
            raise ScienceQAError(f"{pf}: pid {pid} of split {split!r} not found")
        p = problems[pid]
        img = None
        if p.get("image"):
            img_split = p.get("split") or split
            cand = root / img_split / pid / p["image"]
            img = str(cand if cand.exists() or not (root / pid / p["image"]).exists() else root / pid / p["image"])
        out.append(
            Problem(
                pid=pid,
                question=p["question"],
                choices=list(p["choices"]),
                answer=p.get("answer"),
                hint=p.get("hint") or "",
                image=img,
                subject=p.get("subject"),
                grade=p.get("grade"),
                split=p.get("split") or split,
                lecture=p.get("lecture") or "",
                solution=p.get("solution") or "",
                extra={k: p[k] for k in ("topic", "category", "skill", "task") if k in p},
            )
        )
    return out


def _split_options(lines: list[str]) -> tuple[int, list[str]] | None:
    """Find the trailing option block "A. ..." "B. ..." (options may span lines); (first line, options)."""
    for start in range(len(lines) - 1, -1, -1):
        if not lines[start].startswith("A. "):
            continue
        opts: list[str] = []
        ok = True
        for line in lines[start:]:
            nxt = LETTERS[len(opts)] if len(opts) < len(LETTERS) else None
            if nxt and line.startswith(f"{nxt}. "):
                opts.append(line[3:])
            elif opts:
                opts[-1] += "\n" + line
            else:
                ok = False
                break
        if ok and len(opts) >= 2:
            return start, opts
    return None


def parse_llava_record(rec: dict[str, Any], image_root: str | os.PathLike[str] | None = None) -> Problem:
    conv = rec.get("conversations") or []
    human = next((t["value"] for t in conv if t.get("from") == "human"), None)
    gpt = next((t["value"] for t in conv if t.get("from") == "gpt"), None)
    if human is None:
        raise ScienceQAError(f"record {rec.get('id')}: no human turn")
    text = human.replace("<image>\n", "").replace("<image>", "")
    lines = text.split("\n")
    found = _split_options(lines)
    if found is None:
        raise ScienceQAError(f"record {rec.get('id')}: no 'A. ...' options found")
    start, choices = found
    body = lines[:start]
    hint = ""
    if body and body[0].startswith("Context: "):  # context first, the question is the last line
        body[0] = body[0][len("Context: ") :]
        q_at = max(i for i, line in enumerate(body) if line.strip()) if len(body) > 1 else len(body)
        hint, body = "\n".join(body[:q_at]).strip(), body[q_at:]
    question = "\n".join(body).strip()
    answer = None
    if gpt is not None:
        m = re.match(r"\s*\(?([A-E])\b", gpt.strip())
        answer = LETTERS.index(m.group(1)) if m else extract_answer(gpt, choices)
    img = rec.get("image")
    if img and image_root:
        img = str(Path(image_root).expanduser() / img)
    return Problem(
        pid=str(rec.get("id")),
        question=question,
        choices=choices,
        answer=answer,
        hint=hint,
        image=img or None,
        split="test",
    )


def load_llava(path: str | os.PathLike[str], image_root: str | os.PathLike[str] | None = None) -> list[Problem]:
    """LLaVA's ScienceQA conversion (a JSON list of {id, image?, conversations}); `image` is joined to
    `image_root` when given (e.g. ScienceQA's `images/test`)."""
    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ScienceQAError(f"{p}: cannot read ({e})") from None
    if not isinstance(data, list):
        raise ScienceQAError(f"{p}: expected a JSON list of LLaVA records")
    return [parse_llava_record(r, image_root) for r in data]


def load_scienceqa(
    data: str | os.PathLike[str], split: str = "test", image_root: str | os.PathLike[str] | None = None
) -> list[Problem]:
    """A directory in the official layout, or a LLaVA-format JSON file (test split only)."""
    p = Path(data).expanduser()
    if p.is_dir():
        if not (p / "problems.json").is_file() and (p / "llava_test_CQM-A.json").is_file() and split == "test":
            return load_llava(p / "llava_test_CQM-A.json", image_root or (p / "images" / "test"))
        return load_official(p, split, image_root)
    if p.is_file():
        return load_llava(p, image_root)
    raise ScienceQAError(f"{p}: ScienceQA data not found")


def load_captions(path: str | os.PathLike[str]) -> dict[str, str]:
    d = json.loads(Path(path).expanduser().read_text())
    return {str(k): v for k, v in (d.get("captions", d)).items()}


# ---- prompts and answers ---------------------------------------------------------------------------------------
def format_options(choices: Sequence[str]) -> str:
    return " ".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))


def build_instruction(p: Problem, caption: str | None = None) -> str:
    """Question, context and options; the adapter's template wraps it."""
    context = " ".join(x for x in (p.hint.strip(), (caption or "").strip()) if x) or "N/A"
    return f"Question: {p.question}\nContext: {context}\nOptions: {format_options(p.choices)}"


ANSWER_FORMAT = "The answer is ({letter})."


def answer_text(p: Problem, fmt: str = ANSWER_FORMAT) -> str:
    """The training target: `fmt` with {letter} and/or {text} (the option) filled in."""
    if p.answer is None or p.answer_letter is None:
        raise ScienceQAError(f"problem {p.pid}: no answer")
    return fmt.format(letter=p.answer_letter, text=p.choices[p.answer])


def to_record(p: Problem, caption: str | None = None, answer_format: str = ANSWER_FORMAT) -> dict[str, Any]:
    """An Alpaca-style training record (with "image" when the problem has one)."""
    rec: dict[str, Any] = {
        "instruction": build_instruction(p, caption),
        "input": "",
        "output": answer_text(p, answer_format),
        "id": p.pid,
    }
    if p.image:
        rec["image"] = p.image
    return rec


_ANSWER_IS = re.compile(r"(?i:answer\s+is)\s*:?\s*(?:\(\s*([A-Ea-e])\s*\)|([A-E])(?![A-Za-z]))")
_LEADING = re.compile(r"^\s*\(?([A-E])\)?(?:[.):,\s]|$)")
_PAREN = re.compile(r"\(([A-E])\)")


def extract_answer(text: str, choices: Sequence[str]) -> int | None:
    """The chosen option index from generated text: "The answer is (B)", a leading "B." / "(B)", a "(B)"
    anywhere, or else the option text itself (the longest option that appears). None when nothing matches."""
    n = len(choices)
    for pat in (_ANSWER_IS, _LEADING, _PAREN):
        m = pat.search(text)
        if m:
            i = LETTERS.index(next(g for g in m.groups() if g).upper())
            if i < n:
                return i
    low = text.lower()
    hits = [(len(c), i) for i, c in enumerate(choices) if c.strip() and c.strip().lower() in low]
    if hits:
        return max(hits)[1]
    return None


# ---- accuracy ----------------------------------------------------------------------------------------------------
def group_accuracy(results: Iterable[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{"Average"|group: {"correct", "total", "acc"}} over result rows with "correct" and "groups"."""
    acc: dict[str, list[int]] = {}
    for r in results:
        for g in ["Average", *r["groups"]]:
            c = acc.setdefault(g, [0, 0])
            c[0] += int(bool(r["correct"]))
            c[1] += 1
    return {g: {"correct": c, "total": t, "acc": 100.0 * c / t} for g, (c, t) in acc.items() if t}


def format_table(rows: dict[str, dict[str, dict[str, float]] | list[float | None]], title: str = "Method") -> str:
    """Rows in the layout of the paper's Table 2; "-" where a group is not available."""
    w = max([len(title), *map(len, rows)]) + 2
    lines = [title.ljust(w) + "".join(c.rjust(9) for c in TABLE_COLUMNS)]
    for name, row in rows.items():
        cells = []
        for i, col in enumerate(TABLE_COLUMNS):
            v = row[i] if isinstance(row, list) else (row.get(col) or {}).get("acc")
            cells.append("-".rjust(9) if v is None else f"{v:9.2f}")
        lines.append(name.ljust(w) + "".join(cells))
    return "\n".join(lines)


# ---- evaluation ----------------------------------------------------------------------------------------------------
def greedy_generate(
    model: Any,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    adapter: str | None,
    max_new_tokens: int = 16,
    image_features: torch.Tensor | None = None,
) -> list[str]:
    """Greedy completions (prompts already templated, or token ids) via `llama_adapter.inference.decoder.generate`."""
    from llama_adapter.inference.generate import generate

    return list(
        generate(
            model,
            prompts,
            adapter=adapter,
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            image_features=image_features,
            stop=["\n"],
        )
    )


def fit_prompt(
    model: Any, p: Problem, template: str, caption: str | None, max_new_tokens: int
) -> tuple[list[int], bool]:
    """Token ids (BOS + templated prompt) that fit the context with room for the answer.

    Too long: the context (hint + caption) is shortened first; as a last resort the start is cut, keeping the
    question and options at the end. Returns (ids, truncated).
    """
    from llama_adapter.templates import format_prompt

    tok = model.tokenizer
    budget = int(model.config.max_seq_len) - max_new_tokens
    ids = tok.encode(format_prompt(template, build_instruction(p, caption)), bos=True)
    if len(ids) <= budget:
        return ids, False
    context = " ".join(x for x in (p.hint.strip(), (caption or "").strip()) if x)
    while context:
        context = context[: int(len(context) * 0.7)]
        q = Problem(pid=p.pid, question=p.question, choices=p.choices, answer=p.answer, hint=context)
        ids = tok.encode(format_prompt(template, build_instruction(q)), bos=True)
        if len(ids) <= budget:
            return ids, True
    return ids[-budget:], True


def evaluate(
    model: Any,
    adapter: str | None,
    problems: Sequence[Problem],
    *,
    template: str = "alpaca",
    encoder: Any = None,
    captions: dict[str, str] | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    progress: bool = False,
    skip_missing_images: bool = False,
) -> list[dict[str, Any]]:
    """Greedy answers for `problems`; one result row per problem (prediction, correctness, groups).

    Prompts longer than the context are shortened (see `fit_prompt`) and flagged `truncated` in the rows.
    `progress` reports to stderr (`llama_adapter.progress`: a bar on a terminal, a line per tenth in a log).
    """
    from llama_adapter.errors import ImageError
    from llama_adapter.multimodal.encoder import load_image

    if model.tokenizer is None:
        raise ScienceQAError("the base has no tokenizer")
    results: list[dict[str, Any]] = []
    bar = Progress(len(problems), "scienceqa", unit="problem", enabled=progress)
    for s in range(0, len(problems), batch_size):
        batch = list(problems[s : s + batch_size])
        fitted = [fit_prompt(model, p, template, (captions or {}).get(p.pid), max_new_tokens) for p in batch]
        prompts = [ids for ids, _ in fitted]
        feats = None
        if encoder is not None:
            feats = torch.zeros(len(batch), encoder.feature_dim)
            with_img = []
            for i, p in enumerate(batch):
                if not p.image:
                    continue
                try:
                    with_img.append((i, load_image(p.image)))
                except ImageError as e:
                    if not skip_missing_images:
                        raise ImageError(
                            f"problem {p.pid}: {e} (set the image folder with --image-root, or --skip-missing-images)"
                        ) from None
            if with_img:
                feats[[i for i, _ in with_img]] = encoder.encode([im for _, im in with_img])
        texts = greedy_generate(model, prompts, adapter, max_new_tokens, feats)
        for p, text, (_, cut) in zip(batch, texts, fitted, strict=True):
            pred = extract_answer(text, p.choices)
            results.append(
                {
                    "pid": p.pid,
                    "prediction": text,
                    "pred_index": pred,
                    "pred_letter": None if pred is None else LETTERS[pred],
                    "answer": p.answer_letter,
                    "correct": pred is not None and pred == p.answer,
                    "groups": p.groups(),
                    "truncated": cut,
                }
            )
        bar.update(len(batch), acc=f"{100.0 * sum(r['correct'] for r in results) / len(results):.2f}")
    bar.close()
    return results


def problems_to_dicts(problems: Iterable[Problem]) -> list[dict[str, Any]]:
    return [asdict(p) for p in problems]
