"""`llama-adapter demo`: fine-tune a zero-init adapter on the built-in base and show before/after, in minutes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llama_adapter.cli.common import positive_int


def register(sub: argparse._SubParsersAction) -> None:
    from llama_adapter.builtin.demo import DEMO_STEPS

    p = sub.add_parser(
        "demo",
        help="the method end to end on the built-in base model (a few minutes on CPU)",
        description="Load the built-in base, show its answers to held-out instructions, fine-tune "
        "a zero-init attention adapter on the built-in instruction set (progress bar), show the "
        "adapted answers, and print held-out exact-match accuracy before and after, the number "
        "of trainable parameters and the adapter's file size. Saves the adapter and a loss plot.",
    )
    p.add_argument(
        "--out",
        default="runs/demo",
        help="output directory (default: runs/demo); an earlier demo's files there are replaced",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the training data order and adapter init")
    p.add_argument("--steps", type=int, default=DEMO_STEPS, help=f"optimiser steps (default: {DEMO_STEPS})")
    p.add_argument(
        "--base",
        default="builtin",
        help="base model (default: the built-in one); e.g. a directory written by `llama-adapter pretrain`",
    )
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: min(4, cores))")
    p.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no fine-tuning progress (a bar on a terminal, a line per 10%% in a log)",
    )
    p.add_argument(
        "--write-data",
        metavar="DIR",
        default=None,
        help="only write the demo's instruction data (train.jsonl, heldout.jsonl; --seed applies) to DIR, "
        "for `llama-adapter finetune --config recipes/builtin-adapter.yaml`, and stop",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llama_adapter.builtin.demo import run_demo, write_instruction_data
    from llama_adapter.errors import UserError

    if args.write_data:
        train, held = write_instruction_data(args.write_data, seed=args.seed)
        print(f"wrote {train} and {held}")
        return 0
    if args.steps < 1:
        raise UserError("--steps must be >= 1")
    result = run_demo(
        args.out, seed=args.seed, steps=args.steps, threads=args.threads, base=args.base, progress=args.progress
    )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "demo_result.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0
