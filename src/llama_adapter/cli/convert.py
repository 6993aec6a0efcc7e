"""`llama-adapter convert SRC DST`: import official LLaMA-Adapter, PEFT or litgpt adapters."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="import an adapter made by another tool (official .pth, PEFT dir, litgpt)",
        description="Convert an adapter from the official LLaMA-Adapter v1 .pth, a PEFT adaption-prompt directory, "
        "or a litgpt lit_model.pth.adapter into a llama-adapter .safetensors file. The base checkpoint "
        "(only its config is read) fixes the shapes the adapter must fit.",
    )
    p.add_argument("src", help="source adapter file or PEFT directory")
    p.add_argument("dst", help="destination .safetensors file")
    p.add_argument("--base", required=True, help="base checkpoint directory the adapter belongs to (or 'builtin')")
    p.add_argument("--format", choices=["official", "peft", "litgpt"], help="source format (default: detected)")
    p.add_argument(
        "--gate",
        choices=["tanh", "linear"],
        help="official checkpoints: whether the gate is applied through tanh (required for them)",
    )
    p.add_argument("--template", default="alpaca", help="prompt template recorded in the file (default: alpaca)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llama_adapter.convert import convert, detect_format
    from llama_adapter.loading import load_config

    cfg, _ = load_config(args.base)
    fmt = args.format or detect_format(Path(args.src))
    out = convert(args.src, args.dst, cfg, fmt=fmt, gate=args.gate, template=args.template)
    print(f"converted {fmt} adapter {args.src} -> {out} ({out.stat().st_size / 2**20:.2f} MiB)")
    return 0
