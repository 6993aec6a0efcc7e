"""Free-form answers (MusicQA-, VQA-style): BLEU, ROUGE-L, METEOR, BERTScore and VQA accuracy.

Data: a JSONL (or JSON list) file, one question per record. Field names as the common releases spell them:
question `question` / `Question` / `instruction` (or the first human turn of `conversations`); reference answers
`answer` / `Answer` / `output` (a string), or `answers` (strings, or VQA's `[{"answer": ...}, ...]`); inputs
`image`, `audio` (MusicQA's `audio_name` / `Music` too) or `video`, paths relative to `--media-root` (default: the
file's folder); id `id` / `question_id` (default: the line number).

Metrics (x 100, means over questions unless said):
- BLEU: corpus BLEU of `sacrebleu` (every reference of a question counts);
- ROUGE-L: F-measure of `rouge-score` (stemmed), the best reference per question;
- METEOR: pycocoevalcap's (Java), where its resources are present, else left out and said so;
- BERTScore: F1 of `bert-score` with a local model (`--bertscore-model DIR`), where asked for;
- VQA accuracy: the VQA rule on normalised answers: with several references, min(1, matches among the others / 3)
  averaged over leaving each reference out (min(3, n-1) for fewer than 4); with one, exact match.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_adapter.errors import EvalError
from llama_adapter.eval.answering import Item

OPEN_QA_COLUMNS = ("BLEU", "METEOR", "ROUGE-L", "BERTScore", "VQA-acc")
QUESTION_KEYS = ("question", "Question", "instruction")
ANSWER_KEYS = ("answer", "Answer", "output")
MEDIA_KEYS = {"image": ("image",), "audio": ("audio", "audio_name", "Music"), "video": ("video",)}
NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
ARTICLES = {"a", "an", "the"}


@dataclass
class OpenQuestion:
    id: str
    question: str
    answers: list[str]
    inputs: dict[str, str]


def _records(path: Path) -> list[tuple[str, Any]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" or text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except ValueError as e:
            raise EvalError(f"{path}: not JSON ({e})") from None
        if not isinstance(data, list):
            raise EvalError(f"{path}: expected a JSON list of records")
        return [(f"record {i}", r) for i, r in enumerate(data)]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((f"line {n}", json.loads(line)))
            except ValueError as e:
                raise EvalError(f"{path}:{n}: not JSON ({e})") from None
    return out


def _answers(rec: dict[str, Any]) -> list[str] | None:
    if isinstance(rec.get("answers"), list):
        out = [a.get("answer") if isinstance(a, dict) else a for a in rec["answers"]]
        return [a for a in out if isinstance(a, str)] or None
    for k in ANSWER_KEYS:
        if isinstance(rec.get(k), str):
            return [rec[k]]
        if isinstance(rec.get(k), list) and all(isinstance(a, str) for a in rec[k]):
            return list(rec[k]) or None
    conv = rec.get("conversations") or rec.get("conversation")
    if isinstance(conv, list):
        gpt = [t.get("value") for t in conv if isinstance(t, dict) and t.get("from") in ("gpt", "assistant")]
        return [gpt[0]] if gpt and isinstance(gpt[0], str) else None
    return None


def _question(rec: dict[str, Any]) -> str | None:
    for k in QUESTION_KEYS:
        if isinstance(rec.get(k), str):
            return str(rec[k])
    conv = rec.get("conversations") or rec.get("conversation")
    if isinstance(conv, list):
        human = [t.get("value") for t in conv if isinstance(t, dict) and t.get("from") in ("human", "user")]
        if human and isinstance(human[0], str):
            return human[0].replace("<image>", "").replace("<audio>", "").strip()
    return None


def load_open_qa(path: str | os.PathLike[str], media_root: str | os.PathLike[str] | None = None) -> list[OpenQuestion]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise EvalError(f"{p}: question file not found")
    root = Path(media_root).expanduser() if media_root else p.parent
    out = []
    for where, rec in _records(p):
        if not isinstance(rec, dict):
            raise EvalError(f"{p} {where}: not an object")
        q, answers = _question(rec), _answers(rec)
        if q is None:
            raise EvalError(f"{p} {where}: no question (fields {', '.join(QUESTION_KEYS)} or conversations)")
        if answers is None:
            raise EvalError(f"{p} {where}: no reference answer (fields answer, answers, output or conversations)")
        inputs = {}
        for m, keys in MEDIA_KEYS.items():
            v = next((rec[k] for k in keys if isinstance(rec.get(k), str) and rec[k]), None)
            if v is not None:
                inputs[m] = v if v.startswith("data:") or Path(v).is_absolute() else str(root / v)
        rid = rec.get("id", rec.get("question_id", where))
        out.append(OpenQuestion(str(rid), q, answers, inputs))
    if not out:
        raise EvalError(f"{p}: no questions")
    return out


def open_qa_items(questions: Sequence[OpenQuestion]) -> list[Item]:
    return [Item(q.id, q.question, dict(q.inputs)) for q in questions]


def normalize_answer(a: str) -> str:
    """VQA-style normalisation: lower case, punctuation dropped, number words as digits, articles dropped."""
    a = re.sub(r"(?<=\d),(?=\d)", "", a.lower())
    a = re.sub(r"[^\w\s]", " ", a)
    words = [NUMBERS.get(w, w) for w in a.split() if w not in ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """The VQA rule (see the module notes), in [0, 1]."""
    pred = normalize_answer(prediction)
    refs = [normalize_answer(r) for r in references]
    if len(refs) == 1:
        return float(pred == refs[0])
    denom = min(3, len(refs) - 1)
    accs = []
    for i in range(len(refs)):
        others = refs[:i] + refs[i + 1 :]
        accs.append(min(1.0, sum(r == pred for r in others) / denom))
    return sum(accs) / len(accs)


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu); questions with fewer references repeat their last (which changes nothing)."""
    try:
        import sacrebleu
    except ImportError as e:
        raise EvalError(f"BLEU needs sacrebleu: pip install 'llama-adapter[metrics]' ({e})") from None
    n = max(len(r) for r in references)
    streams = [[r[min(i, len(r) - 1)] for r in references] for i in range(n)]
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


def rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    try:
        from rouge_score import rouge_scorer
    except ImportError as e:
        raise EvalError(f"ROUGE-L needs rouge-score: pip install 'llama-adapter[metrics]' ({e})") from None
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    vals = [
        scorer.score_multi(list(refs), pred)["rougeL"].fmeasure
        for pred, refs in zip(predictions, references, strict=True)
    ]
    return 100.0 * sum(vals) / len(vals)


def bertscore(
    predictions: Sequence[str], references: Sequence[Sequence[str]], model_dir: str, num_layers: int | None = None
) -> float:
    """Mean BERTScore F1 (x 100) with a local model directory (no download)."""
    try:
        import bert_score
    except ImportError as e:
        raise EvalError(f"BERTScore needs bert-score: pip install 'llama-adapter[metrics]' ({e})") from None
    d = Path(model_dir).expanduser()
    if not (d / "config.json").is_file():
        raise EvalError(f"{d}: not a local model directory (config.json not found)")
    if num_layers is None:
        num_layers = int(json.loads((d / "config.json").read_text()).get("num_hidden_layers", 1))
    _, _, f1 = bert_score.score(
        list(predictions), [list(r) for r in references], model_type=str(d), num_layers=num_layers, verbose=False
    )
    return 100.0 * float(f1.mean())


def open_qa_scores(
    questions: Sequence[OpenQuestion],
    predictions: Sequence[str],
    *,
    meteor: bool | None = None,
    bertscore_model: str | None = None,
    bertscore_layers: int | None = None,
) -> tuple[dict[str, float | None], list[float], list[str]]:
    """(metrics, per-question VQA accuracies, notes)."""
    from llama_adapter.eval.caption import meteor_available, meteor_score, simple_tokenize

    refs = [q.answers for q in questions]
    preds = [p if p.strip() else "<empty>" for p in predictions]
    out: dict[str, float | None] = dict.fromkeys(OPEN_QA_COLUMNS)
    notes: list[str] = []
    out["BLEU"] = bleu(preds, refs)
    out["ROUGE-L"] = rouge_l(preds, refs)
    ok, why = meteor_available()
    if meteor and not ok:
        raise EvalError(why)
    if meteor is False:
        notes.append("METEOR not computed (--meteor off)")
    elif not ok:
        notes.append(f"METEOR not computed: {why}")
    else:
        gts = {str(i): [simple_tokenize(r) for r in rs] for i, rs in enumerate(refs)}
        res = {str(i): [simple_tokenize(p) or "<empty>"] for i, p in enumerate(preds)}
        out["METEOR"] = 100.0 * meteor_score(gts, res)
    if bertscore_model:
        out["BERTScore"] = bertscore(preds, refs, bertscore_model, bertscore_layers)
    else:
        notes.append("BERTScore not computed (pass --bertscore-model DIR, a local model)")
    vqa = [vqa_accuracy(p, r) for p, r in zip(predictions, refs, strict=True)]
    out["VQA-acc"] = 100.0 * sum(vqa) / len(vqa)
    return out, vqa, notes
