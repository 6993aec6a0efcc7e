"""The server's wire protocol on the way out: response bodies, stream chunks and their SSE framing.

One chunk builder (`chunk`) serves both /v1/completions ("text_completion" chunks with `text`) and
/v1/chat/completions ("chat.completion.chunk" chunks with a `delta`); `usage` counts the tokens of a request's
sequences; `sse_events` turns the decoder's `Event`s into the server-sent event stream ending in `[DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from llama_adapter.inference.decoder import DecodeRequest, Event
from llama_adapter.serving.protocol import error_from_seq

OWNER = "llama-adapter"
SSE_DONE = "data: [DONE]\n\n"
Kind = Literal["completion", "chat"]


@dataclass(frozen=True)
class Reply:
    """What every chunk and body of one response shares: its id, kind, creation time and model name."""

    id: str
    kind: Kind
    created: int
    model: str

    @classmethod
    def new(cls, kind: Kind, model: str) -> Reply:
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        return cls(f"{prefix}-{uuid.uuid4().hex}", kind, int(time.time()), model)

    def head(self, object_type: str) -> dict[str, Any]:
        """The fields every body and chunk starts with; `object_type` is OpenAI's "object"."""
        return {"id": self.id, "object": object_type, "created": self.created, "model": self.model}


def chunk(reply: Reply, index: int, text: str, finish_reason: str | None, role: str | None = None) -> dict[str, Any]:
    """One stream chunk: a completion's `text`, or a chat's `delta` (with `role` on the first chunk)."""
    if reply.kind == "completion":
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**reply.head("text_completion"), "choices": [choice]}
    delta = {"role": role, "content": text} if role else ({"content": text} if text else {})
    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return {**reply.head("chat.completion.chunk"), "choices": [choice]}


def usage(seqs: Sequence[DecodeRequest]) -> dict[str, int]:
    """Token counts over all sequences of a request."""
    p = sum(len(s.prompt_ids) for s in seqs)
    c = sum(len(s.out_ids) for s in seqs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def usage_chunk(reply: Reply, seqs: Sequence[DecodeRequest]) -> dict[str, Any]:
    """The last chunk of a stream with `stream_options.include_usage`: no choices, the usage."""
    return {**chunk(reply, 0, "", None), "choices": [], "usage": usage(seqs)}


def sse(obj: Any) -> str:
    """One server-sent event carrying `obj` as JSON."""
    return f"data: {json.dumps(obj)}\n\n"


async def sse_events(
    reply: Reply, events: asyncio.Queue[Event], seqs: Sequence[DecodeRequest], include_usage: bool
) -> AsyncIterator[str]:
    """The SSE stream of a request until all its sequences finish; a failed sequence ends it with an error event."""
    if reply.kind == "chat":
        yield sse(chunk(reply, 0, "", None, role="assistant"))
    left = len(seqs)
    while left:
        ev = await events.get()
        s = ev.seq
        if ev.finished:
            left -= 1
            if s.finish_reason == "error":
                err = error_from_seq(s)
                yield sse(err.body())
                return
        if ev.text or ev.finished:
            yield sse(chunk(reply, s.tag, ev.text, s.finish_reason if ev.finished else None))
    if include_usage:
        yield sse(usage_chunk(reply, seqs))
    yield SSE_DONE


def completion_body(reply: Reply, texts: Sequence[str], seqs: Sequence[DecodeRequest]) -> dict[str, Any]:
    """The non-streaming /v1/completions response."""
    choices = [
        {"index": i, "text": t, "logprobs": None, "finish_reason": s.finish_reason}
        for i, (t, s) in enumerate(zip(texts, seqs, strict=True))
    ]
    return {**reply.head("text_completion"), "choices": choices, "usage": usage(seqs)}


def chat_body(reply: Reply, text: str, seq: DecodeRequest) -> dict[str, Any]:
    """The non-streaming /v1/chat/completions response."""
    message = {"role": "assistant", "content": text}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": seq.finish_reason}
    return {**reply.head("chat.completion"), "choices": [choice], "usage": usage([seq])}


def model_card(name: str, base_name: str, created: int, parent: str | None = None) -> dict[str, Any]:
    """A model object of /v1/models (the base, or an adapter with `parent` = the base)."""
    return {"id": name, "object": "model", "created": created, "owned_by": OWNER, "root": base_name, "parent": parent}


def models_body(
    base_name: str,
    created: int,
    base_template: str | None,
    templates: Mapping[str, str | None],
    loaded: Collection[str] | None = None,
) -> dict[str, Any]:
    """GET /v1/models: the base, then each adapter (`templates`: name -> its prompt format), each with the prompt
    format its chats use ("chat": the base's own chat template; None: a plain transcript) and whether it is
    resident (`loaded`; None: all are), since a registry's adapters are servable before they are loaded."""
    data = [{**model_card(base_name, base_name, created), "template": base_template}]
    for name, template in templates.items():
        card = model_card(name, base_name, created, parent=base_name)
        data.append({**card, "template": template, "loaded": loaded is None or name in loaded})
    return {"object": "list", "data": data}
