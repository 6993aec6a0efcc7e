"""CPU demonstration of the multi-modal adapter (paper sec. 3.3 / Table 2) on synthetic visual questions.

A ScienceQA-format set of coloured shapes drawn with PIL (`llama_adapter.builtin.shapes`): every question ("What
colour is the shape?", "Which shape is shown?") is answerable only from the image. Two adapters are trained on
the same records with the same settings: a text-only one, and an image-conditioned one whose projection maps
features of a small, frozen, randomly initialised CLIP-architecture vision tower to the image token. Both are
evaluated by greedy decoding + answer extraction on held-out images, and reported in the layout of the paper's
Table 2 next to its text-only (78.31) and image-conditioned (85.19) LLaMA-Adapter rows.

    python benchmarks/multimodal_demo.py --out runs/multimodal_demo

Uses the built-in base when it is installed, else a tiny random checkpoint (tests/tiny.py); the base used is
printed and recorded in results.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def make_encoder(path: Path, image_size: int, seed: int) -> Path:
    """A small CLIP-architecture vision tower, random init (frozen: only the projection learns)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=8,
        projection_dim=32,
    )
    torch.manual_seed(seed)
    CLIPVisionModelWithProjection(cfg).eval().save_pretrained(path)
    pre = {
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "do_convert_rgb": True,
        "image_processor_type": "CLIPImageProcessor",
    }
    (path / "preprocessor_config.json").write_text(json.dumps(pre, indent=1))
    return path


def resolve_base(arg: str, out: Path) -> tuple[str, str]:
    """(path, label): the requested base; 'builtin' falls back to a tiny random base when not installed."""
    from llama_adapter import load_config
    from llama_adapter.config import CheckpointError

    if arg != "tiny":
        try:
            load_config(arg)
            return arg, arg
        except CheckpointError as e:
            if arg != "builtin":
                raise
            print(f"note: {e}; using a tiny random base instead", file=sys.stderr)
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import make_checkpoint  # type: ignore[import-not-found]

    path = out / "tiny_base"
    if not (path / "config.json").is_file():
        make_checkpoint(path)
    return str(path), "tiny random base (tests/tiny.py: 4 layers, dim 64)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/multimodal_demo")
    ap.add_argument("--base", default="builtin", help="'builtin' (falls back to a tiny base), 'tiny', or a dir")
    ap.add_argument("--n-train", type=int, default=600)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--epochs", type=float, default=15)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-2)
    ap.add_argument("--prompt-length", type=int, default=10)
    ap.add_argument("--layers", type=int, default=None, help="adapted layers (default: all, at most 30)")
    ap.add_argument("--template", default="plain")
    ap.add_argument(
        "--answer-format",
        default="The answer is ({letter}).",
        help="training target with {letter} / {text} (default: ScienceQA's 'The answer is ({letter}).')",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import llama_adapter as la
    from llama_adapter.builtin.shapes import make_shapes_dataset
    from llama_adapter.eval.answering import write_jsonl
    from llama_adapter.eval.scienceqa import (
        PAPER_TABLE2,
        evaluate,
        format_table,
        group_accuracy,
        load_official,
        to_record,
    )
    from llama_adapter.multimodal.encoder import ImageEncoder
    from llama_adapter.training.config import TrainConfig
    from llama_adapter.training.loop import train
    from llama_adapter.zero_init_attention import projection_parameter_count

    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base, base_label = resolve_base(args.base, out)
    data = make_shapes_dataset(
        out / "shapes", n_train=args.n_train, n_test=args.n_test, seed=args.seed, image_size=args.image_size
    )
    enc_dir = make_encoder(out / "clip", args.image_size, args.seed)
    train_p, test_p = load_official(data, "train"), load_official(data, "test")
    recs = [to_record(p, answer_format=args.answer_format) for p in train_p]
    text_recs = [{k: v for k, v in r.items() if k != "image"} for r in recs]
    print(f"base: {base_label}; {len(recs)} train / {len(test_p)} test problems", flush=True)

    results: dict[str, dict] = {}
    timings: dict[str, float] = {}
    for name, rows, encoder_dir in (("text-only", text_recs, None), ("image-conditioned", recs, str(enc_dir))):
        t = time.time()
        model = la.load_model(base, dtype=torch.float32)
        cfg = TrainConfig(
            base=base,
            out=str(out / name),
            template=args.template,
            epochs=args.epochs,
            warmup_epochs=min(1.0, args.epochs / 4),
            batch_size=args.batch_size,
            micro_batch=args.batch_size,
            lr=args.lr,
            prompt_length=args.prompt_length,
            layers=args.layers,
            dtype="float32",
            seed=args.seed,
            image_encoder=encoder_dir,
            feature_cache=str(out / "feature_cache") if encoder_dir else None,
            progress=False,
            overwrite=True,  # this script's own output: a re-run replaces it
        )
        res = train(cfg, model=model, records=[dict(r) for r in rows])
        eval_model = la.load_model(base, dtype=torch.float32)
        adapter = eval_model.load_adapter(res.adapter_path, "demo")
        enc = ImageEncoder.load(encoder_dir) if adapter.visual_proj is not None else None
        rows_out = evaluate(
            eval_model, "demo", test_p, template=args.template, encoder=enc, batch_size=32, max_new_tokens=8
        )
        write_jsonl(out / name / "predictions.jsonl", rows_out)
        acc = group_accuracy(rows_out)
        timings[name] = time.time() - t
        results[name] = {
            "accuracy": acc,
            "n_trainable": res.n_trainable,
            "final_train_loss": res.final_train_loss,
            "steps": res.steps,
            "seconds": round(timings[name], 1),
        }
        print(
            f"{name}: {acc['Average']['acc']:.2f}% ({res.n_trainable:,} trainable, loss "
            f"{res.final_train_loss:.3f}, {timings[name]:.0f}s)",
            flush=True,
        )

    table = format_table({f"{k} adapter (this demo)": v["accuracy"] for k, v in results.items()} | PAPER_TABLE2)
    chance = 100 * (0.5 / 4 + 0.5 / 3)
    from llama_adapter.loading import checkpoint_files
    from llama_adapter.loading import resolve_base as base_dir

    digest = hashlib.sha256()
    for f in checkpoint_files(base_dir(base)):
        digest.update(f.read_bytes())
    summary = {
        "base": base_label,
        "base_weights_sha256": digest.hexdigest()[:16],
        "encoder": "CLIP-architecture ViT, 4 layers, width 128, patch 8, random init, frozen",
        "n_train": len(recs),
        "n_test": len(test_p),
        "chance_accuracy": round(chance, 2),
        "args": vars(args),
        "projection_parameters_7b_vit_l14": projection_parameter_count(),
        "results": results,
        "total_seconds": round(time.time() - t0, 1),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    print()
    print(table)
    print(
        f"\nchance (uniform guess): {chance:.2f}%; colour questions -> NAT / G1-6, shape questions -> SOC / "
        "G7-12; all have an image and no text context (IMG)"
    )
    print(f"total {time.time() - t0:.0f}s; results in {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
