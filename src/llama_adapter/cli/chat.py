"""`llama-adapter chat --base DIR [--adapter FILE ...]`: an interactive loop that streams the answers.

Commands: `/adapter NAME` (or `/adapter none` for the base), `/adapters`, `/reset`, `/quit`. Ctrl-C stops the
current answer, not the program (Ctrl-C at the prompt, or Ctrl-D, leaves).
"""

from __future__ import annotations

import argparse
import sys

from llama_adapter.cli.common import (
    add_model_args,
    add_sampling_args,
    load_adapter_file,
    load_base,
    sampling_kwargs,
    template_of,
)

HELP = "/adapter NAME | /adapter none | /adapters | /reset | /quit"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chat",
        help="interactive chat that streams tokens",
        description=f"Chat with the base or an adapter; answers stream as they are decoded. {HELP}. "
        "Ctrl-C stops the current answer.",
    )
    add_model_args(p)
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="[NAME=]FILE",
        help="adapter file (repeatable; the first one is active)",
    )
    p.add_argument("--raw", action="store_true", help="no prompt template (plain User:/Assistant: transcript)")
    p.add_argument("--template", default=None, help="template name or .json path (overrides the adapter's)")
    p.add_argument("--system", default="", help="system text prepended to the first instruction")
    add_sampling_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llama_adapter.inference.chat import chat_prompt
    from llama_adapter.inference.generate import stream_generate

    kw = sampling_kwargs(args)
    model = load_base(args)
    names = [load_adapter_file(model, a) for a in args.adapter]
    current: str | None = names[0] if names else None
    history: list[tuple[str, str]] = []
    out = sys.stdout
    print(f"chatting with {current or 'the base'} ({HELP}; Ctrl-C stops an answer)", file=sys.stderr)
    while True:
        try:
            line = input(f"[{current or 'base'}] > ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            arg = arg.strip()
            if cmd in ("/quit", "/exit", "/q"):
                return 0
            if cmd == "/reset":
                history.clear()
                print("(conversation cleared)", file=sys.stderr)
            elif cmd == "/adapters":
                print(", ".join(model.adapters) or "(none loaded)", file=sys.stderr)
            elif cmd == "/adapter":
                if arg in ("none", "base", ""):
                    current = None
                elif arg in model.adapters:
                    current = arg
                else:
                    print(f"no adapter named {arg!r} (loaded: {', '.join(model.adapters) or 'none'})", file=sys.stderr)
                    continue
                history.clear()
                print(f"(now {current or 'the base'}; conversation cleared)", file=sys.stderr)
            else:
                print(f"unknown command {cmd} ({HELP})", file=sys.stderr)
            continue
        template = None if args.raw else template_of(model, current, args.template)
        msgs = ([("system", args.system)] if args.system else []) + history + [("user", text)]
        prompt = chat_prompt(msgs, template)
        ids = model.tokenizer.encode(prompt, bos=True)
        limit = model.config.max_seq_len - 1
        while len(ids) > limit and len(history) >= 2:  # forget the oldest turns
            history = history[2:]
            msgs = ([("system", args.system)] if args.system else []) + history + [("user", text)]
            ids = model.tokenizer.encode(chat_prompt(msgs, template), bos=True)
        if len(ids) > limit:
            print(f"message too long ({len(ids)} tokens; the context is {limit + 1})", file=sys.stderr)
            continue
        answer = ""
        stream = stream_generate(model, [ids], adapter=current, **kw)
        try:
            for _, delta in stream:
                answer += delta
                out.write(delta)
                out.flush()
        except KeyboardInterrupt:
            stream.close()
            out.write(" [stopped]")
        out.write("\n")
        out.flush()
        history += [("user", text), ("assistant", answer.strip())]
