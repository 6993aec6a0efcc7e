"""The paper's claims reproduced in miniature on CPU with the built-in base -> docs/reproduction.md + figures.

    python benchmarks/reproduce_paper.py            # full: 3 seeds, demo-length runs (<= 1 h on 2 cores)
    python benchmarks/reproduce_paper.py --quick    # shorter runs (< 10 min on 2 cores)

Per seed: zero-init vs rand-init attention (Table 5, Figure 5), the number of adapted layers (Table 4),
the base's loss on held-out pre-training text with a fresh / tuned adapter (knowledge preservation), and
full fine-tuning of all parameters for the same steps (Table 3 analogue). Everything is mean +- std over
seeds; raw numbers go to docs/figures/reproduction_results.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import reproduction_doc  # benchmarks/ (a script's own folder is on sys.path)
import torch

import llama_adapter as la
from llama_adapter.builtin import corpus
from llama_adapter.builtin.demo import DEMO_BATCH, DEMO_LR, DEMO_PROMPT_LENGTH, DEMO_STEPS, demo_train_config, evaluate
from llama_adapter.builtin.pretrain import text_loss
from llama_adapter.training.loop import train
from llama_adapter.training.loss import batch_loss
from llama_adapter.zero_init_attention import Adapter, AdapterConfig

ROOT = Path(__file__).resolve().parents[1]
PAPER = {
    "table5": {"zero-init": 84.04, "rand-init": 40.77},
    # Table 4 (ScienceQA val acc by number of adapted layers); transcribed, check against the paper's PDF
    "table4": [(10, "0.97M", 55.95), (20, "1.37M", 73.36), (30, "1.79M", 83.85)],
    "table3": {
        "adapter": ("1.2M", "4.7M", "1 h"),
        "alpaca_full": ("7B", "13G", "3 h"),
        "lora": ("4.2M", "16.8M", "1.5 h"),
    },
}
HELDOUT_TEXT_SEED = 10_000  # pre-training-distribution text the base never trained on


def ms(xs: list[float], pct: bool = False) -> str:
    f = 100.0 if pct else 1.0
    if len(xs) == 1:
        return f"{xs[0] * f:.2f}"
    return f"{statistics.mean(xs) * f:.2f} ± {statistics.stdev(xs) * f:.2f}"


def full_finetune(records: list[dict], steps: int, seed: int, lr: float = 1e-3) -> dict[str, Any]:
    """All parameters of a fresh copy of the base, same data order granularity, same steps and batch."""
    from llama_adapter.training.data import collate, tokenize_records

    model = la.load_model("builtin", dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(True)
    params = [p for p in model.parameters()]
    n = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.02)
    ex = tokenize_records(model.tokenizer, records, "alpaca", 128)
    g = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(ex), (DEMO_BATCH,), generator=g).tolist()
        w = 0.5 * (1 + math.cos(math.pi * step / steps)) * min(1.0, (step + 1) / max(1, steps // 10))
        for grp in opt.param_groups:
            grp["lr"] = lr * w
        loss, n_sup = batch_loss(model, None, collate([ex[i] for i in idx], model.tokenizer.pad_id))  # type: ignore[arg-type]
        (loss / n_sup).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append({"step": step + 1, "loss": loss.item() / n_sup})
    dt = time.perf_counter() - t0
    model.eval()
    model.freeze_base()
    acc = evaluate(model, corpus.instruction_data("heldout")).accuracy
    enc = lambda s: model.tokenizer.encode(s)  # noqa: E731
    kl = text_loss(model, enc, HELDOUT_TEXT_SEED, corpus.WORLD_SEED)
    storage = sum(p.numel() * 4 for p in params)  # a full fp32 copy of the model
    return {
        "n_trainable": n,
        "storage_bytes": storage,
        "train_time_s": dt,
        "accuracy": acc,
        "heldout_text_loss": kl,
        "metrics": losses,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    base = la.load_model("builtin", dtype=torch.float32)
    nl = base.config.n_layers
    n_base = sum(p.numel() for p in base.parameters())
    held = corpus.instruction_data("heldout")
    enc = lambda s: base.tokenizer.encode(s)  # noqa: E731
    res: dict[str, Any] = {"config": vars(args) | {"n_layers": nl, "n_base": n_base}, "seeds": {}}

    # knowledge preservation, part 1: a fresh zero-init adapter changes nothing
    base_loss = text_loss(base, enc, HELDOUT_TEXT_SEED, corpus.WORLD_SEED)
    base.add_adapter("fresh", AdapterConfig(prompt_length=DEMO_PROMPT_LENGTH, layers=nl))
    fresh_loss = text_loss(base, enc, HELDOUT_TEXT_SEED, corpus.WORLD_SEED, adapter="fresh")
    ids = torch.tensor([base.tokenizer.encode("The capital of", bos=True)])
    with torch.no_grad():
        identical = bool(torch.equal(base(ids), base(ids, adapter="fresh")))
    base.remove_adapter("fresh")
    res["base_text_loss"], res["fresh_adapter_text_loss"], res["fresh_identical_logits"] = (
        base_loss,
        fresh_loss,
        identical,
    )
    res["base_accuracy"] = evaluate(base, held).accuracy
    print(
        f"base: held-out text loss {base_loss:.4f}, with fresh adapter {fresh_loss:.4f}; "
        f"instruction accuracy {res['base_accuracy']:.1%}",
        flush=True,
    )

    settings = [("zero-init", nl), ("rand-init", nl)] + [("zero-init", L) for L in args.layer_settings if L != nl]
    for seed in range(args.seeds):
        recs = corpus.instruction_data("train", seed=seed)
        sres: dict[str, Any] = {}
        for attention, L in settings:
            key = f"{attention}-L{L}"
            with tempfile.TemporaryDirectory() as tmp:
                cfg = demo_train_config(
                    tmp,
                    len(recs),
                    nl,
                    steps=args.steps,
                    seed=seed,
                    layers=L,
                    attention=attention,
                    progress=False,
                    lr=args.rand_lr if attention == "rand-init" else DEMO_LR,
                )
                r = train(cfg, model=base, records=recs)
                size = r.adapter_path.stat().st_size
            acc = evaluate(base, held, adapter=r.adapter_name)
            kl = text_loss(base, enc, HELDOUT_TEXT_SEED, corpus.WORLD_SEED, adapter=r.adapter_name)
            sres[key] = {
                "accuracy": acc.accuracy,
                "per_task": acc.per_task,
                "n_trainable": r.n_trainable,
                "adapter_bytes": size,
                "train_time_s": r.train_time_s,
                "heldout_text_loss": kl,
                "final_loss": r.final_train_loss,
                "metrics": [{"step": m["step"], "loss": m["loss"]} for m in r.metrics],
            }
            print(f"seed {seed} {key}: acc {acc.accuracy:.1%} text loss {kl:.4f} ({r.train_time_s:.0f}s)", flush=True)
        if not args.no_full:
            f = full_finetune(recs, args.steps, seed)
            sres["full"] = f
            print(
                f"seed {seed} full fine-tuning: acc {f['accuracy']:.1%} text loss {f['heldout_text_loss']:.4f} "
                f"({f['train_time_s']:.0f}s)",
                flush=True,
            )
        res["seeds"][str(seed)] = sres
    with torch.device("meta"):
        a7 = Adapter(AdapterConfig(prompt_length=10, layers=30), 32, 4096, 32)
    n7 = sum(p.numel() for p in a7.parameters())
    res["7b"] = {"n_trainable": n7, "bytes_fp32": n7 * 4, "mib_fp32": n7 * 4 / 2**20}
    return res


def collect(res: dict[str, Any], key: str, field: str) -> list[float]:
    return [s[key][field] for s in res["seeds"].values() if key in s]


def figures(res: dict[str, Any], figdir: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figdir.mkdir(parents=True, exist_ok=True)
    nl = res["config"]["n_layers"]
    out = {}
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, color, label in [
        (f"zero-init-L{nl}", "tab:blue", "zero-init attention"),
        (f"rand-init-L{nl}", "tab:red", "rand-init attention"),
    ]:
        for i, s in enumerate(res["seeds"].values()):
            m = s[key]["metrics"]
            ax.plot(
                [x["step"] for x in m],
                [x["loss"] for x in m],
                color=color,
                alpha=0.7,
                lw=1,
                label=label if i == 0 else None,
            )
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title("Figure 5 in miniature: training loss, zero-init vs rand-init (all seeds)")
    ax.legend()
    fig.tight_layout()
    p = figdir / "fig5_loss_curves.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    out["fig5"] = p.name

    Ls = sorted({int(k.split("-L")[1]) for s in res["seeds"].values() for k in s if k.startswith("zero-init-L")})
    fig, ax = plt.subplots(figsize=(5, 3.5))
    accs = [collect(res, f"zero-init-L{L}", "accuracy") for L in Ls]
    ax.bar(
        [str(L) for L in Ls],
        [100 * statistics.mean(a) for a in accs],
        yerr=[100 * (statistics.stdev(a) if len(a) > 1 else 0) for a in accs],
        color="tab:blue",
        capsize=4,
    )
    ax.set_xlabel(f"adapted layers L (of {nl})")
    ax.set_ylabel("held-out exact match (%)")
    ax.set_title("Table 4 in miniature")
    fig.tight_layout()
    p = figdir / "table4_layers.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    out["table4"] = p.name
    return out


def report(res: dict[str, Any], figs: dict[str, str], path: Path, wall: float) -> None:
    nl = res["config"]["n_layers"]
    z, r = f"zero-init-L{nl}", f"rand-init-L{nl}"
    n_seeds = len(res["seeds"])
    za, ra = collect(res, z, "accuracy"), collect(res, r, "accuracy")
    c = res["config"]
    lines = [
        "# The paper's claims in miniature",
        "",
        "Generated by `python benchmarks/reproduce_paper.py"
        + (" --quick" if c["quick"] else "")
        + f" --seeds {c['seeds']} --steps {c['steps']}` in {wall / 60:.1f} min "
        f"on {c['threads']} CPU thread(s) of a shared machine "
        f"({platform.processor() or platform.machine()}, torch {torch.__version__}); raw numbers in "
        "[`figures/reproduction_results.json`](figures/reproduction_results.json).",
        "",
        f"Base: the built-in {c['n_base']:,}-parameter LLaMA ({nl} layers; see "
        "`src/llama_adapter/builtin/base/README.md`), pre-trained on plain-text facts, sums, counting and word "
        "spellings only. Instruction data: `llama_adapter.builtin.corpus.instruction_data` (2,000 Alpaca records "
        "per seed); "
        "evaluation: 200 held-out instructions whose countries, words, numbers and number pairs never occur in the "
        "instruction training data, greedy decoding, exact match of the first line. Every adapter run: "
        f"{c['steps']} steps of batch {DEMO_BATCH}, AdamW, lr {DEMO_LR} (rand-init: {c['rand_lr']}), warm-up 10 % "
        f"then cosine, K = {DEMO_PROMPT_LENGTH} prompts, fp32. {n_seeds} seeds (data order and adapter init); "
        "mean ± std.",
        "",
        "The paper's experiments are LLaMA-7B on ScienceQA / Alpaca-52K on 8 A100s; the numbers here are a "
        "1M-parameter model on a synthetic task, so only the *direction* of each claim can be compared, not "
        "the values.",
        "",
        "## Table 5: zero-init vs rand-init attention",
        "",
        "| attention | paper (ScienceQA val acc, %) | here (held-out exact match, %) | final train loss |",
        "|---|---|---|---|",
        f"| zero-init | {PAPER['table5']['zero-init']} | {ms(za, True)} | {ms(collect(res, z, 'final_loss'))} |",
        f"| rand-init | {PAPER['table5']['rand-init']} | {ms(ra, True)} | {ms(collect(res, r, 'final_loss'))} |",
        f"| base, no adapter | - | {100 * res['base_accuracy']:.2f} | - |",
        "",
        "Per task (held-out exact match %, zero-init / rand-init): "
        + ", ".join(
            f"{t} {_task(res, z, t)} / {_task(res, r, t)}"
            for t in sorted(next(iter(res["seeds"].values()))[z]["per_task"])
        )
        + ".",
        "",
    ]
    gap = statistics.mean(za) - statistics.mean(ra)
    lines += [
        ("**Reproduced in direction**: " if gap > 0.05 else "**Not reproduced here**: ")
        + f"zero-init is {100 * gap:+.1f} points vs rand-init (paper: {84.04 - 40.77:+.2f}).",
        "",
        "## Figure 5: training loss, zero-init vs rand-init",
        "",
        f"![loss curves](figures/{figs['fig5']})",
        "",
        "The paper's Figure 5 shows zero-init starting lower and converging faster. Here (mean over seeds) the "
        f"training loss of the first 10 steps is {_window(res, z, 0)} for zero-init vs {_window(res, r, 0)} for "
        f"rand-init, and of the last 10 steps {_window(res, z, -1)} vs {_window(res, r, -1)}. At step 0 the "
        "zero-init adapter is a no-op (the loss is the base's own), rand-init starts from a disturbed model.",
        "",
        "## Table 4: number of adapted layers",
        "",
        f"| layers L (of {nl}) | trainable params here | held-out exact match here (%) | paper: layers / params / "
        "val acc |",
        "|---|---|---|---|",
    ]
    Ls = sorted({int(k.split("-L")[1]) for s in res["seeds"].values() for k in s if k.startswith("zero-init-L")})
    for i, L in enumerate(Ls):
        p = PAPER["table4"][min(i, 2)] if len(Ls) == 3 else ("", "", "")
        n = collect(res, f"zero-init-L{L}", "n_trainable")[0]
        lines.append(
            f"| {L} | {n:,} | {ms(collect(res, f'zero-init-L{L}', 'accuracy'), True)} | {p[0]} / {p[1]} / {p[2]} |"
        )
    lines += [
        "",
        f"![layers](figures/{figs['table4']})",
        "",
        "Paper: more adapted layers, better accuracy (10 -> 20 -> 30 layers of 32; the paper's column was "
        "transcribed by hand, check it against the paper's Table 4 before quoting it).",
        "",
    ]
    # knowledge preservation
    lines += [
        "## Knowledge preservation",
        "",
        "Loss of the base on held-out pre-training text (same distribution as its corpus, a seed it never saw):",
        "",
        "| model | held-out pre-training text loss |",
        "|---|---|",
        f"| base | {res['base_text_loss']:.4f} |",
        f"| base + fresh zero-init adapter | {res['fresh_adapter_text_loss']:.4f} "
        f"(logits bit-identical: {res['fresh_identical_logits']}) |",
        f"| base + zero-init adapter after tuning | {ms(collect(res, z, 'heldout_text_loss'))} |",
        f"| base + rand-init adapter after tuning | {ms(collect(res, r, 'heldout_text_loss'))} |",
    ]
    if "full" in next(iter(res["seeds"].values())):
        lines.append(f"| full fine-tuning (all parameters) | {ms(collect(res, 'full', 'heldout_text_loss'))} |")
    lines += [
        "",
        "The adapter is applied to the text as well (it is always on once attached): a low loss "
        "means the tuned model still models the pre-training distribution. The paper argues zero-init "
        "preserves the pre-trained knowledge; a fresh zero-init adapter is exactly the base (first two rows).",
        "",
    ]
    # table 3
    zt = collect(res, z, "train_time_s")
    lines += [
        "## Table 3 analogue: efficiency",
        "",
        "| | trainable params | storage | training time | held-out exact match (%) |",
        "|---|---|---|---|---|",
        f"| LLaMA-Adapter here (K={DEMO_PROMPT_LENGTH}, L={nl}) | {collect(res, z, 'n_trainable')[0]:,} | "
        f"{collect(res, z, 'adapter_bytes')[0] / 1024:.1f} KiB | {ms(zt)} s | {ms(za, True)} |",
    ]
    if "full" in next(iter(res["seeds"].values())):
        f = [s["full"] for s in res["seeds"].values()]
        lines.append(
            f"| full fine-tuning here (same steps) | {f[0]['n_trainable']:,} | "
            f"{f[0]['storage_bytes'] / 2**20:.2f} MiB | {ms([x['train_time_s'] for x in f])} s | "
            f"{ms([x['accuracy'] for x in f], True)} |"
        )
    s7 = res["7b"]
    lines += [
        f"| LLaMA-Adapter, 7B config (K=10, L=30), computed | {s7['n_trainable']:,} | {s7['mib_fp32']:.2f} MiB "
        "(fp32) | - | - |",
        "| paper: LLaMA-Adapter 7B | 1.2M | 4.7M | 1 h (8 A100) | - |",
        "| paper: Alpaca full fine-tuning 7B | 7B | 13G | 3 h (8 A100) | - |",
        "| paper: Alpaca-LoRA 7B | 4.2M | 16.8M | 1.5 h | - |",
        "",
    ]
    lines += ["## Where the miniature does not reproduce", ""] + honest_notes(res) + [""]
    lines += [reproduction_doc.parts()]  # the other benchmarks' sections (docs/parts/reproduction_*.md)
    path.write_text("\n".join(lines))


def _task(res: dict[str, Any], key: str, task: str) -> str:
    return f"{100 * statistics.mean(sd[key]['per_task'][task] for sd in res['seeds'].values()):.0f}"


def _window(res: dict[str, Any], key: str, where: int) -> str:
    vals = []
    for sd in res["seeds"].values():
        losses = [m["loss"] for m in sd[key]["metrics"]]
        vals.append(statistics.mean(losses[:10] if where == 0 else losses[-10:]))
    return f"{statistics.mean(vals):.3f}"


def honest_notes(res: dict[str, Any]) -> list[str]:
    nl = res["config"]["n_layers"]
    z, r = f"zero-init-L{nl}", f"rand-init-L{nl}"
    notes = []
    za, ra = statistics.mean(collect(res, z, "accuracy")), statistics.mean(collect(res, r, "accuracy"))
    if za - ra <= 0.05:
        notes.append(
            f"- Table 5: zero-init {100 * za:.1f} % vs rand-init {100 * ra:.1f} %: the gap of the paper "
            "does not appear at this scale and step count."
        )
    Ls = sorted({int(k.split("-L")[1]) for s in res["seeds"].values() for k in s if k.startswith("zero-init-L")})
    accs = [statistics.mean(collect(res, f"zero-init-L{L}", "accuracy")) for L in Ls]
    if any(b < a - 0.02 for a, b in zip(accs, accs[1:], strict=False)):
        notes.append(
            "- Table 4: accuracy is not monotone in the number of adapted layers here ("
            + ", ".join(f"L={L}: {100 * a:.1f} %" for L, a in zip(Ls, accs, strict=True))
            + ")."
        )
    zk = statistics.mean(collect(res, z, "heldout_text_loss"))
    rk = statistics.mean(collect(res, r, "heldout_text_loss"))
    if zk >= rk:
        notes.append(
            f"- Knowledge preservation: after tuning, zero-init's text loss ({zk:.3f}) is not below "
            f"rand-init's ({rk:.3f})."
        )
    if "full" in next(iter(res["seeds"].values())):
        ft = statistics.mean(collect(res, "full", "train_time_s"))
        zt = statistics.mean(collect(res, z, "train_time_s"))
        if ft < 2 * zt:
            notes.append(
                f"- Training time: full fine-tuning takes {ft:.0f} s vs {zt:.0f} s for the adapter. On a "
                "1M-parameter model the forward pass through the frozen base dominates both, so the "
                "paper's 3x wall-clock saving (which comes from optimiser state and gradient "
                "communication of 7B parameters) does not show; the parameter and storage savings do."
            )
    per: dict[str, list[float]] = {}
    for sd in res["seeds"].values():
        for t, a in sd[z]["per_task"].items():
            per.setdefault(t, []).append(a)
    weak = {t: statistics.mean(v) for t, v in per.items() if statistics.mean(v) < 0.5}
    z0, r0, z1, r1 = _window(res, z, 0), _window(res, r, 0), _window(res, z, -1), _window(res, r, -1)
    if float(z0) >= float(r0):
        notes.append(
            f"- Figure 5: zero-init does not start lower here (first 10 steps {z0} vs rand-init {r0}): the "
            "base itself has a high loss on the instruction format and rand-init's prompts move it quickly"
            + (
                f"; zero-init ends lower ({z1} vs {r1} over the last 10 steps)."
                if float(z1) < float(r1)
                else f", and zero-init does not end lower either ({z1} vs {r1})."
            )
        )
    if za < 0.8:
        notes.append(
            f"- Accuracy: the adapted base reaches {100 * za:.1f} % held-out exact match, below the 80 % "
            "this miniature was designed for. Per task: "
            + ", ".join(f"{t} {100 * statistics.mean(v):.0f} %" for t, v in sorted(per.items()))
            + "."
        )
    if weak:
        notes.append(
            "- The numeric tasks (" + ", ".join(sorted(weak)) + ") stay low although the base completes "
            "the same items "
            "(almost) perfectly in plain text (`recipe.json`: 99.5 % on held-out items). A likely "
            "reason, not verified here: the base copies digits with attention tied to the positions of "
            "its pre-training formats "
            '("After 704 comes 705."); the adapter only adds prompt keys/values and does not re-route '
            "that to a number twenty tokens back in the instruction. Entity and word look-ups, which "
            "attend by content, transfer (capital, upper, reverse)."
        )
    if "full" in next(iter(res["seeds"].values())):
        fa = statistics.mean(collect(res, "full", "accuracy"))
        if fa > za + 0.05:
            notes.append(
                f"- Full fine-tuning of all parameters for the same steps is more accurate here "
                f"({100 * fa:.1f} % vs {100 * za:.1f} %); the paper reports the adapter on par with "
                "full fine-tuning (Alpaca) in quality."
            )
    notes.append(
        "- Scale: a 1M-parameter base and synthetic tasks; absolute numbers are not comparable to "
        "LLaMA-7B on ScienceQA/Alpaca. "
        "Real ScienceQA and COCO are not attempted; the multi-modal mechanism is shown on synthetic "
        "images below."
    )
    return notes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter runs (< 10 min on 2 cores)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help=f"steps per run (default {DEMO_STEPS}; quick: 100)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rand-lr", type=float, default=DEMO_LR, help="lr of the rand-init baseline")
    ap.add_argument("--no-full", action="store_true", help="skip the full fine-tuning comparison")
    ap.add_argument("--out", default=str(ROOT / "docs" / "reproduction.md"))
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the report and figures from docs/figures/reproduction_results.json",
    )
    args = ap.parse_args()
    if args.report_only:
        out = Path(args.out)
        figdir = out.parent / "figures"
        res = json.loads((figdir / "reproduction_results.json").read_text())
        report(res, figures(res, figdir), out, res["wall_time_s"])
        print(f"rewrote {out}")
        return
    if args.steps is None:
        args.steps = 100 if args.quick else DEMO_STEPS
    t0 = time.perf_counter()
    res = None
    nl = la.load_config("builtin")[0].n_layers
    args.layer_settings = sorted({max(1, nl // 4), max(1, nl // 2), nl})  # a quarter, half, all
    res = run(args)
    out = Path(args.out)
    figdir = out.parent / "figures"
    figs = figures(res, figdir)
    wall = time.perf_counter() - t0
    res["wall_time_s"] = wall
    (figdir / "reproduction_results.json").write_text(json.dumps(res, indent=1) + "\n")
    report(res, figs, out, wall)
    print(f"wrote {out} and {figdir}/ in {wall / 60:.1f} min")


if __name__ == "__main__":
    main()
