"""SQuAD scoring (v1.1 and v2.0), written from the task's definition.

An answer is compared after the official normalisation: lower case, punctuation removed, the articles "a", "an" and
"the" removed as words, whitespace collapsed. Exact match (EM) is 1 when the normalised prediction equals a
normalised gold answer; F1 is the harmonic mean of precision and recall of the normalised tokens shared with a gold
answer (a bag: a token counts as often as it occurs in both). Each question takes its best score over its gold
answers, and the set's score is the mean in percent.

v2.0 no-answer: a question without gold answers has the single gold answer "" (empty); an empty prediction means
"no answer". When either side normalises to no tokens, F1 is 1 if both do and 0 otherwise (so is EM).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, drop the articles a/an/the, collapse whitespace (in the official order)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def golds(answers: Sequence[str]) -> list[str]:
    """The gold answers a prediction is compared with: [""] for a v2.0 question without answers."""
    kept = [a for a in answers if normalize_answer(a)]
    return kept or [""]


def score(predictions: Mapping[str, str], answers: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """EM and F1 in percent over the questions of `answers` (id -> gold answer texts; [] = unanswerable), with the
    answerable / unanswerable split where both occur. A question without a prediction scores 0."""
    em: dict[str, float] = {}
    f: dict[str, float] = {}
    for qid, gold in answers.items():
        pred = predictions.get(qid)
        refs = golds(gold)
        em[qid] = 0.0 if pred is None else max(exact_match(pred, g) for g in refs)
        f[qid] = 0.0 if pred is None else max(f1(pred, g) for g in refs)
    out: dict[str, float] = {"exact": _mean(em.values()), "f1": _mean(f.values()), "total": float(len(answers))}
    has = [q for q, g in answers.items() if golds(g) != [""]]
    no = [q for q, g in answers.items() if golds(g) == [""]]
    if has and no:
        out |= {"HasAns_exact": _mean(em[q] for q in has), "HasAns_f1": _mean(f[q] for q in has)}
        out |= {"NoAns_exact": _mean(em[q] for q in no), "NoAns_f1": _mean(f[q] for q in no)}
    return out


def _mean(xs: Iterable[float]) -> float:
    vals = list(xs)
    return 100.0 * sum(vals) / len(vals) if vals else 0.0
