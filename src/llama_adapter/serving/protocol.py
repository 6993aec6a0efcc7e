"""The server's wire protocol on the way in: request bodies as pydantic models, `APIError` (OpenAI-shaped errors).

`CompletionBody` and `ChatBody` are what FastAPI validates the JSON against (and what `/docs` and `/openapi.json`
show, our extensions `top_k` and image content parts included); a validation error becomes an OpenAI 400 naming
the parameter (`validation_error`). The bodies are then turned into plain typed values (`CompletionRequest`,
`ChatRequest`): `SamplingParams`, which stays the one judge of sampling values (its `SamplingError` becomes a 400
on the request's own parameter name), the prompts, the messages and decoded images, the stream options.
Types are checked strictly (`"3"` is not an integer, `true` not a number), as the hand-written checks did.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llama_adapter.adapter_file import check_adapter_name
from llama_adapter.errors import AdapterError
from llama_adapter.inference.decoder import DecodeRequest
from llama_adapter.inference.sampling import SamplingError, SamplingParams
from llama_adapter.serving.engine import SHUTTING_DOWN

if TYPE_CHECKING:
    pass

ROLES = ("system", "user", "assistant", "developer")
Prompt = str | list[int]
Message = tuple[str, str]
MAX_N = 16  # choices (n, best_of) per prompt: each is a sequence in the batch
MAX_LOGPROBS = 20  # OpenAI's limit on alternatives per token


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
    """The error of a sequence that finished with finish_reason "error" (404 when its adapter went away, 503 when
    the server cut it short to shut down: the client may retry elsewhere)."""
    msg = seq.error or "generation failed"
    if "no adapter named" in msg:
        return APIError(404, f"the model was removed: {msg}", code="model_not_found")
    if msg == SHUTTING_DOWN:
        return APIError(503, msg, type="server_error", code="server_shutting_down")
    return APIError(500, msg, type="server_error")


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# ---- request bodies ----------------------------------------------------------------------------------------
class Strict(BaseModel):
    """Strict types (no "3" for 3, no true for 1); unknown fields are ignored, as OpenAI's own clients send some."""

    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptionsBody(BaseModel):
    """`stream_options` (lax: `include_usage: 1` counts as true, as before)."""

    include_usage: bool = False


class StreamFields(Strict):
    stream: bool | None = Field(False, description="answer with server-sent events")
    stream_options: StreamOptionsBody | None = None


NonNegative = Annotated[int, Field(ge=0)]
Choices = Annotated[int, Field(ge=1, le=MAX_N)]
TopLogprobs = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]


class SamplingFields(Strict):
    """The sampling parameters both endpoints share. Only types are checked here; the values' ranges are
    `SamplingParams`'s to judge (see `sampling_params`)."""

    max_tokens: int | None = Field(None, description="tokens to generate (completions: 16, chat: 256)")
    max_completion_tokens: int | None = Field(None, description="the same; `max_tokens` wins when both are set")
    temperature: float | None = Field(None, description="0: greedy; unspecified: the paper's 0.1")
    top_p: float | None = Field(None, description="nucleus sampling in (0, 1]; unspecified: the paper's 0.75")
    top_k: int | None = Field(None, description="extension: keep the k most likely tokens (0: no cut)")
    stop: str | list[str] | None = Field(None, description="strings that end the text (not included)")
    seed: int | None = Field(None, description="reproducible sampling, whatever else is in the batch")
    n: Choices | None = Field(None, description="independent choices per prompt (choice i uses seed + i)")


class PromptField(Strict):
    prompt: str | list[int] | list[str | list[int]] = Field(
        description="a string, token ids, or a list of either (one choice per prompt)"
    )


class CompletionBody(SamplingFields, StreamFields, PromptField):
    """POST /v1/completions."""

    model: str
    echo: bool | None = Field(False, description="return the prompt before the completion")
    logprobs: TopLogprobs | None = Field(
        None, description="each token's logprob and this many alternatives (the model's own, before sampling)"
    )
    best_of: Choices | None = Field(None, description="sample this many per prompt, return the n most likely")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ImageURL(Strict):
    url: str = Field(description="a base64 data URL: data:image/...;base64,...")
    detail: str | None = None


class ImagePart(Strict):
    """Extension: an image for a multi-modal adapter (at most one per request)."""

    type: Literal["image_url"]
    image_url: ImageURL | str


class InputAudio(Strict):
    data: str = Field(description="the clip, base64-encoded")
    format: Literal["wav", "mp3", "flac", "ogg"] = Field(description="its container format")


class AudioPart(Strict):
    """OpenAI's audio input part: a clip for an adapter trained with audio (at most one per request)."""

    type: Literal["input_audio"]
    input_audio: InputAudio


class VideoURL(Strict):
    url: str = Field(description="a base64 data URL: data:video/...;base64,...")


class VideoPart(Strict):
    """Extension (vLLM's `video_url` part): a video for an adapter trained with video (at most one per request)."""

    type: Literal["video_url"]
    video_url: VideoURL | str


ContentPart = Annotated[TextPart | ImagePart | AudioPart | VideoPart, Field(discriminator="type")]


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class MessagesField(Strict):
    messages: list[ChatMessage] = Field(min_length=1)


class ChatBody(SamplingFields, StreamFields, MessagesField):
    """POST /v1/chat/completions."""

    model: str
    logprobs: bool | None = Field(False, description="each generated token's logprob (the model's own)")
    top_logprobs: TopLogprobs | None = Field(None, description="alternatives per token (needs logprobs)")


class AdapterBody(Strict):
    """POST /v1/adapters."""

    path: str = Field(description="the adapter file's path on the server")
    name: str | None = Field(None, description="default: the file's stem")


# ---- validation errors ------------------------------------------------------------------------------------
TYPE_NAMES = {
    "float_type": "a number",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "bool_type": "a boolean",
    "string_type": "a string",
    "model_type": "an object",
    "dict_type": "an object",
    "list_type": "a list",
}
FIELD_MESSAGES = {
    "prompt": "'prompt' must be a string, a list of strings, or token ids",
    "stop": "'stop' must be a string or a list of strings",
    "path": "'path' must be the adapter file's path on the server",
}


def validation_error(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """The 400 for pydantic's (or FastAPI's) validation errors: the first one, named by its top-level field."""
    e = errors[0] if errors else {"type": "", "loc": (), "msg": "invalid request"}
    loc = list(e.get("loc", ()))
    if loc and loc[0] == "body":
        loc = loc[1:]
    param = loc[0] if loc and isinstance(loc[0], str) else None
    kind = str(e.get("type", ""))
    if kind == "json_invalid":
        return bad("the request body is not valid JSON")
    if param is None:
        return bad("the request body must be a JSON object")
    if param in FIELD_MESSAGES:
        return bad(FIELD_MESSAGES[param], param=param)
    if kind == "missing":
        return bad(f"'{param}' is required", param=param)
    if kind in TYPE_NAMES and len(loc) == 1:
        try:
            got = json.dumps(e.get("input"))[:60]
        except (TypeError, ValueError):
            got = type(e.get("input")).__name__
        return bad(f"'{param}' must be {TYPE_NAMES[kind]}, got {got}", param=param)
    where = ".".join(str(x) for x in loc)
    return bad(f"'{where}': {e.get('msg', 'invalid value')}", param=param)


M = TypeVar("M", bound=BaseModel)


def openapi_request(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` documenting `model` as a route's JSON body, its `$defs` inlined. The routes read and
    validate their bodies themselves (after the key check and the size limit), so FastAPI cannot see the model."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(x: Any) -> Any:
        if isinstance(x, dict):
            ref = x.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(defs[ref.rsplit("/", 1)[1]])
            return {k: inline(v) for k, v in x.items() if k != "discriminator"}  # its mapping names $defs
        if isinstance(x, list):
            return [inline(v) for v in x]
        return x

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


def validate(model: type[M], body: Any) -> M:
    """`body` (decoded JSON) as `model`, or the 400 naming the parameter."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise validation_error(e.errors(include_url=False)) from None


# ---- typed values -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamOptions:
    """`stream` and `stream_options.include_usage` of a request."""

    stream: bool = False
    include_usage: bool = False


@dataclass
class CompletionRequest:
    """A /v1/completions request: one or more prompts (text or token ids), `n` choices each (the best `n` of
    `best_of` samples), the prompt text before each (`echo`), `logprobs` alternatives per token (None: none)."""

    model: str
    sampling: SamplingParams
    stream: StreamOptions
    prompts: list[Prompt]
    n: int = 1
    best_of: int = 1
    echo: bool = False
    logprobs: int | None = None


@dataclass
class ChatRequest:
    """A /v1/chat/completions request: (role, text) messages ending with the user's, at most one image, `n`
    choices, `logprobs` alternatives per token (None: no logprobs)."""

    model: str
    sampling: SamplingParams
    stream: StreamOptions
    messages: list[Message]
    images: list[str] = field(default_factory=list)  # data URLs, decoded only for a model that takes images
    n: int = 1
    audios: list[str] = field(default_factory=list)  # data URLs of input_audio parts (at most one)
    logprobs: int | None = None
    videos: list[str] = field(default_factory=list)  # data URLs of video_url parts (at most one)


# ---- conversion ---------------------------------------------------------------------------------------------
def parse_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        raise bad("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    return body


def sampling_params(f: SamplingFields, default_max: int) -> SamplingParams:
    """`SamplingParams` of a request; unspecified temperature/top_p are the paper's 0.1/0.75. Its
    `SamplingError` becomes a 400 on the request's own name of the setting."""
    max_tokens = f.max_tokens if f.max_tokens is not None else f.max_completion_tokens
    stop = (f.stop,) if isinstance(f.stop, str) else tuple(f.stop or ())
    try:
        return SamplingParams(
            max_new_tokens=default_max if max_tokens is None else max_tokens,
            temperature=0.1 if f.temperature is None else f.temperature,
            top_p=0.75 if f.top_p is None else f.top_p,
            top_k=f.top_k or 0,
            stop=tuple(s for s in stop if s),
            seed=f.seed,
        )
    except SamplingError as e:
        param = e.field
        if param == "max_new_tokens":
            param = "max_tokens" if f.max_tokens is not None else "max_completion_tokens"
        raise bad(f"'{param}' {e.requirement}", param=param) from None


def stream_options(f: StreamFields) -> StreamOptions:
    return StreamOptions(bool(f.stream), bool(f.stream_options and f.stream_options.include_usage))


def prompts_of(f: PromptField) -> list[Prompt]:
    """`prompt` as a list of prompts: a string or token ids is one."""
    p = f.prompt
    if isinstance(p, str) or (p and all(isinstance(t, int) for t in p)):
        return [p]  # type: ignore[list-item]
    if not p:
        raise bad(FIELD_MESSAGES["prompt"], param="prompt")
    return list(p)  # type: ignore[arg-type]


def completion_request(body: CompletionBody) -> CompletionRequest:
    n = body.n or 1
    best_of = body.best_of if body.best_of is not None else n
    if best_of < n:
        raise bad("'best_of' must be >= n", param="best_of")
    if best_of > n and body.stream:
        raise bad("'best_of' other than n cannot be streamed", param="best_of")
    if n * best_of > MAX_N * MAX_N // 4:
        raise bad("too many choices", param="n")
    return CompletionRequest(
        body.model,
        sampling_params(body, default_max=16),
        stream_options(body),
        prompts_of(body),
        n=n,
        best_of=best_of,
        echo=bool(body.echo),
        logprobs=body.logprobs,
    )


def chat_request(body: ChatBody) -> ChatRequest:
    if body.top_logprobs is not None and not body.logprobs:
        raise bad("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    audios: list[str] = []
    videos: list[str] = []
    messages, images = messages_of(body, audios, videos)
    return ChatRequest(
        body.model,
        sampling_params(body, default_max=256),
        stream_options(body),
        messages,
        images,
        n=body.n or 1,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        audios=audios,
        videos=videos,
    )


# dict-taking forms (the same checks, for callers and tests that hold decoded JSON)
def parse_sampling(body: dict[str, Any], default_max: int) -> SamplingParams:
    return sampling_params(validate(SamplingFields, body), default_max)


def parse_stream_options(body: dict[str, Any]) -> StreamOptions:
    return stream_options(validate(StreamFields, body))


def parse_prompts(body: dict[str, Any]) -> list[Prompt]:
    return prompts_of(validate(PromptField, body))


def parse_completion_request(body: dict[str, Any]) -> CompletionRequest:
    return completion_request(validate(CompletionBody, body))


def parse_chat_request(body: dict[str, Any]) -> ChatRequest:
    return chat_request(validate(ChatBody, body))


def parse_messages(body: dict[str, Any]) -> tuple[list[Message], list[str]]:
    return messages_of(validate(MessagesField, body))


IMAGE_SIGNATURES = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")


def _head(b64: str) -> bytes:
    """The first 12 bytes a base64 payload decodes to (empty where it is not base64): enough to tell a format by."""
    try:
        return base64.b64decode(b64[:16], validate=True)
    except (binascii.Error, ValueError):
        return b""


def _data_url_head(url: str, part: str, kind: str) -> bytes:
    """The first bytes of a `part` (image_url, video_url) that must be a base64 data URL of a `kind`."""
    if not url.startswith("data:") or ";base64," not in url:
        raise bad(f"{part} must be a base64 data URL (data:{kind}/...;base64,...)", param="messages")
    return _head(url.split(";base64,", 1)[1])


def check_data_url(url: str) -> str:
    """`url` if it is a base64 data URL whose first bytes look like an image (PNG, JPEG, GIF, WebP, BMP, TIFF);
    only its head is decoded here: the image itself is decoded later, for a model that takes images."""
    if not _data_url_head(url, "image_url", "image").startswith(IMAGE_SIGNATURES):
        raise bad("image_url is not a readable image (no image header)", param="messages")
    return url


AUDIO_SIGNATURES = (b"RIFF", b"fLaC", b"OggS", b"ID3", b"\xff\xfb", b"\xff\xf3", b"\xff\xf2")


def check_audio(part: InputAudio) -> str:
    """The clip of an input_audio part as a data URL, if its base64 decodes and its first bytes look like audio
    (WAV, FLAC, OGG, MP3); the samples are decoded later, for a model that takes audio."""
    if not _head(part.data).startswith(AUDIO_SIGNATURES):
        raise bad("input_audio data is not base64 audio (no WAV, FLAC, OGG or MP3 header)", param="messages")
    return f"data:audio/{part.format};base64,{part.data}"


# a video's first bytes: an ISO BMFF box (MP4, MOV, 3GP: "ftyp" at offset 4), EBML (WebM, MKV), AVI, MPEG-PS,
# Ogg, FLV
VIDEO_SIGNATURES = (b"\x1a\x45\xdf\xa3", b"RIFF", b"\x00\x00\x01\xba", b"OggS", b"FLV")


def check_video_url(url: str) -> str:
    """`url` if it is a base64 data URL whose first bytes look like a video container (MP4/MOV, WebM/MKV, AVI,
    MPEG-PS, Ogg, FLV); the frames are decoded later, for a model that takes video."""
    head = _data_url_head(url, "video_url", "video")
    if head[4:8] != b"ftyp" and not head.startswith(VIDEO_SIGNATURES):
        raise bad("video_url is not a video (no MP4, WebM, AVI, MPEG, Ogg or FLV header)", param="messages")
    return url


def content_text(
    content: list[TextPart | ImagePart | AudioPart | VideoPart],
    images: list[str],
    audios: list[str] | None = None,
    videos: list[str] | None = None,
) -> str:
    """The text of a message's content parts; the data URLs of image parts go to `images`, those of audio parts to
    `audios`, of video parts to `videos` (not decoded yet; an audio or video part is refused where its list is
    None)."""
    texts = []
    for part in content:
        if isinstance(part, TextPart):
            texts.append(part.text)
        elif isinstance(part, AudioPart):
            if audios is None:
                raise bad("input_audio parts are not accepted here", param="messages")
            audios.append(check_audio(part.input_audio))
        elif isinstance(part, VideoPart):
            if videos is None:
                raise bad("video_url parts are not accepted here", param="messages")
            videos.append(
                check_video_url(part.video_url.url if isinstance(part.video_url, VideoURL) else part.video_url)
            )
        else:
            url = part.image_url.url if isinstance(part.image_url, ImageURL) else part.image_url
            images.append(check_data_url(url))
    return "\n".join(texts)


def messages_of(
    f: MessagesField, audios: list[str] | None = None, videos: list[str] | None = None
) -> tuple[list[Message], list[str]]:
    """`messages` as [(role, text)] ending with a user turn ("developer" is a system message), and the data URLs
    of their image parts (at most 1); those of their audio parts (at most 1) go to `audios`, of their video parts
    (at most 1) to `videos`."""
    images: list[str] = []
    out: list[Message] = []
    for m in f.messages:
        role = "system" if m.role == "developer" else m.role
        content = m.content
        if content is None and role == "assistant":
            content = ""
        if content is None:
            raise bad("message content must be a string or a list of parts", param="messages")
        out.append((role, content if isinstance(content, str) else content_text(content, images, audios, videos)))
    if out[-1][0] != "user":
        raise bad("the last message must be from the user", param="messages")
    if len(images) > 1:
        raise bad("at most one image per request", param="messages")
    if audios is not None and len(audios) > 1:
        raise bad("at most one audio clip per request", param="messages")
    if videos is not None and len(videos) > 1:
        raise bad("at most one video per request", param="messages")
    return out, images


def parse_adapter_request(body: dict[str, Any], base_name: str) -> tuple[str, str]:
    """(name, path) of POST /v1/adapters; the name defaults to the file's stem."""
    req = validate(AdapterBody, body)
    if not req.path:
        raise bad(FIELD_MESSAGES["path"], param="path")
    name = Path(req.path).stem if req.name is None else req.name
    if name == base_name:
        raise bad(f"'name' must not be the base's model id {base_name!r}", param="name")
    try:
        return check_adapter_name(name), req.path
    except AdapterError as e:
        raise bad(str(e), param="name") from None
