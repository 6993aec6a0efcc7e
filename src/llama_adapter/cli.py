"""`llama-adapter` command line: one subcommand per module in `llama_adapter.commands`.

Each command module defines `register(subparsers)`, which adds its parser and sets `func(args) -> int`.
Errors the user can fix (bad paths, bad files, bad flags) print one line and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from . import commands
from .adapter_io import AdapterError
from .config import CheckpointError

ORDER = ["finetune", "generate", "chat", "serve", "eval", "demo", "pretrain", "info", "convert"]


class UserError(Exception):
    """An error caused by the user's input; printed as one line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-adapter",
        description="Train, convert and serve LLaMA-Adapter adapters (zero-init attention) on frozen LLaMA-family "
        "models. `--base builtin` uses the small base model shipped with the package.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    found = [m.name for m in pkgutil.iter_modules(commands.__path__)]
    for name in sorted(found, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n)):
        importlib.import_module(f"{commands.__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (UserError, CheckpointError, AdapterError, FileNotFoundError) as e:
        print(f"llama-adapter {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
