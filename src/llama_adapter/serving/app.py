"""OpenAI-compatible HTTP server (FastAPI): one frozen base, many adapters, continuously batched.

    POST /v1/completions            raw prompts (str, [str], [int] or [[int]]), optional SSE streaming
    POST /v1/chat/completions       messages, in the model's prompt format (`prompting.resolve_template`: the
                                    adapter's template, else the base's own chat template, else a plain
                                    transcript); SSE with "stream": true; image content parts (data: URLs) for
                                    multi-modal adapters
    GET  /v1/models                 the base and every servable adapter (loaded or not: "loaded"), each with the
                                    prompt format its chats use
    POST /v1/adapters               {"name": ..., "path": ...}  load an adapter file (needs --api-key)
    DELETE /v1/adapters/{name}      unload it (requests already decoding finish normally; queued ones get 404)
    GET  /health

The request's `model` names an adapter or the base; an adapter of the registry (`serving.registry`: an
--adapter-dir file, or one evicted past --max-adapters) that is not resident is loaded on its first request.
Extensions to the OpenAI parameters: `top_k`.
Unspecified temperature/top_p default to the paper's 0.1/0.75. Errors use OpenAI's body
{"error": {"message", "type", "param", "code"}}: 400 bad parameters or a prompt longer than the context,
401 missing/wrong key, 404 unknown model, 429 queue full.

This module holds `Server` (the model, its adapters, the key check, encoding, image features and the requests'
way to and from the `Engine`), the routes (module-level functions that find the `Server` in `app.state`) and
`create_app`, which wires them. Parsing is in `serving.protocol`, response bodies and SSE in `serving.responses`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from torch import Tensor

from llama_adapter.errors import AdapterError, TemplateError
from llama_adapter.inference.decoder import DecodeRequest, Event
from llama_adapter.model import Transformer
from llama_adapter.prompting import RenderedPrompt, describe_template, render_chat, resolve_template
from llama_adapter.serving import responses
from llama_adapter.serving.engine import Engine, QueueFull
from llama_adapter.serving.protocol import (
    APIError,
    Message,
    Prompt,
    StreamOptions,
    bad,
    error_from_seq,
    is_int,
    parse_adapter_request,
    parse_body,
    parse_chat_request,
    parse_completion_request,
)
from llama_adapter.serving.registry import AdapterRegistry
from llama_adapter.serving.responses import Reply

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger("llama_adapter.serving.app")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Server:
    """The served model and its engine; what the routes need, with the HTTP left out."""

    def __init__(
        self,
        model: Transformer,
        base_name: str = "base",
        api_key: str | Iterable[str] | None = None,
        max_batch_size: int = 8,
        max_queue: int = 64,
        max_context: int | None = None,
        image_encoder: str | None = None,
        adapter_dir: str | Path | None = None,
        max_adapters: int | None = None,
    ) -> None:
        if model.tokenizer is None:
            raise ValueError("the server needs a model with a tokenizer")
        self.model, self.base_name = model, base_name
        keys = [api_key] if isinstance(api_key, str) else list(api_key or ())
        self.api_keys = [k.encode() for k in keys]
        if any(not k.strip() for k in self.api_keys):
            raise ValueError("an API key must not be empty")
        self.engine = Engine(model, max_batch_size, max_queue, max_context)
        self.registry = AdapterRegistry(model, self.engine, adapter_dir, max_adapters)
        self.image_encoder_dir = image_encoder
        self._encoders: dict[str, Any] = {}
        self.created = int(time.time())

    # ---- access --------------------------------------------------------------------------------------------
    def check_key(self, headers: Mapping[str, str]) -> None:
        """401 unless the server has no key or `headers` carry one of its keys (Authorization: Bearer, or
        x-api-key); every key is compared, in constant time, so the answer's timing tells nothing of which."""
        if not self.api_keys:
            return
        auth = headers.get("authorization", "")
        token = (auth[7:] if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")).encode()
        if not sum(secrets.compare_digest(token, k) for k in self.api_keys):
            raise APIError(401, "missing or invalid API key", type="authentication_error", code="invalid_api_key")

    def require_admin(self) -> None:
        """403 unless adapters may be changed (only with an API key)."""
        if not self.api_keys:
            raise APIError(
                403,
                "adapters can be changed at run time only when the server has an API key",
                type="permission_error",
            )

    # ---- adapters ------------------------------------------------------------------------------------------
    @staticmethod
    def _not_found(name: str) -> APIError:
        return APIError(
            404, f"the model {name!r} does not exist (see GET /v1/models)", param="model", code="model_not_found"
        )

    async def acquire(self, name: str) -> str | None:
        """The adapter a request's `model` names (None: the base), held against eviction until `release`; one not
        resident is loaded first, in a worker thread (this request waits, the others go on decoding)."""
        if name == self.base_name:
            return None
        if self.registry.acquire(name):
            if self.registry.over_limit():  # left over N while all were in use: now that one may be idle
                await asyncio.to_thread(self.registry.evict_over_limit)
            return name
        try:
            found = await asyncio.to_thread(self.registry.ensure, name)
        except AdapterError as e:
            log.error("adapter %r cannot be loaded: %s", name, e)
            raise APIError(500, f"the adapter {name!r} cannot be loaded: {e}", type="server_error") from None
        if not found:
            raise self._not_found(name)
        return name

    def release(self, adapter: str | None) -> None:
        """End `acquire`'s hold (the engine knows the adapters of the requests it was given)."""
        if adapter is not None:
            self.registry.release(adapter)

    def templates(self) -> dict[str | None, str | None]:
        """The prompt format of each model's chats: None (the base) first, then each servable adapter by name
        ("chat": the base's own chat template; None: a plain transcript, or an adapter not loaded yet)."""
        out: dict[str | None, str | None] = {None: describe_template(self.model, None)}
        for n in self.registry.names():
            try:
                out[n] = describe_template(self.model, n) if n in self.model.adapters else None
            except KeyError:  # evicted by a worker thread just now
                out[n] = None
        return out

    def load_adapter(self, name: str, path: str) -> None:
        """Load file `path` as adapter `name` (blocking: call it in a worker thread); 409 if the name is taken."""
        if name in self.model.adapters or self.registry.path_of(name) is not None:
            raise APIError(409, f"an adapter named {name!r} exists; delete it first", code="adapter_exists")
        try:
            self.registry.load(name, path)
        except (AdapterError, ValueError, OSError) as e:
            raise bad(str(e), param="path") from None

    def remove_adapter(self, name: str) -> None:
        if not self.registry.remove(name):
            raise APIError(404, f"no adapter named {name!r} is loaded", code="model_not_found")

    # ---- inputs --------------------------------------------------------------------------------------------
    def encode(self, prompt: Prompt, bos: bool = True) -> list[int]:
        """Token ids of a prompt (text gets BOS unless `bos` is False: a chat template writes its own); 400 if
        empty, out of vocabulary or too long for the context."""
        tok = self.model.tokenizer
        assert tok is not None
        if isinstance(prompt, str):
            ids = tok.encode(prompt, bos=bos)
        else:
            vocab = self.model.config.vocab_size
            if not all(is_int(t) and 0 <= t < vocab for t in prompt):
                raise bad(f"token ids must be integers in [0, {vocab})", param="prompt")
            ids = list(prompt)
        if not ids:
            raise bad("the prompt is empty", param="prompt")
        limit = self.engine.max_len
        if len(ids) >= limit:
            raise bad(
                f"the prompt has {len(ids)} tokens; this model's context is {limit} tokens",
                param="prompt",
                code="context_length_exceeded",
            )
        return ids

    def render_chat(self, adapter: str | None, messages: Sequence[Message]) -> RenderedPrompt:
        """The conversation as the prompt of the assistant's next turn, in the format `resolve_template` picks.

        A conversation the base's chat template refuses (`raise_exception`: say, roles that do not alternate) is
        the client's error (400); a template that cannot be used at all is the server's (500).
        """
        try:
            template = resolve_template(self.model, adapter)
        except TemplateError as e:
            raise APIError(500, f"the model's prompt template cannot be used: {e}", type="server_error") from None
        try:
            return render_chat(self.model, template, messages)
        except TemplateError as e:
            raise bad(str(e), param="messages") from None
        except ValueError as e:
            raise APIError(500, f"the model's prompt template cannot be used: {e}", type="server_error") from None

    def image_features(self, adapter: str | None, image: Image) -> Tensor:
        """Features of `image` from the adapter's image encoder (loaded once per directory)."""
        a = self.model.adapters[adapter] if adapter is not None else None
        if a is None or a.visual_proj is None:
            raise bad("this model does not take images", param="messages")
        enc_dir = a.meta.get("image_encoder") or self.image_encoder_dir
        if not enc_dir:
            raise bad("no image encoder is configured for this adapter (serve --image-encoder DIR)")
        if enc_dir not in self._encoders:
            from llama_adapter.multimodal.encoder import ImageEncoder

            self._encoders[enc_dir] = ImageEncoder.load(enc_dir, device=self.model.tok_embeddings.weight.device)
        return self._encoders[enc_dir].encode([image])

    # ---- decoding ------------------------------------------------------------------------------------------
    def submit(self, seqs: list[DecodeRequest]) -> asyncio.Queue[Event]:
        """Queue `seqs` on the engine; their events arrive on the returned queue (call from the event loop)."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[Event] = asyncio.Queue()

        def sink(ev: Event) -> None:  # called from the engine thread
            loop.call_soon_threadsafe(q.put_nowait, ev)

        try:
            self.engine.submit(seqs, sink)
        except QueueFull as e:
            raise APIError(
                429, f"the server is busy ({e}); retry later", type="rate_limit_exceeded", code="queue_full"
            ) from None
        return q

    def cancel(self, seqs: Sequence[DecodeRequest]) -> None:
        for s in seqs:
            if not s.finished:
                self.engine.cancel(s)

    async def collect(self, seqs: list[DecodeRequest], is_disconnected: Callable[[], Awaitable[bool]]) -> list[str]:
        """The texts of `seqs` once all finish (what there is if the client goes away)."""
        q = self.submit(seqs)
        texts = [""] * len(seqs)
        left = len(seqs)
        try:
            while left:
                try:
                    ev = await asyncio.wait_for(q.get(), timeout=1.0)
                except (TimeoutError, asyncio.TimeoutError):  # distinct classes before Python 3.11
                    if await is_disconnected():
                        return texts
                    continue
                texts[ev.seq.tag] += ev.text
                if ev.finished:
                    left -= 1
                    if ev.seq.finish_reason == "error":
                        raise error_from_seq(ev.seq)
            return texts
        finally:
            self.cancel(seqs)

    def stream(self, reply: Reply, seqs: list[DecodeRequest], include_usage: bool) -> StreamingResponse:
        """The SSE response of `seqs`; they are cancelled when the stream ends or the client goes away."""
        q = self.submit(seqs)

        async def events() -> AsyncIterator[str]:
            try:
                async for line in responses.sse_events(reply, q, seqs, include_usage):
                    yield line
            finally:
                self.cancel(seqs)

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    async def respond(self, request: Request, reply: Reply, seqs: list[DecodeRequest], opts: StreamOptions) -> Any:
        """Stream `seqs`, or wait for them and answer the whole body."""
        if opts.stream:
            return self.stream(reply, seqs, opts.include_usage)
        texts = await self.collect(seqs, request.is_disconnected)
        if reply.kind == "chat":
            return responses.chat_body(reply, texts[0], seqs[0])
        return responses.completion_body(reply, texts, seqs)


# ---- routes -------------------------------------------------------------------------------------------------
def server_of(request: Request) -> Server:
    return request.app.state.server


async def read_body(request: Request) -> dict[str, Any]:
    """The checked key, then the JSON object body."""
    server_of(request).check_key(request.headers)
    return parse_body(await request.body())


async def health(request: Request) -> dict[str, Any]:
    srv = server_of(request)
    e = srv.engine
    return {"status": "ok", "running": e.running, "queued": e.queued, "adapters": list(srv.model.adapters)}


async def list_models(request: Request) -> dict[str, Any]:
    srv = server_of(request)
    srv.check_key(request.headers)
    templates = srv.templates()
    base = templates.pop(None)
    adapters = {k: v for k, v in templates.items() if k}
    return responses.models_body(srv.base_name, srv.created, base, adapters, loaded=srv.registry.resident())


async def add_adapter(request: Request) -> JSONResponse:
    srv = server_of(request)
    body = await read_body(request)
    srv.require_admin()
    name, path = parse_adapter_request(body, srv.base_name)
    await asyncio.to_thread(srv.load_adapter, name, path)
    card = responses.model_card(name, srv.base_name, int(time.time()), parent=srv.base_name)
    return JSONResponse(card, status_code=201)


async def delete_adapter(name: str, request: Request) -> dict[str, Any]:
    srv = server_of(request)
    srv.check_key(request.headers)
    srv.require_admin()
    srv.remove_adapter(name)
    return {"id": name, "object": "model", "deleted": True}


async def completions(request: Request) -> Any:
    srv = server_of(request)
    body = await read_body(request)
    req = parse_completion_request(body)
    if len(req.prompts) > srv.engine.capacity:
        raise bad("too many prompts in one request", param="prompt")
    adapter = await srv.acquire(req.model)
    try:
        seqs = [DecodeRequest(srv.encode(p), adapter, req.sampling, tag=i) for i, p in enumerate(req.prompts)]
        return await srv.respond(request, Reply.new("completion", req.model), seqs, req.stream)
    finally:
        srv.release(adapter)


async def chat_completions(request: Request) -> Any:
    srv = server_of(request)
    body = await read_body(request)
    req = parse_chat_request(body)
    adapter = await srv.acquire(req.model)
    try:
        prompt = srv.render_chat(adapter, req.messages)
        feats = await asyncio.to_thread(srv.image_features, adapter, req.images[0]) if req.images else None
        ids = srv.encode(prompt.text, bos=prompt.bos)
        sep = prompt.strip_separator
        seq = DecodeRequest(ids, adapter, req.sampling, image_features=feats, tag=0, strip_separator=sep)
        return await srv.respond(request, Reply.new("chat", req.model), [seq], req.stream)
    finally:
        srv.release(adapter)


# ---- errors -------------------------------------------------------------------------------------------------
def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc)


async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(APIError(exc.status_code, str(exc.detail), code=None))


async def on_internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error")
    return error_response(APIError(500, f"internal error: {type(exc).__name__}", type="server_error"))


# ---- the app ------------------------------------------------------------------------------------------------
@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The engine's thread runs while the app does."""
    engine = app.state.server.engine
    engine.start()
    try:
        yield
    finally:
        engine.stop()


def create_app(
    model: Transformer,
    *,
    base_name: str = "base",
    api_key: str | Iterable[str] | None = None,
    max_batch_size: int = 8,
    max_queue: int = 64,
    max_context: int | None = None,
    image_encoder: str | None = None,
    adapter_dir: str | Path | None = None,
    max_adapters: int | None = None,
) -> FastAPI:
    """The FastAPI app serving `model` and its adapters; `app.state.server` is its `Server`."""
    app = FastAPI(title="llama-adapter", lifespan=lifespan)
    app.state.server = Server(
        model, base_name, api_key, max_batch_size, max_queue, max_context, image_encoder, adapter_dir, max_adapters
    )
    app.add_exception_handler(APIError, on_api_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, on_http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, on_internal_error)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/v1/adapters", add_adapter, methods=["POST"])
    app.add_api_route("/v1/adapters/{name}", delete_adapter, methods=["DELETE"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    return app
