"""`llama-adapter pretrain --out DIR [--config recipes/builtin.yaml]`: rebuild the built-in base from nothing."""

from __future__ import annotations

import argparse
from pathlib import Path

from llama_adapter.cli.common import positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="rebuild the built-in base model from nothing (tokenizer + pre-training)",
        description="Generate the synthetic corpus, train a BPE tokenizer on it, pre-train a small "
        "LLaMA on it (all parameters, CPU) and write a Hugging Face-layout checkpoint directory "
        "with a record of the recipe and the time it took. The shipped built-in base was made "
        "with the default recipe.",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--config",
        default=None,
        help="recipe YAML (default: recipes/builtin.yaml of the source tree, else built-in defaults)",
    )
    p.add_argument("--steps", type=int, default=None, help="override the number of optimiser steps")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: from the recipe)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llama_adapter.builtin.pretrain import DEFAULT_RECIPE, PretrainConfig, pretrain
    from llama_adapter.errors import UserError

    path = Path(args.config) if args.config else (DEFAULT_RECIPE if DEFAULT_RECIPE.is_file() else None)
    if path is not None and not path.is_file():
        raise UserError(f"{path}: recipe file not found")
    try:
        cfg = PretrainConfig.from_file(path) if path else PretrainConfig()
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None
    if args.steps is not None:
        cfg.steps = args.steps
    if args.threads is not None:
        cfg.threads = args.threads
    print(f"recipe: {path or 'built-in defaults'}")
    pretrain(cfg, args.out, log=lambda s: print(s, flush=True))
    print(f"wrote {args.out} (load it with --base {args.out})")
    return 0
