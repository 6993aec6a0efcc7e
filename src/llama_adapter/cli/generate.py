"""`llama-adapter generate --base DIR [--adapter FILE] "instruction" [--input TEXT]`: print one response."""

from __future__ import annotations

import argparse
import sys

from llama_adapter.cli.common import (
    add_model_args,
    add_sampling_args,
    build_prompt,
    image_features,
    load_adapter_file,
    load_base,
    sampling_kwargs,
    template_of,
)
from llama_adapter.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate a response to one instruction",
        description="Print the response of the base (or of the base with an adapter) to an "
        "instruction. The adapter's prompt template (recorded in its file, e.g. alpaca) is "
        "applied unless --raw.",
    )
    add_model_args(p)
    p.add_argument("--adapter", default=None, help="adapter .safetensors file")
    p.add_argument("instruction", help="the instruction (or, with --raw, the whole prompt)")
    p.add_argument("--input", default="", help="optional input/context for the instruction")
    p.add_argument("--raw", action="store_true", help="send the text as is, without the template")
    p.add_argument("--template", default=None, help="template name or .json path (overrides the adapter's)")
    p.add_argument("--image", default=None, help="image file (multi-modal adapters)")
    p.add_argument("--image-encoder", default=None, help="image encoder directory (default: the adapter's)")
    p.add_argument("--no-stream", action="store_true", help="print the response only when complete")
    add_sampling_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llama_adapter.inference.generate import stream_generate

    kw = sampling_kwargs(args)
    model = load_base(args)
    name = load_adapter_file(model, args.adapter) if args.adapter else None
    template = None if args.raw else template_of(model, name, args.template)
    try:
        prompt = build_prompt(template, args.instruction, args.input)
    except ValueError as e:
        raise UserError(str(e)) from None
    feats = image_features(model, name, args.image, args.image_encoder) if args.image else None
    try:
        if args.no_stream:
            from llama_adapter.inference.generate import generate

            print(generate(model, [prompt], adapter=name, image_features=feats, **kw)[0])
            return 0
        for _, delta in stream_generate(model, [prompt], adapter=name, image_features=feats, **kw):
            sys.stdout.write(delta)
            sys.stdout.flush()
    except ValueError as e:
        raise UserError(str(e)) from None
    sys.stdout.write("\n")
    return 0
