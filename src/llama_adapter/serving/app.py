"""OpenAI-compatible HTTP server (FastAPI): one frozen base, many adapters, continuously batched.

    POST /v1/completions            raw prompts (str, [str], [int] or [[int]]), optional SSE streaming
    POST /v1/chat/completions       messages; the adapter's template is applied; SSE with "stream": true;
                                    image content parts (data: URLs) for multi-modal adapters
    GET  /v1/models                 the base and every adapter
    POST /v1/adapters               {"name": ..., "path": ...}  load an adapter file (needs --api-key)
    DELETE /v1/adapters/{name}      unload it (requests already decoding finish normally)
    GET  /health

The request's `model` names an adapter or the base. Extensions to the OpenAI parameters: `top_k`.
Unspecified temperature/top_p default to the paper's 0.1/0.75. Errors use OpenAI's body
{"error": {"message", "type", "param", "code"}}: 400 bad parameters or a prompt longer than the context,
401 missing/wrong key, 404 unknown model, 429 queue full.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llama_adapter.inference.chat import chat_prompt
from llama_adapter.inference.decoder import DecodeRequest, Event
from llama_adapter.inference.sampling import SamplingParams
from llama_adapter.model import Transformer
from llama_adapter.serving.engine import QueueFull, Scheduler

log = logging.getLogger("llama_adapter.serving.app")


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# ---- parameter parsing -----------------------------------------------------------------------------------
def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _opt(body: dict[str, Any], key: str, check: Any, what: str, default: Any = None) -> Any:
    v = body.get(key)
    if v is None:
        return default
    if not check(v):
        raise _bad(f"'{key}' must be {what}, got {json.dumps(v)[:60]}", param=key)
    return v


def _sampling(body: dict[str, Any], default_max: int) -> SamplingParams:
    num = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
    max_tokens = _opt(body, "max_completion_tokens", _is_int, "an integer", None)
    max_tokens = _opt(body, "max_tokens", _is_int, "an integer", max_tokens)
    if max_tokens is not None and max_tokens < 0:
        raise _bad("'max_tokens' must be >= 0", param="max_tokens")
    temperature = _opt(body, "temperature", num, "a number", 0.1)
    if temperature < 0:
        raise _bad("'temperature' must be >= 0", param="temperature")
    top_p = _opt(body, "top_p", num, "a number", 0.75)
    if not 0 < top_p <= 1:
        raise _bad("'top_p' must be in (0, 1]", param="top_p")
    top_k = _opt(body, "top_k", _is_int, "an integer", 0)
    if top_k < 0:
        raise _bad("'top_k' must be >= 0", param="top_k")
    seed = _opt(body, "seed", _is_int, "an integer", None)
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop = tuple(stop)
    else:
        raise _bad("'stop' must be a string or a list of strings", param="stop")
    stop = tuple(s for s in stop if s)
    n = _opt(body, "n", _is_int, "an integer", 1)
    if n != 1:
        raise _bad("only n=1 is supported", param="n")
    try:
        return SamplingParams(max_new_tokens=default_max if max_tokens is None else max_tokens,
                              temperature=temperature, top_p=top_p, top_k=top_k, stop=stop, seed=seed)
    except ValueError as e:
        raise _bad(str(e)) from None


def _data_url_image(url: str) -> Any:
    if not url.startswith("data:") or ";base64," not in url:
        raise _bad("image_url must be a base64 data URL (data:image/...;base64,...)", param="messages")
    try:
        raw = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
        from PIL import Image

        img = Image.open(io.BytesIO(raw))
        img.load()
        return img.convert("RGB")
    except (binascii.Error, ValueError, OSError) as e:
        raise _bad(f"image_url is not a readable image ({e})", param="messages") from None


def _messages(body: dict[str, Any]) -> tuple[list[tuple[str, str]], list[Any]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("'messages' must be a non-empty list", param="messages")
    out: list[tuple[str, str]] = []
    images: list[Any] = []
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise _bad("each message needs a role of system, user or assistant", param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, str):
            out.append((role, content))
            continue
        if not isinstance(content, list):
            raise _bad("message content must be a string or a list of parts", param="messages")
        texts = []
        for part in content:
            if not isinstance(part, dict):
                raise _bad("content parts must be objects", param="messages")
            if part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif part.get("type") == "image_url":
                iu = part.get("image_url")
                url = iu.get("url") if isinstance(iu, dict) else iu
                if not isinstance(url, str):
                    raise _bad("image_url needs a url", param="messages")
                images.append(_data_url_image(url))
            else:
                raise _bad(f"unsupported content part {str(part.get('type'))[:40]!r}", param="messages")
        out.append((role, "\n".join(texts)))
    if out[-1][0] != "user":
        raise _bad("the last message must be from the user", param="messages")
    if len(images) > 1:
        raise _bad("at most one image per request", param="messages")
    return out, images


# ---- the app -----------------------------------------------------------------------------------------------
class Server:
    def __init__(self, model: Transformer, base_name: str = "base", api_key: str | None = None,
                 max_batch_size: int = 8, max_queue: int = 64, max_context: int | None = None,
                 image_encoder: str | None = None) -> None:
        if model.tokenizer is None:
            raise ValueError("the server needs a model with a tokenizer")
        self.model, self.base_name, self.api_key = model, base_name, api_key
        self.scheduler = Scheduler(model, max_batch_size, max_queue, max_context)
        self.image_encoder_dir = image_encoder
        self._encoders: dict[str, Any] = {}
        self.created = int(time.time())

    # ---- helpers ------------------------------------------------------------------------------------
    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        if not secrets.compare_digest(token.encode(), self.api_key.encode()):
            raise APIError(401, "missing or invalid API key", type="authentication_error", code="invalid_api_key")

    def adapter_for(self, name: Any) -> str | None:
        if not isinstance(name, str):
            raise _bad("'model' must be a string", param="model")
        if name == self.base_name:
            return None
        if name in self.model.adapters:
            return name
        raise APIError(404, f"the model {name!r} does not exist (see GET /v1/models)", param="model",
                       code="model_not_found")

    def encode(self, prompt: str | list[int]) -> list[int]:
        tok = self.model.tokenizer
        assert tok is not None
        if isinstance(prompt, str):
            ids = tok.encode(prompt, bos=True)
        else:
            vocab = self.model.config.vocab_size
            if not all(_is_int(t) and 0 <= t < vocab for t in prompt):
                raise _bad(f"token ids must be integers in [0, {vocab})", param="prompt")
            ids = list(prompt)
        if not ids:
            raise _bad("the prompt is empty", param="prompt")
        limit = self.scheduler.max_len
        if len(ids) >= limit:
            raise _bad(f"the prompt has {len(ids)} tokens; this model's context is {limit} tokens",
                       param="prompt", code="context_length_exceeded")
        return ids

    def image_features(self, adapter: str | None, image: Any) -> Any:
        a = self.model.adapters[adapter] if adapter is not None else None
        if a is None or a.visual_proj is None:  # type: ignore[union-attr]
            raise _bad("this model does not take images", param="messages")
        enc_dir = a.meta.get("image_encoder") or self.image_encoder_dir  # type: ignore[union-attr]
        if not enc_dir:
            raise _bad("no image encoder is configured for this adapter (serve --image-encoder DIR)")
        try:
            from llama_adapter.multimodal.features import ImageEncoder
        except ImportError as e:
            raise APIError(500, f"image input is unavailable ({e})", type="server_error") from None
        if enc_dir not in self._encoders:
            self._encoders[enc_dir] = ImageEncoder.load(enc_dir, device=self.model.tok_embeddings.weight.device)
        return self._encoders[enc_dir].encode([image])

    async def run(self, request: Request, seqs: list[DecodeRequest]) -> asyncio.Queue[Event]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[Event] = asyncio.Queue()
        try:
            self.scheduler.submit(seqs, lambda ev: loop.call_soon_threadsafe(q.put_nowait, ev))
        except QueueFull as e:
            raise APIError(429, f"the server is busy ({e}); retry later", type="rate_limit_exceeded",
                           code="queue_full") from None
        return q

    def cancel(self, seqs: list[DecodeRequest]) -> None:
        for s in seqs:
            if not s.finished:
                self.scheduler.cancel(s)


def _error_from_seq(s: DecodeRequest) -> APIError:
    msg = s.error or "generation failed"
    if "no adapter named" in msg:
        return APIError(404, f"the model was removed: {msg}", code="model_not_found")
    return APIError(500, msg, type="server_error")


def create_app(model: Transformer, *, base_name: str = "base", api_key: str | None = None,
               max_batch_size: int = 8, max_queue: int = 64, max_context: int | None = None,
               image_encoder: str | None = None) -> FastAPI:
    srv = Server(model, base_name, api_key, max_batch_size, max_queue, max_context, image_encoder)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        srv.scheduler.start()
        try:
            yield
        finally:
            srv.scheduler.stop()

    app = FastAPI(title="llama-adapter", lifespan=lifespan)
    app.state.server = srv

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail), code=None).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return APIError(500, f"internal error: {type(exc).__name__}", type="server_error").response()

    async def body_of(request: Request) -> dict[str, Any]:
        srv.check_key(request)
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
            raise _bad("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object")
        return body

    @app.get("/health")
    async def health() -> dict[str, Any]:
        s = srv.scheduler
        return {"status": "ok", "running": s.running, "queued": s.queued, "adapters": list(model.adapters)}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        srv.check_key(request)
        data = [{"id": srv.base_name, "object": "model", "created": srv.created, "owned_by": "llama-adapter",
                 "root": srv.base_name, "parent": None}]
        for name, a in list(model.adapters.items()):
            data.append({"id": name, "object": "model", "created": srv.created, "owned_by": "llama-adapter",
                         "root": srv.base_name, "parent": srv.base_name,
                         "template": a.meta.get("template")})  # type: ignore[operator]
        return {"object": "list", "data": data}

    @app.post("/v1/adapters")
    async def add_adapter(request: Request) -> JSONResponse:
        body = await body_of(request)
        if srv.api_key is None:
            raise APIError(403, "adapters can be changed at run time only when the server has an API key",
                           type="permission_error")
        name, path = body.get("name"), body.get("path")
        if not isinstance(path, str) or not path:
            raise _bad("'path' must be the adapter file's path on the server", param="path")
        if name is None:
            from pathlib import Path

            name = Path(path).stem
        if not isinstance(name, str) or not name or name == srv.base_name or "." in name:
            raise _bad("'name' must be a non-empty string without '.', other than the base's name", param="name")
        from llama_adapter.errors import AdapterError

        with srv.scheduler.model_lock():
            if name in model.adapters:
                raise APIError(409, f"an adapter named {name!r} is already loaded; delete it first",
                               code="adapter_exists")
            try:
                model.load_adapter(path, name)
            except (AdapterError, ValueError, OSError) as e:
                raise _bad(str(e), param="path") from None
        srv.scheduler.forget_adapter(name)
        return JSONResponse({"id": name, "object": "model", "created": int(time.time()),
                             "owned_by": "llama-adapter", "root": srv.base_name, "parent": srv.base_name},
                            status_code=201)

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str, request: Request) -> dict[str, Any]:
        srv.check_key(request)
        if srv.api_key is None:
            raise APIError(403, "adapters can be changed at run time only when the server has an API key",
                           type="permission_error")
        with srv.scheduler.model_lock():
            if name not in model.adapters:
                raise APIError(404, f"no adapter named {name!r}", code="model_not_found")
            model.remove_adapter(name)
            srv.scheduler.decoder.forget_adapter(name)
        return {"id": name, "object": "model", "deleted": True}

    # ---- completions --------------------------------------------------------------------------------
    async def collect(request: Request, seqs: list[DecodeRequest]) -> list[str]:
        q = await srv.run(request, seqs)
        texts = [""] * len(seqs)
        left = len(seqs)
        try:
            while left:
                try:
                    ev = await asyncio.wait_for(q.get(), timeout=1.0)
                except TimeoutError:
                    if await request.is_disconnected():
                        return texts
                    continue
                texts[ev.seq.tag] += ev.text
                if ev.finished:
                    left -= 1
                    if ev.seq.finish_reason == "error":
                        raise _error_from_seq(ev.seq)
            return texts
        finally:
            srv.cancel(seqs)

    def usage(seqs: list[DecodeRequest]) -> dict[str, int]:
        p = sum(len(s.prompt_ids) for s in seqs)
        c = sum(len(s.out_ids) for s in seqs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    async def stream(request: Request, seqs: list[DecodeRequest], chunk: Any, include_usage: bool,
                     first: list[dict[str, Any]] | None = None) -> StreamingResponse:
        q = await srv.run(request, seqs)

        async def events() -> AsyncIterator[str]:
            left = len(seqs)
            try:
                for c in first or []:
                    yield sse(c)
                while left:
                    ev = await q.get()
                    s = ev.seq
                    if ev.finished:
                        left -= 1
                        if s.finish_reason == "error":
                            err = _error_from_seq(s)
                            yield sse({"error": {"message": err.message, "type": err.type, "param": None,
                                                 "code": err.code}})
                            return
                    if ev.text or ev.finished:
                        yield sse(chunk(s.tag, ev.text, s.finish_reason if ev.finished else None))
                if include_usage:
                    yield sse({**chunk(0, "", None), "choices": [], "usage": usage(seqs)})
                yield "data: [DONE]\n\n"
            finally:
                srv.cancel(seqs)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def stream_opts(body: dict[str, Any]) -> tuple[bool, bool]:
        st = _opt(body, "stream", lambda x: isinstance(x, bool), "a boolean", False)
        so = _opt(body, "stream_options", lambda x: isinstance(x, dict), "an object", {})
        return st, bool(so.get("include_usage"))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await body_of(request)
        adapter = srv.adapter_for(body.get("model"))
        params = _sampling(body, default_max=16)
        st, include_usage = stream_opts(body)
        prompt = body.get("prompt")
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt)):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
            prompts = prompt
        else:
            raise _bad("'prompt' must be a string, a list of strings, or token ids", param="prompt")
        if len(prompts) > srv.scheduler.max_queue + srv.scheduler.decoder.max_batch:
            raise _bad("too many prompts in one request", param="prompt")
        seqs = [DecodeRequest(srv.encode(p), adapter, params, tag=i) for i, p in enumerate(prompts)]
        rid, created, name = f"cmpl-{uuid.uuid4().hex}", int(time.time()), body["model"]

        def chunk(i: int, text: str, finish: str | None) -> dict[str, Any]:
            return {"id": rid, "object": "text_completion", "created": created, "model": name,
                    "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": finish}]}

        if st:
            return await stream(request, seqs, chunk, include_usage)
        texts = await collect(request, seqs)
        return {"id": rid, "object": "text_completion", "created": created, "model": name,
                "choices": [{"index": i, "text": t, "logprobs": None, "finish_reason": s.finish_reason}
                            for i, (t, s) in enumerate(zip(texts, seqs, strict=True))],
                "usage": usage(seqs)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await body_of(request)
        adapter = srv.adapter_for(body.get("model"))
        params = _sampling(body, default_max=256)
        st, include_usage = stream_opts(body)
        msgs, images = _messages(body)
        template = model.adapters[adapter].meta.get("template") if adapter is not None else None  # type: ignore[operator]
        try:
            prompt = chat_prompt(msgs, template or None)
        except ValueError as e:
            raise APIError(500, f"the adapter's template cannot be used: {e}", type="server_error") from None
        feats = await asyncio.to_thread(srv.image_features, adapter, images[0]) if images else None
        seqs = [DecodeRequest(srv.encode(prompt), adapter, params, image_features=feats, tag=0)]
        rid, created, name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body["model"]

        def chunk(i: int, text: str, finish: str | None) -> dict[str, Any]:
            delta = {"content": text} if text else {}
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                    "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        if st:
            first = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                     "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}]}
            return await stream(request, seqs, chunk, include_usage, first=[first])
        texts = await collect(request, seqs)
        return {"id": rid, "object": "chat.completion", "created": created, "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": texts[0]},
                             "logprobs": None, "finish_reason": seqs[0].finish_reason}],
                "usage": usage(seqs)}

    return app
