"""`llama-adapter demo`: the method end to end on the built-in base, in a few minutes on a laptop CPU.

Loads the built-in base, shows that it does not follow Alpaca-style instructions about things it knows,
instruction-tunes a zero-init attention adapter on the built-in instruction set, and shows that the adapted
model answers the same held-out instructions (items never seen in the adapter's training data).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llama_adapter.builtin import corpus
from llama_adapter.model import Transformer
from llama_adapter.templates import format_prompt

# Demo fine-tuning recipe (tuned for speed on 2 CPU cores; the paper's recipe is 5 epochs of 52K).
DEMO_STEPS = 600
DEMO_BATCH = 32
DEMO_LR = 0.2
DEMO_PROMPT_LENGTH = 20
DEMO_LAYERS: int | None = None  # None -> all layers of the base
DEMO_TRAIN_PER_TASK = 400
SHOW = 6  # held-out instructions printed before/after


def first_line(text: str) -> str:
    return text.strip().split("\n")[0].strip()


def exact_match(completion: str, output: str) -> bool:
    """Exact match of the completion's first line, stripped, against the reference output."""
    return first_line(completion) == output.strip()


@dataclass
class EvalResult:
    accuracy: float
    per_task: dict[str, float]
    completions: list[str] = field(default_factory=list)


def evaluate(
    model: Transformer,
    records: Sequence[dict[str, str]],
    adapter: str | None = None,
    template: str = "alpaca",
    max_new_tokens: int = 8,
    batch_size: int = 64,
) -> EvalResult:
    """Greedy answers to `records` and exact-match accuracy (overall and per task)."""
    from llama_adapter.inference.generate import generate

    prompts = [format_prompt(template, r["instruction"], r.get("input", "")) for r in records]
    outs = generate(
        model,
        prompts,
        adapter=adapter,
        max_new_tokens=max_new_tokens,
        temperature=0.0,
        stop=["\n"],
        max_batch_size=batch_size,
    )
    hits = [exact_match(o, r["output"]) for o, r in zip(outs, records, strict=True)]
    per: dict[str, list[bool]] = {}
    for h, r in zip(hits, records, strict=True):
        per.setdefault(r.get("task", "all"), []).append(h)
    return EvalResult(sum(hits) / max(1, len(hits)), {t: sum(v) / len(v) for t, v in sorted(per.items())}, outs)


def demo_train_config(
    out: str | Path,
    n_train: int,
    n_layers: int,
    steps: int = DEMO_STEPS,
    seed: int = 0,
    lr: float = DEMO_LR,
    batch_size: int = DEMO_BATCH,
    prompt_length: int = DEMO_PROMPT_LENGTH,
    layers: int | None = DEMO_LAYERS,
    attention: str = "zero-init",
    progress: bool = True,
    dtype: str = "fp32",
    base: str = "builtin",
    overwrite: bool = False,
) -> Any:
    """The TrainConfig of the demo: `steps` optimiser steps, linear warm-up over the first 10 %, cosine to 0.

    `recipes/builtin-adapter.yaml` is this recipe for `llama-adapter finetune` (a test keeps the two equal).
    """
    from llama_adapter.training.config import TrainConfig

    epochs = steps * batch_size / n_train
    return TrainConfig(
        base=base,
        data=[],
        out=str(out),
        epochs=epochs,
        warmup_epochs=0.1 * epochs,
        batch_size=batch_size,
        micro_batch=batch_size,
        lr=lr,
        prompt_length=prompt_length,
        layers=layers if layers is not None else n_layers,
        gate="tanh",
        attention=attention,
        dtype=dtype,
        seed=seed,
        max_length=128,
        template="alpaca",
        progress=progress,
        max_steps=steps,
        overwrite=overwrite,
    )


def write_instruction_data(out: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """The demo's data as files for `llama-adapter finetune`: (train.jsonl, heldout.jsonl) in `out`.

    The same records the demo trains and scores on (`corpus.instruction_data`), so the command line can repeat
    the demo with `--config recipes/builtin-adapter.yaml`.
    """
    import json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "train.jsonl", out / "heldout.jsonl"
    splits = (
        corpus.instruction_data("train", seed=seed, n_per_task=DEMO_TRAIN_PER_TASK),
        corpus.instruction_data("heldout"),
    )
    for path, recs in zip(paths, splits, strict=True):
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return paths


def _size(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.2f} MiB"


def _show(records: Sequence[dict[str, str]], outs: Sequence[str], say: Callable[[str], None]) -> None:
    for r, o in zip(records, outs, strict=True):
        mark = "ok " if exact_match(o, r["output"]) else "   "
        ans = first_line(o) or "(nothing)"
        say(f"  {mark} {r['instruction']:<44} -> {ans[:40]!r}   (expected {r['output'].strip()!r})")


def run_demo(
    out: str | Path = "runs/demo",
    seed: int = 0,
    steps: int = DEMO_STEPS,
    threads: int | None = None,
    say: Callable[[str], None] = print,
    base: str | Path = "builtin",
    progress: bool = True,
) -> dict[str, Any]:
    """The demo; its training files go to `out`, replacing an earlier demo's (running it twice just works)."""
    from llama_adapter.loading import load_model
    from llama_adapter.training.loop import train

    t_start = time.perf_counter()
    threads = threads or min(4, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out = Path(out)
    say(f"== LLaMA-Adapter demo ({threads} CPU threads) ==")
    model = load_model(base, dtype=torch.float32)
    c = model.config
    n_base = sum(p.numel() for p in model.parameters())
    label = "built-in" if str(base) == "builtin" else str(base)
    say(f"base: {label} {n_base:,}-parameter LLaMA ({c.n_layers} layers, dim {c.dim}), {model.source}")
    say("  it was pre-trained on plain text only (facts, sums, counting, word spellings), never on instructions")

    train_recs = corpus.instruction_data("train", seed=seed, n_per_task=DEMO_TRAIN_PER_TASK)
    held = corpus.instruction_data("heldout")
    shown = _pick_shown(held)
    say(
        f"data: {len(train_recs)} training instructions; {len(held)} held-out instructions about countries, "
        "words and numbers the adapter never sees in training"
    )

    say("\n-- the base model, Alpaca template, held-out instructions --")
    before = evaluate(model, held)
    _show([held[i] for i in shown], [before.completions[i] for i in shown], say)

    say(f"\n-- fine-tuning a zero-init attention adapter ({steps} steps) --")
    cfg = demo_train_config(
        out, len(train_recs), c.n_layers, steps=steps, seed=seed, base=str(base), progress=progress, overwrite=True
    )
    res = train(cfg, model=model, records=train_recs)
    name = res.adapter_name

    say("\n-- the adapted model, same instructions --")
    after = evaluate(model, held, adapter=name)
    _show([held[i] for i in shown], [after.completions[i] for i in shown], say)

    size = res.adapter_path.stat().st_size
    plot = res.out_dir / "loss.png"
    total = time.perf_counter() - t_start
    say("\n-- results --")
    say(f"held-out exact match   base {before.accuracy:6.1%}   ->   adapted {after.accuracy:6.1%}")
    for t in after.per_task:
        say(f"  {t:<10} base {before.per_task.get(t, 0):6.1%}   adapted {after.per_task[t]:6.1%}")
    say(
        f"trainable parameters   {res.n_trainable:,} ({res.n_trainable / n_base:.2%} of the base's {n_base:,}); "
        f"K={cfg.prompt_length} prompts x L={cfg.layers} layers"
    )
    say(f"adapter file           {res.adapter_path} ({_size(size)})")
    say(f"loss plot              {plot}")
    say(f"time                   fine-tuning {res.train_time_s:.0f} s, whole demo {total:.0f} s")
    say(
        f"next: llama-adapter generate --base {base} --adapter {res.adapter_path} "
        "'What is the capital of ...?' --temperature 0"
    )
    return {
        "before": before.accuracy,
        "after": after.accuracy,
        "before_per_task": before.per_task,
        "after_per_task": after.per_task,
        "n_trainable": res.n_trainable,
        "adapter_bytes": size,
        "adapter_path": str(res.adapter_path),
        "loss_plot": str(plot),
        "train_time_s": res.train_time_s,
        "total_time_s": total,
        "final_train_loss": res.final_train_loss,
    }


def _pick_shown(held: Sequence[dict[str, str]]) -> list[int]:
    """One held-out instruction per task, then more, up to SHOW."""
    picked: list[int] = []
    seen: set[str] = set()
    for i, r in enumerate(held):
        if r["task"] not in seen:
            seen.add(r["task"])
            picked.append(i)
    for i in range(len(held)):
        if len(picked) >= SHOW:
            break
        if i not in picked:
            picked.append(i)
    return picked[:SHOW]


__all__ = ["EvalResult", "demo_train_config", "evaluate", "exact_match", "run_demo", "write_instruction_data"]
