"""`llama-adapter generate --base DIR [--adapter FILE] "instruction" [--input TEXT]`: print one response."""

from __future__ import annotations

import argparse
import sys

from llama_adapter.cli.common import (
    add_media_args,
    add_model_args,
    add_sampling_args,
    add_template_args,
    condition_features,
    load_adapter_file,
    load_base,
    media_encoders,
    media_inputs,
    sampling_kwargs,
    template_choice,
)
from llama_adapter.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate a response to one instruction",
        description="Print the response of the base (or of the base with an adapter) to an instruction, in the "
        "prompt format the model was tuned on: the adapter's template (recorded in its file, e.g. alpaca), else "
        "the base's own chat template (instruct models), else plain text. --template chooses, --raw sends the "
        "text as is.",
    )
    add_model_args(p)
    p.add_argument("--adapter", default=None, help="adapter .safetensors file")
    p.add_argument("instruction", help="the instruction (or, with --raw, the whole prompt)")
    p.add_argument("--input", default="", help="optional input/context for the instruction")
    add_template_args(p, raw_help="send the text as is, without any template")
    add_media_args(p)
    p.add_argument("--no-stream", action="store_true", help="print the response only when complete")
    add_sampling_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llama_adapter.inference.generate import generate, stream_generate
    from llama_adapter.prompting import empty_answer_hint, render_instruction, resolve_template

    kw = sampling_kwargs(args)
    model = load_base(args)
    name = load_adapter_file(model, args.adapter) if args.adapter else None
    template = resolve_template(model, name, template_choice(args))
    try:
        prompt = render_instruction(model, template, args.instruction, args.input)
    except ValueError as e:
        raise UserError(str(e)) from None
    ids = prompt.encode(model.tokenizer)
    feats = condition_features(model, name, media_inputs(args), media_encoders(model, args), f"adapter {args.adapter}")
    answer = ""
    try:
        if args.no_stream:
            answer = generate(
                model, [ids], adapter=name, image_features=feats, strip_separator=prompt.strip_separator, **kw
            )[0]
            sys.stdout.write(answer)
        else:
            for _, delta in stream_generate(
                model, [ids], adapter=name, image_features=feats, strip_separator=prompt.strip_separator, **kw
            ):
                answer += delta
                sys.stdout.write(delta)
                sys.stdout.flush()
    except ValueError as e:
        raise UserError(str(e)) from None
    sys.stdout.write("\n")
    sys.stdout.flush()
    if not answer.strip() and kw["max_new_tokens"] > 0:
        print(empty_answer_hint(model, template), file=sys.stderr)
    return 0
