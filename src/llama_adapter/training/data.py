"""Alpaca-format instruction data: loading, validation, tokenisation and length-grouped batching.

Accepted inputs: a JSON list of records, a JSONL file (one record per line), or a directory of such files
(`*.json`, `*.jsonl`, sorted by name). A record is `{"instruction": str, "input": str (optional),
"output": str}`; the self-instruct shape `{"instruction", "instances": [{"input", "output"}, ...]}` is
flattened into one record per instance. An optional `"image"` string (a relative path, for multi-modal
adapters) is allowed; any other field is kept untouched.

Sequence = BOS + prompt + output + EOS, truncated to `max_length`; the loss covers output + EOS only
(labels of the prompt are `IGNORE_INDEX` = -100, never a real token id).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llama_adapter.errors import DataError
from llama_adapter.templates import format_prompt

IGNORE_INDEX = -100
TEXT_FIELDS = ("instruction", "input", "output")
OPTIONAL_STRING_FIELDS = ("input", "image")


# ---- loading and validation -----------------------------------------------------------------------------
@dataclass
class LoadReport:
    files: list[str] = field(default_factory=list)
    n_records: int = 0
    n_skipped: int = 0
    problems: list[str] = field(default_factory=list)  # first few skipped-record messages


def _data_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".json", ".jsonl"))
        if not files:
            raise DataError(f"{path}: directory has no .json or .jsonl files")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file not found")
    return [path]


def _parse_file(path: Path) -> list[tuple[str, Any]]:
    """(location label, raw record) pairs; raises DataError for a file that is neither JSON nor JSONL."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    if not text.strip():
        return []
    if path.suffix != ".jsonl":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as e:
            if text.lstrip().startswith("["):
                raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        else:
            if isinstance(whole, list):
                return [(f"record {i + 1}", r) for i, r in enumerate(whole)]
            return [("record 1", whole)]
    out: list[tuple[str, Any]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((f"record {len(out) + 1} (line {n})", json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}: line {n} is not valid JSON ({e.msg}); expected a JSON list or JSONL (one object per line)"
            ) from None
    return out


def _check_record(rec: Any) -> str | None:
    """The problem with one flat record, or None."""
    if not isinstance(rec, dict):
        return f"is a {type(rec).__name__}, not an object"
    for key in ("instruction", "output"):
        if key not in rec:
            return f"field {key!r} is missing"
    for key in TEXT_FIELDS + OPTIONAL_STRING_FIELDS:
        v = rec.get(key)
        if key in rec and not isinstance(v, str) and not (v is None and key in OPTIONAL_STRING_FIELDS):
            return f"field {key!r} is a {type(v).__name__}, not a string"
    return None


def _accept(raw: Any, where: str, skip_invalid: bool, report: LoadReport, out: list[dict[str, Any]]) -> None:
    flat = _flatten(raw)
    problems = [flat] if isinstance(flat, str) else [_check_record(r) for r in flat]
    bad = next((x for x in problems if x), None)
    if bad:
        msg = f"{where}: {bad}"
        if not skip_invalid:
            raise DataError(msg + " (--skip-invalid skips such records)")
        report.n_skipped += 1
        if len(report.problems) < 5:
            report.problems.append(msg)
        return
    assert not isinstance(flat, str)
    for r in flat:
        r = dict(r)
        r["input"] = r.get("input") or ""
        out.append(r)


def _flatten(rec: Any) -> list[Any] | str:
    """Expand the self-instruct `instances` shape and convert LLaVA `conversations` records; returns a problem
    string for a malformed one."""
    if isinstance(rec, dict) and "conversations" in rec and "instruction" not in rec:
        from llama_adapter.multimodal.features import llava_to_alpaca

        try:
            return [llava_to_alpaca(rec)]
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            return f"LLaVA record: {e}"
    if not isinstance(rec, dict) or "instances" not in rec or "output" in rec:
        return [rec]
    inst = rec["instances"]
    if not isinstance(inst, list) or not inst:
        return "field 'instances' is not a non-empty list"
    base = {k: v for k, v in rec.items() if k != "instances"}
    out = []
    for j, x in enumerate(inst):
        if not isinstance(x, dict):
            return f"instances[{j}] is a {type(x).__name__}, not an object"
        out.append({**base, **x})
    return out


def load_records(
    paths: str | Path | Sequence[str | Path], skip_invalid: bool = False, report: LoadReport | None = None
) -> list[dict[str, Any]]:
    """Read and validate Alpaca records from files/directories. Unknown fields are kept.

    With `skip_invalid`, bad records are skipped and counted in `report.n_skipped`; otherwise the first
    bad record raises DataError naming the file, record number and field.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    report = report if report is not None else LoadReport()
    records: list[dict[str, Any]] = []
    for p in paths:
        for f in _data_files(Path(p)):
            report.files.append(str(f))
            for where, raw in _parse_file(f):
                n = len(records)
                _accept(raw, f"{f}: {where}", skip_invalid, report, records)
                for r in records[n:]:  # relative image paths resolve against their own file's folder
                    r.setdefault("_dir", str(f.parent))
    report.n_records = len(records)
    return records


def validate_records(
    records: Iterable[Any], skip_invalid: bool = False, source: str = "records", report: LoadReport | None = None
) -> list[dict[str, Any]]:
    """The same checks for in-memory records (e.g. passed to `train(records=...)`)."""
    report = report if report is not None else LoadReport()
    out: list[dict[str, Any]] = []
    for i, raw in enumerate(records):
        _accept(raw, f"{source}: record {i + 1}", skip_invalid, report, out)
    report.n_records = len(out)
    return out


def split_validation(
    records: list[dict[str, Any]], fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Deterministic (seeded) hold-out of round(fraction * n) records, at least one when fraction > 0."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), not {fraction}")
    if fraction == 0.0:
        return records, []
    n_val = max(1, round(fraction * len(records)))
    if n_val >= len(records):
        raise DataError(f"--val-fraction {fraction} leaves no training records out of {len(records)}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    return ([r for i, r in enumerate(records) if i not in val_idx], [r for i, r in enumerate(records) if i in val_idx])


# ---- tokenisation ---------------------------------------------------------------------------------------
@dataclass
class Example:
    ids: list[int]  # BOS + prompt + output + EOS (truncated)
    n_prompt: int  # tokens before the first supervised one (BOS + prompt)
    truncated: bool = False
    image_features: Tensor | None = None

    @property
    def n_supervised(self) -> int:
        return len(self.ids) - self.n_prompt


@dataclass
class TokenizeReport:
    n_examples: int = 0
    n_truncated: int = 0
    n_dropped: int = 0  # prompt alone fills max_length: nothing left to learn from
    n_tokens: int = 0
    n_supervised: int = 0


def encode_record(tokenizer: Any, rec: dict[str, Any], template: str, max_length: int) -> Example:
    """Tokenise one record. The prompt and prompt+output are encoded jointly and the first
    len(BOS + encode(prompt)) tokens masked, the usual approach; if the joint encoding does not start with
    the prompt's tokens (a merge across the boundary), prompt and output are encoded separately so the
    label boundary stays exact and the prompt tokens match what generation feeds the model."""
    prompt = format_prompt(template, rec["instruction"], rec.get("input") or "")
    p_ids = tokenizer.encode(prompt, bos=True, eos=False)
    full = tokenizer.encode(prompt + rec["output"], bos=True, eos=True)
    if full[: len(p_ids)] != p_ids:
        full = p_ids + tokenizer.encode(rec["output"], bos=False, eos=True)
    truncated = len(full) > max_length
    return Example(full[:max_length], min(len(p_ids), max_length), truncated, rec.get("image_features"))


def tokenize_records(
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    template: str,
    max_length: int,
    report: TokenizeReport | None = None,
) -> list[Example]:
    report = report if report is not None else TokenizeReport()
    out = []
    for rec in records:
        ex = encode_record(tokenizer, rec, template, max_length)
        report.n_truncated += ex.truncated
        if ex.n_supervised <= 0:
            report.n_dropped += 1
            continue
        report.n_tokens += len(ex.ids)
        report.n_supervised += ex.n_supervised
        out.append(ex)
    report.n_examples = len(out)
    return out


# ---- batching -------------------------------------------------------------------------------------------
def steps_per_epoch(n_examples: int, batch_size: int) -> int:
    return max(1, math.ceil(n_examples / batch_size))


def epoch_plan(
    lengths: Sequence[int], batch_size: int, micro_batch: int, seed: int, epoch: int
) -> list[list[list[int]]]:
    """The steps of one epoch: each a list of micro-batches (lists of example indices).

    Examples are shuffled (seeded by seed and epoch, so a resumed run sees the same order), cut into
    steps of `batch_size`, and within each step sorted by length before being cut into micro-batches:
    rows of similar length share a micro-batch (little padding) while every step's set of examples is
    the same as with plain shuffling, so the gradient is unchanged.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    plan = []
    for s in range(0, len(order), batch_size):
        step = sorted(order[s : s + batch_size], key=lambda i: (-lengths[i], i))
        plan.append([step[m : m + micro_batch] for m in range(0, len(step), micro_batch)])
    return plan


def collate(examples: Sequence[Example], pad_id: int, pad_to_multiple: int = 1) -> dict[str, Tensor]:
    """Right-padded `input_ids` [B, T] and `labels` [B, T] (IGNORE_INDEX on prompt and padding).

    `image_features` [B, F] is added when any example has features (zero rows for those without).
    Right padding needs no attention mask: under the causal mask real tokens never see the padding.
    """
    T = max(len(e.ids) for e in examples)
    T = -(-T // pad_to_multiple) * pad_to_multiple
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        t = torch.tensor(e.ids, dtype=torch.long)
        ids[i, : len(t)] = t
        labels[i, e.n_prompt : len(t)] = t[e.n_prompt :]
    batch = {"input_ids": ids, "labels": labels}
    feats = [e.image_features for e in examples]
    if any(f is not None for f in feats):
        ref = next(f for f in feats if f is not None)
        assert ref is not None
        rows = [f.float().reshape(-1) if f is not None else torch.zeros(ref.numel()) for f in feats]
        batch["image_features"] = torch.stack(rows)
    return batch
