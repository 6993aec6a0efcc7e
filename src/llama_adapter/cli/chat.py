"""`llama-adapter chat --base DIR [--adapter FILE ...]`: an interactive loop that streams the answers.

The conversation so far (system text, the user's turns and the answers) is rendered again for every turn in the
prompt format of the active model (`prompting.resolve_template`: the adapter's template, else the base's own chat
template, else a plain transcript), so an instruct base sees its own chat format, multi-turn. Commands:
`/adapter NAME` (or `/adapter none` for the base), `/adapters`, `/image FILE` (`/audio`, `/video`; `none` drops it),
`/reset`, `/quit`. Ctrl-C stops the current answer, not the program (Ctrl-C at the prompt, or Ctrl-D, leaves).

With a multi-modal adapter, `--image` (`--audio`, `--video`) conditions every turn of the conversation on that input
(the adapter's encoders turn it into one vector, added to its prompts, as `generate --image` does); `/image FILE`
changes it, and starts the conversation again, since the answers so far were about the other one.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from llama_adapter.cli.common import (
    MEDIA,
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

HELP = "/adapter NAME | /adapter none | /adapters | /image FILE | /audio FILE | /video FILE | /reset | /quit"


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
    add_template_args(p, raw_help="no template: a plain User:/Assistant: transcript")
    p.add_argument("--system", default="", help="system message (for instruction templates: before the first one)")
    add_media_args(p, scope="; conditions every turn, /image /audio /video FILE change it")
    add_sampling_args(p)
    p.set_defaults(func=run)


class Condition:
    """The conversation's --image / --audio / --video inputs and their features for the active adapter (encoded
    once per adapter and inputs: every turn reuses them)."""

    def __init__(self, model: Any, args: argparse.Namespace) -> None:
        self.model, self.args = model, args
        self.inputs = media_inputs(args)
        self._encoders: Any = None
        self._features: dict[tuple[str | None, tuple[tuple[str, str], ...]], Any] = {}

    def features(self, adapter: str | None, inputs: dict[str, str] | None = None) -> Any:
        """[1, F] for `inputs` (default: the conversation's) under `adapter`, None without inputs; UserError where
        that adapter does not take them or a file is missing."""
        inputs = self.inputs if inputs is None else inputs
        key = (adapter, tuple(sorted(inputs.items())))
        if key not in self._features:
            if inputs and adapter is None:
                raise UserError(
                    f"the base alone takes no {next(iter(inputs))}: /adapter NAME picks a multi-modal adapter, "
                    f"/{next(iter(inputs))} none drops it"
                )
            if inputs and self._encoders is None:
                self._encoders = media_encoders(self.model, self.args)
            self._features[key] = condition_features(self.model, adapter, inputs, self._encoders, f"adapter {adapter}")
        return self._features[key]

    def change(self, modality: str, arg: str, adapter: str | None) -> bool:
        """`/image FILE` (or `none`): the new inputs, checked against the active adapter first; False (with the
        reason on stderr) leaves them as they were."""
        inputs = {k: v for k, v in self.inputs.items() if k != modality}
        if arg not in ("", "none"):
            inputs[modality] = arg
            if adapter is not None:
                try:
                    self.features(adapter, inputs)
                except UserError as e:
                    print(e, file=sys.stderr)
                    return False
        self.inputs = inputs
        return True


def run(args: argparse.Namespace) -> int:
    from llama_adapter.inference.generate import stream_generate
    from llama_adapter.prompting import empty_answer_hint, render_chat, resolve_template

    kw = sampling_kwargs(args)
    choice = template_choice(args)
    model = load_base(args)
    names = [load_adapter_file(model, a) for a in args.adapter]
    current: str | None = names[0] if names else None
    resolve_template(model, current, choice)  # a wrong --template fails before the first question
    condition = Condition(model, args)
    if condition.inputs and current is None:
        raise UserError(f"--{next(iter(condition.inputs))} needs a multi-modal adapter (--adapter FILE)")
    condition.features(current)  # a missing file, or an adapter that does not take it, fails before the first question
    system = [("system", args.system)] if args.system else []
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
            elif cmd[1:] in MEDIA:
                if condition.change(cmd[1:], arg, current):
                    history.clear()
                    now = condition.inputs.get(cmd[1:], "none")
                    print(f"({cmd[1:]}: {now}; conversation cleared)", file=sys.stderr)
            else:
                print(f"unknown command {cmd} ({HELP})", file=sys.stderr)
            continue
        try:  # a template that refuses the conversation (or an adapter this base cannot serve) is told, not fatal
            feats = condition.features(current)
            template = resolve_template(model, current, choice)
            prompt = render_chat(model, template, [*system, *history, ("user", text)])
            ids = prompt.encode(model.tokenizer)
            limit = model.config.max_seq_len - 1
            while len(ids) > limit and len(history) >= 2:  # forget the oldest turns
                history = history[2:]
                prompt = render_chat(model, template, [*system, *history, ("user", text)])
                ids = prompt.encode(model.tokenizer)
        except UserError as e:  # (a TemplateError is one; so is an input the adapter does not take)
            print(e, file=sys.stderr)
            continue
        if len(ids) > limit:
            print(f"message too long ({len(ids)} tokens; the context is {limit + 1})", file=sys.stderr)
            continue
        answer = ""
        stream = stream_generate(
            model, [ids], adapter=current, image_features=feats, strip_separator=prompt.strip_separator, **kw
        )
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
        if not answer.strip() and kw["max_new_tokens"] > 0:
            print(empty_answer_hint(model, template), file=sys.stderr)
        history += [("user", text), ("assistant", answer.strip())]
