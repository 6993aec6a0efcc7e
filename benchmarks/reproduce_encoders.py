"""Zero-init attention beyond LLaMA, in miniature: ViT, RoBERTa and CLIP pre-trained here, then fine-tuned on a
task each was not pre-trained for with the four methods (zero-init, rand-init, linear-probe, full), 3 seeds each.

    python benchmarks/reproduce_encoders.py --quick     # < 15 min on 2 shared CPU cores

1. pre-train the miniature encoders (`llama_adapter.encoders.miniature`): a ViT on drawn shapes (shape x colour),
   a RoBERTa by masked LM on the built-in corpus, a CLIP on drawn shapes vs captions (4 colour-shape pairs unseen);
2. write the downstream sets: counting shapes (ViT), extractive QA over corpus facts with no-answer questions
   (RoBERTa, SQuAD v2.0 format), base-to-novel classification in a new drawing style (CLIP);
3. fine-tune every (task, method, seed) with `encoders.train.finetune` -- the code `llama-adapter encoder finetune`
   runs -- and score it on the held-out test set;
4. write docs/figures/encoders_results.json and docs/figures/encoders_curves.png (training loss of zero-init vs
   rand-init, mean over seeds), and print the tables in markdown.
Every number printed is measured in this run; nothing is copied from the paper.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from llama_adapter.encoders import miniature
from llama_adapter.encoders.heads import METHODS, TaskModel
from llama_adapter.encoders.train import EncoderTrainConfig, finetune, load_encoder, prepare, score_model

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "docs" / "figures"
SEEDS = (0, 1, 2)

# (pre-trained encoder, dataset, finetune options, metrics shown)
EXPERIMENTS: dict[str, dict[str, Any]] = {
    "vit-counting": {
        "encoder": "vit",
        "dataset": "counting",
        "cfg": dict(task="image-classification", epochs=16, batch_size=32),
        "lr": {"zero-init": 3e-2, "rand-init": 3e-2, "linear-probe": 3e-2, "full": 1e-3},
        "metrics": ["accuracy"],
    },
    "roberta-fact-qa": {
        "encoder": "roberta",
        "dataset": "fact-qa",
        "cfg": dict(task="question-answering", epochs=12, batch_size=32, max_length=48),
        "lr": {"zero-init": 3e-2, "rand-init": 3e-2, "linear-probe": 3e-2, "full": 1e-3},
        "metrics": ["exact", "f1"],
    },
    "clip-base-novel": {
        "encoder": "clip",
        "dataset": "base-novel",
        "cfg": dict(task="clip", epochs=40, batch_size=32, max_length=16, class_template="a photo of a {}."),
        "lr": {"zero-init": 5e-2, "rand-init": 5e-2, "linear-probe": 5e-2, "full": 1e-3},
        "metrics": ["base_accuracy", "novel_accuracy", "hm"],
    },
}
DATA_FILES = {
    "counting": ("train", "test"),
    "fact-qa": ("train.json", "test.json"),
    "base-novel": ("train", "test"),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pretrain_all(work: Path, scale: float) -> dict[str, Any]:
    stats = {}
    for name, fn in miniature.PRETRAIN.items():
        out = work / "models" / name
        recipe = miniature.RECIPES[name]
        recipe = replace(recipe, steps=max(1, round(recipe.steps * scale)))
        log(f"[pretrain] {name}: {recipe}")
        stats[name] = fn(out, recipe, lambda s, name=name: log(f"[pretrain {name}] {s}"))
    return stats


def make_data(work: Path) -> dict[str, tuple[Path, Path]]:
    paths = {}
    for name, fn in miniature.DATASETS.items():
        out = work / "data" / name
        if not out.exists():
            fn(out)
        tr, te = DATA_FILES[name]
        paths[name] = (out / tr, out / te)
    return paths


def zero_shot_clip(model_dir: Path, test: Path, exp: dict[str, Any]) -> dict[str, Any]:
    """The untrained zero-init model, which is the pre-trained CLIP itself (zero gates): its base/novel scores."""
    cfg = EncoderTrainConfig(model=str(model_dir), eval_data=str(test), out="-", **exp["cfg"])
    enc = load_encoder(model_dir)
    model = TaskModel(enc, "clip", "zero-init")
    data = prepare("clip", str(test), str(model_dir), enc, cfg)
    return score_model(model, data, _base_classes(), cfg)


def _base_classes() -> list[str]:
    return [f"{c} {s}" for c, s in miniature.CLIP_BASE]


def mean_std(xs: list[float]) -> str:
    if not xs:
        return "-"
    m = statistics.fmean(xs)
    s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{m:.1f} ± {s:.1f}"


def plot_curves(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6))
    for ax, (name, res) in zip(axes, results.items(), strict=True):
        for method, colour in (("zero-init", "tab:blue"), ("rand-init", "tab:red")):
            curves = [r["curve"] for r in res["runs"] if r["method"] == method]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            mean = [statistics.fmean(c[i] for c in curves) for i in range(n)]
            for c in curves:
                ax.plot(range(1, len(c) + 1), c, color=colour, alpha=0.2, lw=0.8)
            ax.plot(range(1, n + 1), mean, color=colour, lw=2, label=f"{method} (mean of {len(curves)})")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def tables(results: dict[str, Any]) -> str:
    lines = []
    for name, res in results.items():
        metrics = EXPERIMENTS[name]["metrics"]
        lines.append(f"\n#### {name} ({res['description']})\n")
        lines.append("| method | " + " | ".join(metrics) + " | trainable params | train time (s) |")
        lines.append("|---|" + "---|" * (len(metrics) + 2))
        if "zero_shot" in res:
            zs = res["zero_shot"]
            lines.append(
                "| zero-shot (no training) | " + " | ".join(f"{zs.get(m, 0):.1f}" for m in metrics) + " | 0 | 0 |"
            )
        for method in METHODS:
            runs = [r for r in res["runs"] if r["method"] == method]
            cells = [mean_std([r["eval"][m] for r in runs if m in r["eval"]]) for m in metrics]
            params = runs[0]["trainable_params"] if runs else 0
            t = mean_std([r["train_time_s"] for r in runs])
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {params:,} | {t} |")
    return "\n".join(lines)


DESCRIPTIONS = {
    "vit-counting": "ViT pre-trained on shape x colour, fine-tuned to count 1-4 shapes; test accuracy %",
    "roberta-fact-qa": "RoBERTa pre-trained by MLM on the corpus, fine-tuned for SQuAD-v2 QA over its facts; EM / F1 %",
    "clip-base-novel": "CLIP, prompts trained on 8 base classes (16 shots) in a new style; accuracy % on base, novel "
    "and their harmonic mean",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the miniature sizes (default: twice the steps)")
    ap.add_argument("--work", default="/tmp/llama-adapter-encoders", help="models, data and runs go here")
    ap.add_argument("--out-dir", default=str(FIGURES), help="results JSON and curve plot (default: docs/figures)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest on a busy machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    scale = 1.0 if args.quick else 2.0
    work = Path(args.work)
    t_start = time.perf_counter()
    pre = pretrain_all(work, scale)
    data = make_data(work)
    results: dict[str, Any] = {}
    for name, exp in EXPERIMENTS.items():
        model_dir = work / "models" / exp["encoder"]
        train, test = data[exp["dataset"]]
        res: dict[str, Any] = {"description": DESCRIPTIONS[name], "runs": []}
        if exp["encoder"] == "clip":
            res["zero_shot"] = zero_shot_clip(model_dir, test, exp)
        # the data are read once per experiment (images decoded once), then shared by its 12 runs
        probe = EncoderTrainConfig(model=str(model_dir), out="-", **exp["cfg"])
        enc = load_encoder(model_dir)
        sets = (
            prepare(probe.task, str(train), str(model_dir), enc, probe),
            prepare(probe.task, str(test), str(model_dir), enc, probe),
        )
        for method in METHODS:
            for seed in SEEDS:
                opts = dict(exp["cfg"])
                opts["epochs"] = opts["epochs"] * scale
                cfg = EncoderTrainConfig(
                    model=str(model_dir),
                    data=str(train),
                    eval_data=str(test),
                    out=str(work / "runs" / name / f"{method}-{seed}"),
                    method=method,
                    seed=seed,
                    lr=exp["lr"][method],
                    overwrite=True,
                    progress=False,
                    **opts,
                )
                r = finetune(cfg, log=lambda s: None, prepared=sets)
                lines = (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()
                curve = [json.loads(x)["loss"] for x in lines if '"loss"' in x]
                res["runs"].append(
                    {
                        "method": method,
                        "seed": seed,
                        "eval": r["eval"],
                        "trainable_params": r["trainable_params"],
                        "train_time_s": r["train_time_s"],
                        "steps": r["steps"],
                        "curve": curve,
                    }
                )
                shown = ", ".join(f"{k} {v:.1f}" for k, v in r["eval"].items() if k in exp["metrics"])
                log(f"[{name}] {method} seed {seed}: {shown} ({r['train_time_s']:.1f} s)")
        results[name] = res
    wall = time.perf_counter() - t_start
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": "python benchmarks/reproduce_encoders.py" + (" --quick" if args.quick else ""),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "wall_time_s": round(wall, 1),
        "machine": f"{platform.machine()}, torch {torch.__version__}, {args.threads} torch thread(s)",
        "seeds": list(SEEDS),
        "pretraining": pre,
    }
    (out_dir / "encoders_results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    plot_curves(results, out_dir / "encoders_curves.png")
    print(f"Encoders in miniature ({meta['command']}, {meta['date']}, wall time {wall / 60:.1f} min)")
    print("\nPre-training:")
    for name, st in pre.items():
        extra = f", probe accuracy {100 * st['probe_accuracy']:.0f} %" if "probe_accuracy" in st else ""
        print(f"- {name}: {st['steps']} steps, final loss {st['final_loss']:.3f}{extra}, {st['time_s']:.0f} s")
    print(tables(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
