"""`llama-adapter` command line: one subcommand per module of this package (`COMMANDS`, in `--help` order).

Each command module defines `register(subparsers)`, which adds its parser and sets `func(args) -> int`;
`common` holds the flags several commands share. The library never imports this package.
Errors the user can fix (`llama_adapter.errors.UserError`: bad paths, bad files, bad flags) print one line
and exit 2, never a traceback; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from llama_adapter.errors import UserError

COMMANDS = ["finetune", "generate", "chat", "serve", "eval", "demo", "pretrain", "info", "convert", "encoder"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-adapter",
        description="Train, convert and serve LLaMA-Adapter adapters (zero-init attention) on frozen LLaMA-family "
        "models. `--base builtin` uses the small base model shipped with the package.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (UserError, FileNotFoundError) as e:
        print(f"llama-adapter {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
