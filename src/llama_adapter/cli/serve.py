"""`llama-adapter serve --base DIR --adapter NAME=FILE ...`: the OpenAI-compatible server (FastAPI + uvicorn)."""

from __future__ import annotations

import argparse
import os

from llama_adapter.cli.common import add_model_args, load_adapter_file, load_base


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible server for the base and many adapters at once",
        description="Serve /v1/completions, /v1/chat/completions (SSE streaming), /v1/models and "
        "/health. The request's `model` picks an adapter or the base; requests in flight are "
        "decoded together in one batch whatever their adapters (continuous batching). Chats use the adapter's "
        "prompt template, else the base's own chat template, else a plain transcript.",
    )
    add_model_args(p)
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="adapter to serve as model NAME (repeatable; FILE alone uses the file's stem)",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="default: 8000")
    p.add_argument(
        "--api-key",
        default=os.environ.get("LLAMA_ADAPTER_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $LLAMA_ADAPTER_API_KEY); also enables "
        "POST/DELETE /v1/adapters",
    )
    p.add_argument("--base-name", default="base", help="model id of the base without adapter (default: base)")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together (default: 8)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429 (default: 64)")
    p.add_argument(
        "--max-context",
        type=int,
        default=None,
        help="tokens per request, prompt + completion (default: the model's context, at most 4096)",
    )
    p.add_argument("--image-encoder", default=None, help="image encoder directory for multi-modal adapters")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from llama_adapter.errors import UserError
    from llama_adapter.prompting import resolve_template
    from llama_adapter.serving.app import create_app

    if args.max_batch_size < 1 or args.max_queue < 0:
        raise UserError("--max-batch-size must be >= 1 and --max-queue >= 0")
    model = load_base(args)
    for spec in args.adapter:
        name = load_adapter_file(model, spec)
        if name == args.base_name:
            raise UserError(f"adapter name {name!r} is the base's model id; pick another NAME=")
        resolve_template(model, name)  # its prompt format must be one this base can give, checked before serving
    ctx = args.max_context or min(model.config.max_seq_len, 4096)
    app = create_app(
        model,
        base_name=args.base_name,
        api_key=args.api_key,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        max_context=ctx,
        image_encoder=args.image_encoder,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
