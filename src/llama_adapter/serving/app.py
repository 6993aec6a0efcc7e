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
    GET  /health                    status and counts (no names: it needs no key)
    GET  /metrics                   Prometheus metrics (`serving.metrics`)

The request's `model` names an adapter or the base; an adapter of the registry (`serving.registry`: an
--adapter-dir file, or one evicted past --max-adapters) that is not resident is loaded on its first request.
Extensions to the OpenAI parameters: `top_k`, image content parts (and OpenAI's `input_audio` parts, and vLLM's
`video_url` ones, for adapters trained with audio or video). Completions take `n`, `best_of`, `echo` and
`logprobs`, chats `n`, `logprobs` and `top_logprobs`: log-probabilities are the model's own (log_softmax of the
logits before temperature/top-p/top-k). Bodies are `protocol.CompletionBody` / `ChatBody` (shown in /docs).
Unspecified temperature/top_p default to the paper's 0.1/0.75. Errors use OpenAI's body
{"error": {"message", "type", "param", "code"}}: 400 bad parameters or a prompt longer than the context,
401 missing/wrong key, 404 unknown model, 413 a body over --max-body-mb, 429 queue full, 503 shutting down.

Shutdown (`GracefulServer`, what `serve` runs): on SIGTERM the server stops accepting connections, lets requests in
flight finish for a grace period, then ends the rest with a final event (an SSE error event, then [DONE]; a 503
for a non-streaming request) and exits 0.

Hostile traffic: the body is read up to its limit, JSON is parsed, and prompts are tokenised and images decoded
in worker threads, so one huge request never stalls the event loop (and /health) for the others; an image is
decoded only for a model that takes images, and only when its header claims at most `max_image_pixels` pixels.

This module holds `Server` (the model, its adapters, the key check, encoding, image features and the requests'
way to and from the `Engine`), the routes (module-level functions that find the `Server` in `app.state`) and
`create_app`, which wires them. Parsing is in `serving.protocol`, response bodies and SSE in `serving.responses`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from torch import Tensor

from llama_adapter.errors import AdapterError, TemplateError, UserError
from llama_adapter.inference.decoder import DecodeRequest, Event
from llama_adapter.inference.sampling import SamplingParams
from llama_adapter.model import Transformer
from llama_adapter.prompting import RenderedPrompt, describe_template, render_chat, resolve_template
from llama_adapter.serving import responses
from llama_adapter.serving.engine import Engine, EngineStopped, QueueFull
from llama_adapter.serving.metrics import AccessMiddleware, Metrics, current_access, note_model
from llama_adapter.serving.protocol import (
    APIError,
    ChatBody,
    CompletionBody,
    Message,
    Prompt,
    StreamOptions,
    bad,
    error_from_seq,
    openapi_request,
    parse_adapter_request,
    parse_body,
    parse_chat_request,
    parse_completion_request,
)
from llama_adapter.serving.registry import AdapterRegistry
from llama_adapter.serving.responses import Reply
from llama_adapter.zero_init_attention import VisualProjection

log = logging.getLogger("llama_adapter.serving.app")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DEFAULT_MAX_BODY_MB = 8.0
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
MAX_DEPTH = 64  # JSON nesting a request may have; deeper is refused before anything walks it recursively

if TYPE_CHECKING:
    from PIL.Image import Image


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
        max_body_mb: float = DEFAULT_MAX_BODY_MB,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        audio_encoder: str | None = None,
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
        if max_body_mb <= 0 or max_image_pixels < 1:
            raise ValueError("max_body_mb and max_image_pixels must be positive")
        self.max_body_bytes = int(max_body_mb * 1024 * 1024)
        self.max_image_pixels = max_image_pixels
        self.metrics = Metrics(self.engine, self.registry)
        self.engine.observer = self.metrics
        self.image_encoder_dir = image_encoder
        self.audio_encoder_dir = audio_encoder
        self._encoders: dict[str, Any] = {}
        self._media: Any = None  # multimodal.modalities.AdapterEncoders, made on the first audio/multi request
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
        note_model(name)
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
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate: no text the tokenizer can take
                raise bad("the prompt is not valid Unicode text (a lone UTF-16 surrogate)", param="prompt") from None
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

    async def encode_async(self, prompt: Prompt, bos: bool = True) -> list[int]:
        """`encode` in a worker thread: tokenising a prompt of megabytes takes seconds the event loop (every other
        request, /health) must not wait."""
        return await asyncio.to_thread(self.encode, prompt, bos)

    def takes_images(self, name: str) -> bool | None:
        """Whether model `name` takes images: None when that is not known yet (an adapter not resident)."""
        if name == self.base_name:
            return False
        a = self.model.adapters[name] if name in self.model.adapters else None
        return None if a is None else a.visual_proj is not None

    def open_images(self, model: str, urls: Sequence[str]) -> list[Image]:
        """A chat's images (data URLs, from its parsed messages) with only their headers read: 400 when the model
        does not take images, or when an image claims more than `max_image_pixels` pixels (or is a decompression
        bomb by Pillow's measure). Their pixels are decoded later, by `image_features`, for a model that takes
        them. Blocking (base64 decoding): call it in a worker thread."""
        if urls and self.takes_images(model) is False:
            raise bad("this model does not take images", param="messages")
        return [open_image(url, self.max_image_pixels) for url in urls]

    def image_features(self, adapter: str | None, image: Image) -> Tensor:
        """Features of `image` (from `open_images`: its pixels are decoded here, once the model is known to take
        images) from the adapter's image encoder (loaded once per directory). Blocking: call it in a worker
        thread."""
        a = self.model.adapters[adapter] if adapter is not None and adapter in self.model.adapters else None
        if a is None or a.visual_proj is None:
            raise bad("this model does not take images", param="messages")
        enc_dir = a.meta.get("image_encoder") or self.image_encoder_dir
        if not enc_dir:
            raise bad("no image encoder is configured for this adapter (serve --image-encoder DIR)")
        try:
            image.load()
            image = image.convert("RGB")
        except (OSError, ValueError) as e:
            raise bad(f"image_url is not a readable image ({e})", param="messages") from None
        if enc_dir not in self._encoders:
            from llama_adapter.multimodal.encoder import ImageEncoder

            self._encoders[enc_dir] = ImageEncoder.load(enc_dir, device=self.model.tok_embeddings.weight.device)
        return self._encoders[enc_dir].encode([image])

    def condition_features(
        self, adapter: str | None, images: Sequence[Image], audios: Sequence[str], videos: Sequence[str] = ()
    ) -> Tensor:
        """The condition vector of a chat's image (from `open_images`), audio clip and video (data URLs) for the
        adapter's projection, each through the adapter's own encoder for its modality (the one it records, else
        `--image-encoder` / `--audio-encoder`). 400 when the model does not take one of them, a clip cannot be
        decoded, or a video's frames claim more than `max_image_pixels` pixels. Blocking: call it in a worker
        thread."""
        a = self.model.adapters[adapter] if adapter is not None and adapter in self.model.adapters else None
        if not audios and not videos and a is not None and isinstance(a.visual_proj, VisualProjection):
            return self.image_features(adapter, images[0])  # an image adapter as before eq. 10 was widened
        if a is None or a.visual_proj is None:
            what = "audio" if audios else "video" if videos else "images"
            raise bad(f"this model does not take {what}", param="messages")
        from llama_adapter.multimodal.modalities import AdapterEncoders

        if self._media is None:
            dirs = {"image": self.image_encoder_dir, "audio": self.audio_encoder_dir}
            self._media = AdapterEncoders(self.model.tok_embeddings.weight.device, defaults=dirs)
        inputs: dict[str, Any] = {}
        if images:
            try:
                images[0].load()
                inputs["image"] = images[0].convert("RGB")
            except (OSError, ValueError) as e:
                raise bad(f"image_url is not a readable image ({e})", param="messages") from None
        if audios:
            inputs["audio"] = audios[0]
        try:
            if videos:
                inputs["video"] = self._video_bytes(videos[0])
            return cast(Tensor, self._media.features(a, inputs, adapter_label="this model"))
        except UserError as e:
            raise bad(str(e), param="messages") from None

    def _video_bytes(self, url: str) -> bytes:
        """A video_url's bytes, once its header's frame size is within `max_image_pixels` (a clip is decoded frame
        by frame into images, so a frame is held to an image's limit)."""
        from llama_adapter.errors import VideoError
        from llama_adapter.multimodal.media import read_media
        from llama_adapter.multimodal.video import frame_size

        data, _ = read_media(url, VideoError, "video")
        w, h = frame_size(data)
        if w * h > self.max_image_pixels:
            raise bad(
                f"video_url frames of {w} x {h} pixels are over this server's limit of {self.max_image_pixels}",
                param="messages",
            )
        return data

    # ---- decoding ------------------------------------------------------------------------------------------
    def submit(self, seqs: list[DecodeRequest]) -> asyncio.Queue[Event]:
        """Queue `seqs` on the engine; their events arrive on the returned queue (call from the event loop)."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[Event] = asyncio.Queue()
        rec = current_access.get()

        def sink(ev: Event) -> None:  # called from the engine thread
            if ev.finished and rec is not None:  # the access log's token counts
                rec.prompt_tokens += len(ev.seq.prompt_ids)
                rec.completion_tokens += len(ev.seq.out_ids)
            loop.call_soon_threadsafe(q.put_nowait, ev)

        try:
            self.engine.submit(seqs, sink)
        except QueueFull as e:
            raise APIError(
                429, f"the server is busy ({e}); retry later", type="rate_limit_exceeded", code="queue_full"
            ) from None
        except EngineStopped as e:  # a kept-alive connection's request after shutdown began
            raise APIError(503, str(e), type="server_error", code="server_shutting_down") from None
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

    def token_text(self, token: int) -> str:
        """A token's text, for logprobs (special tokens are empty, as in the generated text)."""
        tok = self.model.tokenizer
        assert tok is not None
        return tok.decode([token])

    def stream(
        self,
        reply: Reply,
        seqs: list[DecodeRequest],
        include_usage: bool,
        echo: Sequence[str] = (),
        n: int = 1,
    ) -> StreamingResponse:
        """The SSE response of `seqs` (`echo`: each one's prompt text, sent first; `n` in a row share a prompt);
        they are cancelled when the stream ends or the client goes away."""
        q = self.submit(seqs)
        lp = responses.StreamLogprobs(self.token_text, echo)

        async def events() -> AsyncIterator[str]:
            try:
                async for line in responses.sse_events(reply, q, seqs, include_usage, lp, n):
                    yield line
            finally:
                self.cancel(seqs)

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    async def respond(
        self,
        request: Request,
        reply: Reply,
        seqs: list[DecodeRequest],
        opts: StreamOptions,
        echo: Sequence[str] = (),
        n: int = 1,
        best_of: int = 1,
        show_logprobs: bool = True,
    ) -> Any:
        """Stream `seqs`, or wait for them and answer the whole body. Completions: `echo` is each sequence's prompt
        text to put first; `best_of` sequences in a row share a prompt, of which the `n` with the highest
        total logprob are returned (their logprobs shown only when `show_logprobs`)."""
        if opts.stream:
            return self.stream(reply, seqs, opts.include_usage, echo, n)
        texts = await self.collect(seqs, request.is_disconnected)
        if reply.kind == "chat":
            return responses.chat_body(reply, texts, seqs, self.token_text)
        if echo:
            texts = [e + t for e, t in zip(echo, texts, strict=True)]
        if best_of == n:
            return responses.completion_body(reply, texts, seqs, self.token_text, bool(echo), n=n)
        keep = []
        for start in range(0, len(seqs), best_of):
            group = range(start, start + best_of)
            keep += sorted(group, key=lambda i: -sum(e.logprob for e in seqs[i].out_logprobs))[:n]
        body = responses.completion_body(
            reply, [texts[i] for i in keep], [seqs[i] for i in keep], self.token_text, bool(echo), seqs, best_of
        )
        if not show_logprobs:  # logprobs were only wanted for the ranking
            for c in body["choices"]:
                c["logprobs"] = None
        return body


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def open_image(url: str, max_pixels: int) -> Image:
    """The image of a base64 data URL, its header read and its pixels not yet decoded; 400 when it is no image,
    claims more than `max_pixels` pixels, or is a decompression bomb by Pillow's own measure."""
    import base64
    import binascii
    import io

    from PIL import Image as PILImage

    if not url.startswith("data:") or ";base64," not in url:
        raise bad("image_url must be a base64 data URL (data:image/...;base64,...)", param="messages")
    try:
        img = PILImage.open(io.BytesIO(base64.b64decode(url.split(";base64,", 1)[1], validate=True)))
    except (binascii.Error, ValueError, OSError, PILImage.DecompressionBombError) as e:
        raise bad(f"image_url is not a readable image ({e})", param="messages") from None
    w, h = img.size
    if w * h > max_pixels:
        raise bad(f"the image is {w}x{h}; at most {max_pixels} pixels are accepted", param="messages")
    return img


# ---- routes -------------------------------------------------------------------------------------------------
def server_of(request: Request) -> Server:
    return request.app.state.server


def too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is over the server's limit of {limit} bytes", code="request_too_large")


async def read_raw(request: Request, limit: int) -> bytes:
    """The body, at most `limit` bytes: 413 as soon as Content-Length or the bytes read so far pass it (a client
    cannot make the server hold more than the limit in memory)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_body(request: Request) -> dict[str, Any]:
    """The checked key, then the JSON object body (size-limited; parsed in a worker thread)."""
    srv = server_of(request)
    srv.check_key(request.headers)
    raw = await read_raw(request, srv.max_body_bytes)
    return await asyncio.to_thread(load_body, raw)


def check_json_value(body: Any) -> None:
    """400 for JSON nested deeper than MAX_DEPTH or a string with a lone surrogate ("\\ud800" is valid JSON but
    no UTF-8 text: the tokenizer, templates and logs would fail on it later, as a 500). Iterative, so the check
    itself cannot overflow the stack."""
    stack: list[tuple[Any, int]] = [(body, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise bad("the request has a string with a lone UTF-16 surrogate (not valid Unicode text)") from None
        elif isinstance(v, (dict, list)):
            if depth > MAX_DEPTH:
                raise bad(f"the request body is nested more than {MAX_DEPTH} levels deep")
            items = [*v.keys(), *v.values()] if isinstance(v, dict) else v
            stack.extend((x, depth + 1) for x in items)


def load_body(raw: bytes) -> dict[str, Any]:
    """`parse_body`, with the hostile cases made 400s (deep nesting, lone surrogates). CPU-bound on a big body: a
    worker thread's."""
    try:
        body = parse_body(raw)
    except RecursionError:  # nesting deeper than the interpreter's stack
        raise bad(f"the request body is nested more than {MAX_DEPTH} levels deep") from None
    check_json_value(body)
    return body


async def health(request: Request) -> dict[str, Any]:
    """Liveness and load, without adapter names: it answers without a key, and names are what /v1/models
    guards."""
    srv = server_of(request)
    e = srv.engine
    return {"status": "ok", "running": e.running, "queued": e.queued, "adapters": len(srv.model.adapters)}


async def metrics(request: Request) -> Response:
    """Prometheus text format; needs no key (like /health), and tells only counts and timings."""
    body = generate_latest(server_of(request).metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


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


def choice_params(sampling: SamplingParams, j: int) -> SamplingParams:
    """Choice `j`'s settings: with a seed, choice j samples with seed + j (reproducible, yet not n copies)."""
    return sampling if j == 0 or sampling.seed is None else replace(sampling, seed=sampling.seed + j)


async def completions(request: Request) -> Any:
    """POST /v1/completions (body: `protocol.CompletionBody`): `best_of` sequences per prompt (the `n` with the
    highest total logprob returned), `echo`, legacy `logprobs`."""
    srv = server_of(request)
    body = await read_body(request)
    req = parse_completion_request(body)
    k = req.best_of
    if len(req.prompts) * k > srv.engine.capacity:
        raise bad("too many prompts (times n or best_of) in one request", param="prompt")
    # best_of > n ranks by logprob: record it (for the ranking only, when not asked for)
    lp = req.logprobs if req.logprobs is not None else (0 if k > req.n else None)
    adapter = await srv.acquire(req.model)
    try:
        ids = [await srv.encode_async(p) for p in req.prompts]
        tok = srv.model.tokenizer
        assert tok is not None
        seqs = [
            DecodeRequest(
                x, adapter, choice_params(req.sampling, j), tag=i * k + j, logprobs=lp, echo_logprobs=req.echo
            )
            for i, x in enumerate(ids)
            for j in range(k)
        ]
        echo: list[str] = []
        if req.echo:
            texts = [p if isinstance(p, str) else tok.decode(p) for p in req.prompts]
            echo = [texts[i] for i in range(len(req.prompts)) for _ in range(k)]
        reply = Reply.new("completion", req.model)
        return await srv.respond(request, reply, seqs, req.stream, echo, req.n, k, req.logprobs is not None)
    finally:
        srv.release(adapter)


async def chat_completions(request: Request) -> Any:
    srv = server_of(request)
    body = await read_body(request)
    req = parse_chat_request(body)
    images = await asyncio.to_thread(srv.open_images, req.model, req.images) if req.images else []
    adapter = await srv.acquire(req.model)
    try:
        prompt = await asyncio.to_thread(srv.render_chat, adapter, req.messages)
        media = images or req.audios or req.videos
        feats = (
            await asyncio.to_thread(srv.condition_features, adapter, images, req.audios, req.videos) if media else None
        )
        ids = await srv.encode_async(prompt.text, bos=prompt.bos)
        sep = prompt.strip_separator
        seqs = [
            DecodeRequest(
                ids,
                adapter,
                choice_params(req.sampling, j),
                image_features=feats,
                tag=j,
                strip_separator=sep,
                logprobs=req.logprobs,
            )
            for j in range(req.n)
        ]
        return await srv.respond(request, Reply.new("chat", req.model), seqs, req.stream, n=req.n)
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


class GracefulServer(uvicorn.Server):
    """uvicorn's server with a shutdown that never tears a stream: uvicorn alone waits, without limit, for every
    response to end before the app's lifespan shutdown stops the engine (a stream of 4000 tokens keeps the process
    alive for minutes), and after a SIGTERM it re-raises the signal, so the process dies by it (exit -15).

    Here shutdown closes the listening sockets, then drains the engine (`Engine.drain`: requests in flight finish
    for `grace_s` seconds, the rest end with a final event), then lets uvicorn close the now-finished connections;
    SIGTERM, handled so, is not re-raised: `serve` exits 0. SIGINT keeps uvicorn's behaviour.
    """

    def __init__(self, config: uvicorn.Config, grace_s: float = 5.0) -> None:
        super().__init__(config)
        self.grace_s = grace_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:  # stop accepting first (closing again in super().shutdown is harmless)
            server.close()
        srv = getattr(getattr(self.config.app, "state", None), "server", None)
        if isinstance(srv, Server):
            await asyncio.to_thread(srv.engine.drain, self.grace_s)
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        with super().capture_signals():
            try:
                yield
            finally:  # a SIGTERM was a request to stop, and stopping went well: do not die by it afterwards
                self._captured_signals[:] = [s for s in self._captured_signals if s != signal.SIGTERM]


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
    max_body_mb: float = DEFAULT_MAX_BODY_MB,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    log_format: str = "text",
    audio_encoder: str | None = None,
) -> FastAPI:
    """The FastAPI app serving `model` and its adapters; `app.state.server` is its `Server`. Every request goes
    through `AccessMiddleware` (one log line, the request counter of /metrics)."""
    app = FastAPI(title="llama-adapter", lifespan=lifespan)
    srv = Server(
        model,
        base_name,
        api_key,
        max_batch_size,
        max_queue,
        max_context,
        image_encoder,
        adapter_dir,
        max_adapters,
        max_body_mb,
        max_image_pixels,
        audio_encoder,
    )
    app.state.server = srv
    app.add_middleware(AccessMiddleware, metrics=srv.metrics, log_format=log_format)
    app.add_exception_handler(APIError, on_api_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, on_http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, on_internal_error)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/v1/adapters", add_adapter, methods=["POST"])
    app.add_api_route("/v1/adapters/{name}", delete_adapter, methods=["DELETE"])
    app.add_api_route("/v1/completions", completions, methods=["POST"], openapi_extra=openapi_request(CompletionBody))
    app.add_api_route(
        "/v1/chat/completions", chat_completions, methods=["POST"], openapi_extra=openapi_request(ChatBody)
    )
    return app
