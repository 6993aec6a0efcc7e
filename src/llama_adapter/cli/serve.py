"""`llama-adapter serve --base DIR --adapter NAME=FILE ...`: the OpenAI-compatible server (FastAPI + uvicorn)."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import sys
from pathlib import Path

from llama_adapter.cli.common import add_model_args, load_adapter_file, load_base
from llama_adapter.errors import UserError

ENV_KEY = "LLAMA_ADAPTER_API_KEY"


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
        help="adapter to serve as model NAME (repeatable; FILE alone uses the file's stem). Names: 1-64 letters, "
        "digits, '_' or '-', starting with a letter or digit",
    )
    p.add_argument(
        "--adapter-dir",
        default=None,
        metavar="DIR",
        help="serve every DIR/NAME.safetensors as model NAME, listed in /v1/models and loaded on its first request",
    )
    p.add_argument(
        "--max-adapters",
        type=int,
        default=None,
        metavar="N",
        help="keep at most N adapters loaded; past N the least recently used one not in use is unloaded "
        "(and reloaded from its file when asked for again). Default: no limit",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port, 1-65535 (default: 8000)")
    p.add_argument(
        "--api-key",
        action="append",
        default=None,
        metavar="KEY",
        help=f"require 'Authorization: Bearer KEY' (repeatable: each key is accepted; default: ${ENV_KEY}); "
        "also enables POST/DELETE /v1/adapters",
    )
    p.add_argument("--api-key-file", default=None, metavar="FILE", help="more API keys, one per line")
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
    p.add_argument(
        "--audio-encoder", default=None, help="audio encoder directory for adapters that do not record theirs"
    )
    p.add_argument(
        "--max-body-mb",
        type=float,
        default=8.0,
        metavar="MB",
        help="largest request body accepted; larger ones get 413 (default: 8)",
    )
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=5.0,
        metavar="S",
        help="on SIGTERM, let requests in flight finish for S seconds, then end them with a final event "
        "(an SSE error event then [DONE], or a 503) and exit 0 (default: 5)",
    )
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.add_argument(
        "--log-format",
        default="text",
        choices=("text", "json"),
        help="access log: one line per request (adapter, status, tokens, latency), as key=value text or JSON",
    )
    p.set_defaults(func=run)


def api_keys(args: argparse.Namespace) -> list[str]:
    """The accepted keys: every --api-key (else $LLAMA_ADAPTER_API_KEY) and each non-empty line of
    --api-key-file (keys stay out of the process list and shell history that way)."""
    keys = list(args.api_key or ([os.environ[ENV_KEY]] if os.environ.get(ENV_KEY) else []))
    if args.api_key_file:
        try:
            lines = Path(args.api_key_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--api-key-file {args.api_key_file}: cannot be read ({e})") from None
        found = [line.strip() for line in lines if line.strip()]
        if not found:
            raise UserError(f"--api-key-file {args.api_key_file}: no keys in it")
        keys += found
    if any(not k.strip() for k in keys):
        raise UserError("an API key must not be empty")
    return list(dict.fromkeys(keys))


def _port(text: str) -> int:
    """--port's type: one line for what is not a TCP port (the socket would raise OverflowError, a traceback)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text}: a TCP port is 1-65535")
    return port


def check_port(host: str, port: int) -> None:
    """UserError (one line, exit 2) when host:port cannot be bound, checked before the model loads: uvicorn
    would report it only after "Application startup complete", with a traceback."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"--host {host}: cannot be resolved ({e.strerror})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
        try:
            s.bind(addr)
        except OSError as e:
            why = "already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
            raise UserError(f"cannot listen on {host}:{port}: {why}") from None


def setup_access_log(level: str) -> None:
    """The access log's lines go to stderr as they are (the line is already text or JSON)."""
    log = logging.getLogger("llama_adapter.access")
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(h)
    log.setLevel(level.upper())
    log.propagate = False


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from llama_adapter.errors import AdapterError
    from llama_adapter.prompting import resolve_template
    from llama_adapter.serving.app import GracefulServer, create_app

    if args.max_batch_size < 1 or args.max_queue < 0:
        raise UserError("--max-batch-size must be >= 1 and --max-queue >= 0")
    if args.max_adapters is not None and args.max_adapters < 1:
        raise UserError("--max-adapters must be >= 1")
    if not args.max_body_mb > 0:
        raise UserError("--max-body-mb must be > 0")
    if not args.shutdown_grace >= 0:
        raise UserError("--shutdown-grace must be >= 0")
    check_port(args.host, args.port)
    keys = api_keys(args)
    if args.adapter_dir is not None and not Path(args.adapter_dir).is_dir():
        raise UserError(f"--adapter-dir {args.adapter_dir}: not a directory")
    model = load_base(args)
    files = {}
    for spec in args.adapter:
        name, path = load_adapter_file(model, spec, with_path=True)
        if name == args.base_name:
            raise UserError(f"adapter name {name!r} is the base's model id; pick another NAME=")
        resolve_template(model, name)  # its prompt format must be one this base can give, checked before serving
        files[name] = path
    ctx = args.max_context or min(model.config.max_seq_len, 4096)
    try:
        app = create_app(
            model,
            base_name=args.base_name,
            api_key=keys,
            max_batch_size=args.max_batch_size,
            max_queue=args.max_queue,
            max_context=ctx,
            image_encoder=args.image_encoder,
            audio_encoder=args.audio_encoder,
            adapter_dir=args.adapter_dir,
            max_adapters=args.max_adapters,
            max_body_mb=args.max_body_mb,
            log_format=args.log_format,
        )
        registry = app.state.server.registry
        registry.check_directory()
    except AdapterError as e:
        raise UserError(str(e)) from None
    for name, path in files.items():
        registry.remember(name, path)
    setup_access_log(args.log_level)
    # our access log replaces uvicorn's (it knows the adapter and the tokens)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    server = GracefulServer(config, grace_s=args.shutdown_grace)
    server.run()
    return 0 if server.started else 1
