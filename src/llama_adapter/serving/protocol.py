"""The server's wire protocol on the way in: `APIError` (OpenAI-shaped error bodies) and request parsing.

Request bodies (already decoded JSON objects) are checked by hand and turned into plain typed values:
`SamplingParams`, the prompts of a completion, the messages and images of a chat, the stream options and the
name/path of an adapter to load. Every rejection is an `APIError` whose message, status and `param` are what
clients see. (A later change replaces the hand-written checks with pydantic models.)
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llama_adapter.adapter_file import check_adapter_name
from llama_adapter.errors import AdapterError
from llama_adapter.inference.decoder import DecodeRequest
from llama_adapter.inference.sampling import SamplingParams

if TYPE_CHECKING:
    from PIL.Image import Image

ROLES = ("system", "user", "assistant", "developer")
Prompt = str | list[int]
Message = tuple[str, str]


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class APIError(Exception):
    """An error answered to the client with HTTP `status` and an OpenAI-shaped body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 invalid_request_error."""
    return APIError(400, message, param=param, code=code)


def error_from_seq(seq: DecodeRequest) -> APIError:
    """The error of a sequence that finished with finish_reason "error" (404 when its adapter went away)."""
    msg = seq.error or "generation failed"
    if "no adapter named" in msg:
        return APIError(404, f"the model was removed: {msg}", code="model_not_found")
    return APIError(500, msg, type="server_error")


# ---- typed values ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamOptions:
    """`stream` and `stream_options.include_usage` of a request."""

    stream: bool = False
    include_usage: bool = False


@dataclass
class CompletionRequest:
    """A /v1/completions request: one or more prompts (text or token ids)."""

    model: str
    sampling: SamplingParams
    stream: StreamOptions
    prompts: list[Prompt]


@dataclass
class ChatRequest:
    """A /v1/chat/completions request: (role, text) messages ending with the user's, and at most one image."""

    model: str
    sampling: SamplingParams
    stream: StreamOptions
    messages: list[Message]
    images: list[Image] = field(default_factory=list)


# ---- checks -----------------------------------------------------------------------------------------------------
def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def optional(body: dict[str, Any], key: str, check: Callable[[Any], bool], what: str, default: Any = None) -> Any:
    """body[key] if present and not null (rejected unless `check` passes), else `default`."""
    v = body.get(key)
    if v is None:
        return default
    if not check(v):
        raise bad(f"'{key}' must be {what}, got {json.dumps(v)[:60]}", param=key)
    return v


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        raise bad("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    return body


def parse_model(body: dict[str, Any]) -> str:
    """The requested model's name (an adapter or the base)."""
    name = body.get("model")
    if not isinstance(name, str):
        raise bad("'model' must be a string", param="model")
    return name


def parse_stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise bad("'stop' must be a string or a list of strings", param="stop")
    return tuple(s for s in stop if s)


def parse_sampling(body: dict[str, Any], default_max: int) -> SamplingParams:
    """Sampling parameters; unspecified temperature/top_p are the paper's 0.1/0.75. `top_k` is an extension."""
    max_tokens = optional(body, "max_completion_tokens", is_int, "an integer", None)
    max_tokens = optional(body, "max_tokens", is_int, "an integer", max_tokens)
    if max_tokens is not None and max_tokens < 0:
        raise bad("'max_tokens' must be >= 0", param="max_tokens")
    temperature = optional(body, "temperature", is_number, "a number", 0.1)
    if temperature < 0:
        raise bad("'temperature' must be >= 0", param="temperature")
    top_p = optional(body, "top_p", is_number, "a number", 0.75)
    if not 0 < top_p <= 1:
        raise bad("'top_p' must be in (0, 1]", param="top_p")
    top_k = optional(body, "top_k", is_int, "an integer", 0)
    if top_k < 0:
        raise bad("'top_k' must be >= 0", param="top_k")
    seed = optional(body, "seed", is_int, "an integer", None)
    stop = parse_stop(body)
    if optional(body, "n", is_int, "an integer", 1) != 1:
        raise bad("only n=1 is supported", param="n")
    max_new = default_max if max_tokens is None else max_tokens
    try:
        return SamplingParams(
            max_new_tokens=max_new, temperature=temperature, top_p=top_p, top_k=top_k, stop=stop, seed=seed
        )
    except ValueError as e:
        raise bad(str(e)) from None


def parse_stream_options(body: dict[str, Any]) -> StreamOptions:
    stream = optional(body, "stream", lambda x: isinstance(x, bool), "a boolean", False)
    opts = optional(body, "stream_options", lambda x: isinstance(x, dict), "an object", {})
    return StreamOptions(stream, bool(opts.get("include_usage")))


def parse_prompts(body: dict[str, Any]) -> list[Prompt]:
    """`prompt`: a string, token ids, or a list of either."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt)):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        return prompt
    raise bad("'prompt' must be a string, a list of strings, or token ids", param="prompt")


def parse_completion_request(body: dict[str, Any]) -> CompletionRequest:
    model = parse_model(body)
    sampling = parse_sampling(body, default_max=16)
    stream = parse_stream_options(body)
    return CompletionRequest(model, sampling, stream, parse_prompts(body))


def parse_chat_request(body: dict[str, Any]) -> ChatRequest:
    model = parse_model(body)
    sampling = parse_sampling(body, default_max=256)
    stream = parse_stream_options(body)
    messages, images = parse_messages(body)
    return ChatRequest(model, sampling, stream, messages, images)


def decode_data_url_image(url: str) -> Image:
    """An RGB image from a `data:image/...;base64,...` URL."""
    if not url.startswith("data:") or ";base64," not in url:
        raise bad("image_url must be a base64 data URL (data:image/...;base64,...)", param="messages")
    try:
        raw = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
        from PIL import Image

        img = Image.open(io.BytesIO(raw))
        img.load()
        return img.convert("RGB")
    except (binascii.Error, ValueError, OSError) as e:
        raise bad(f"image_url is not a readable image ({e})", param="messages") from None


def parse_content(content: list[Any], images: list[Image]) -> str:
    """The text of a list of content parts; image parts are decoded into `images`."""
    texts = []
    for part in content:
        if not isinstance(part, dict):
            raise bad("content parts must be objects", param="messages")
        if part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif part.get("type") == "image_url":
            iu = part.get("image_url")
            url = iu.get("url") if isinstance(iu, dict) else iu
            if not isinstance(url, str):
                raise bad("image_url needs a url", param="messages")
            images.append(decode_data_url_image(url))
        else:
            raise bad(f"unsupported content part {str(part.get('type'))[:40]!r}", param="messages")
    return "\n".join(texts)


def parse_message(m: Any, images: list[Image]) -> Message:
    """One message as (role, text); "developer" is a system message."""
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise bad("each message needs a role of system, user or assistant", param="messages")
    role = "system" if m["role"] == "developer" else m["role"]
    content = m.get("content")
    if content is None and role == "assistant":
        content = ""
    if isinstance(content, str):
        return role, content
    if not isinstance(content, list):
        raise bad("message content must be a string or a list of parts", param="messages")
    return role, parse_content(content, images)


def parse_messages(body: dict[str, Any]) -> tuple[list[Message], list[Image]]:
    """`messages` as [(role, text)] ending with a user turn, and the images of their content parts (at most 1)."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty list", param="messages")
    images: list[Image] = []
    out = [parse_message(m, images) for m in msgs]
    if out[-1][0] != "user":
        raise bad("the last message must be from the user", param="messages")
    if len(images) > 1:
        raise bad("at most one image per request", param="messages")
    return out, images


def parse_adapter_request(body: dict[str, Any], base_name: str) -> tuple[str, str]:
    """(name, path) of POST /v1/adapters; the name defaults to the file's stem."""
    name, path = body.get("name"), body.get("path")
    if not isinstance(path, str) or not path:
        raise bad("'path' must be the adapter file's path on the server", param="path")
    if name is None:
        name = Path(path).stem
    if name == base_name:
        raise bad(f"'name' must not be the base's model id {base_name!r}", param="name")
    try:
        return check_adapter_name(name), path
    except AdapterError as e:
        raise bad(str(e), param="name") from None
