"""Greedy answers to benchmark questions that may come with an image, an audio clip or a video.

The benchmarks (`caption`, `mme`, `open_qa`) differ in what they read and how they score; asking the model is the
same for all of them: the question in the adapter's template, the inputs through the adapter's own encoders
(`multimodal.modalities.AdapterEncoders`), greedy decoding in batches, one answer per item.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llama_adapter.errors import MediaError
from llama_adapter.progress import Progress


@dataclass
class Item:
    """One question: its id, the text, and its inputs ({modality: path or data URL})."""

    id: str
    question: str
    inputs: dict[str, str] = field(default_factory=dict)


def fit_ids(model: Any, text: str, template: str, max_new_tokens: int) -> tuple[list[int], bool]:
    """BOS + the templated question, cut from the start to leave room for the answer; (ids, whether cut)."""
    from llama_adapter.templates import format_prompt

    ids = model.tokenizer.encode(format_prompt(template, text), bos=True)
    budget = int(model.config.max_seq_len) - max_new_tokens
    return (ids, False) if len(ids) <= budget else (ids[-budget:], True)


def answer_items(
    model: Any,
    adapter: str | None,
    items: Sequence[Item],
    *,
    template: str = "alpaca",
    encoders: Any = None,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    progress: bool = False,
    label: str = "eval",
    stop: Sequence[str] = ("\n",),
) -> list[str]:
    """Greedy answers, one per item. `encoders` (an `AdapterEncoders`, None to ignore the inputs) turns an item's
    inputs into the adapter's condition vector; an unreadable input is a `MediaError` naming the item."""
    from llama_adapter.inference.generate import generate

    a = model.adapters[adapter] if adapter is not None else None
    use_media = encoders is not None and a is not None and a.visual_proj is not None
    out: list[str] = []
    bar = Progress(len(items), label, unit="question", enabled=progress)
    for s in range(0, len(items), batch_size):
        batch = list(items[s : s + batch_size])
        prompts = [fit_ids(model, it.question, template, max_new_tokens)[0] for it in batch]
        feats = None
        if use_media and any(it.inputs for it in batch):
            rows = []
            for it in batch:
                try:
                    rows.append(encoders.features(a, it.inputs) if it.inputs else None)
                except MediaError as e:
                    raise type(e)(f"item {it.id}: {e}") from None
            width = next(r.shape[-1] for r in rows if r is not None)
            feats = torch.cat([r if r is not None else torch.zeros(1, width) for r in rows])
        texts = generate(
            model,
            prompts,
            adapter=adapter,
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            image_features=feats,
            stop=list(stop),
        )
        out.extend(t.strip() for t in texts)
        bar.update(len(batch))
    bar.close()
    return out


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> Path:
    """Rows as JSON lines, written atomically (temp file + rename)."""
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with tmp.open("w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(p)
    return p


def predictions_path(benchmark: str, label: str) -> Path:
    """Where predictions go without --out: under runs/ (git-ignored), never loose in the working directory."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("._") or "base"
    return Path("runs") / "eval" / f"{benchmark}-{safe}.jsonl"


def format_metric_table(rows: dict[str, dict[str, float | None]], columns: Sequence[str], digits: int = 2) -> str:
    """A fixed-width table: one row per model, one column per metric ('-' where a metric was not computed)."""
    width = max([len("Method"), *(len(n) for n in rows)]) + 2
    cw = max(9, *(len(c) + 2 for c in columns))
    lines = ["Method".ljust(width) + "".join(c.rjust(cw) for c in columns)]
    for name, vals in rows.items():
        cells = ["-".rjust(cw) if vals.get(c) is None else f"{vals[c]:{cw}.{digits}f}" for c in columns]
        lines.append(name.ljust(width) + "".join(cells))
    return "\n".join(lines)
