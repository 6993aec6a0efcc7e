"""Subcommands of the `llama-adapter` CLI; each module defines `register(subparsers)`."""
