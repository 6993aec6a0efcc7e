"""The server's wire protocol on the way out: response bodies, stream chunks and their SSE framing.

One chunk builder (`chunk`) serves both /v1/completions ("text_completion" chunks with `text`) and
/v1/chat/completions ("chat.completion.chunk" chunks with a `delta`); `usage` counts the tokens of a request's
sequences; `sse_events` turns the decoder's `Event`s into the server-sent event stream ending in `[DONE]`.
Log-probabilities (`DecodeRequest.out_logprobs`, `prompt_logprobs`) are written in each endpoint's format:
`completion_logprobs` OpenAI's legacy {"tokens", "token_logprobs", "top_logprobs", "text_offset"}, `chat_logprobs`
the chat {"content": [{"token", "logprob", "bytes", "top_logprobs"}]}. They are the model's own (log_softmax of
the logits before temperature, top-p and top-k), as OpenAI and vLLM report them.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from llama_adapter.inference.decoder import DecodeRequest, Event, TokenLogprob
from llama_adapter.serving.protocol import error_from_seq

OWNER = "llama-adapter"
SSE_DONE = "data: [DONE]\n\n"
Kind = Literal["completion", "chat"]
TokenText = Callable[[int], str]  # a token id's text


def completion_logprobs(
    entries: Sequence[tuple[int, TokenLogprob | None]], token_text: TokenText, offset: int = 0
) -> dict[str, Any]:
    """OpenAI's legacy completion logprobs of (token, logprob) pairs (None: the first prompt token, which has no
    context). `top_logprobs` maps the most likely tokens' texts, most likely first, then the chosen one if it is
    not among them (as vLLM does); `text_offset` counts characters from `offset`."""
    tokens: list[str] = []
    lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for tid, e in entries:
        text = token_text(tid)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if e is None:
            lps.append(None)
            tops.append(None)
            continue
        lps.append(e.logprob)
        top: dict[str, float] = {}
        for t, lp in [*e.top, (tid, e.logprob)]:  # tokens of the same text: the likelier one's logprob
            top.setdefault(token_text(t), lp)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(entries: Sequence[TokenLogprob], token_text: TokenText) -> dict[str, Any]:
    """OpenAI's chat logprobs: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}."""

    def item(t: int, lp: float) -> dict[str, Any]:
        text = token_text(t)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8", "replace"))}

    content = [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]
    return {"content": content}


def prompt_entries(seq: DecodeRequest) -> list[tuple[int, TokenLogprob | None]]:
    """The prompt's (token, logprob) pairs, for `echo` with logprobs."""
    return list(zip(seq.prompt_ids, seq.prompt_logprobs or [None] * len(seq.prompt_ids), strict=True))


def out_entries(seq: DecodeRequest, start: int = 0, end: int | None = None) -> list[tuple[int, TokenLogprob | None]]:
    """The generated tokens' (token, logprob) pairs from `start` to `end`."""
    return [(e.token, e) for e in seq.out_logprobs[start:end]]


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


def chunk(
    reply: Reply,
    index: int,
    text: str,
    finish_reason: str | None,
    role: str | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One stream chunk: a completion's `text`, or a chat's `delta` (with `role` on the first chunk), and the
    `logprobs` of its tokens in the endpoint's format."""
    if reply.kind == "completion":
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        return {**reply.head("text_completion"), "choices": [choice]}
    delta = {"role": role, "content": text} if role else ({"content": text} if text else {})
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return {**reply.head("chat.completion.chunk"), "choices": [choice]}


def usage(seqs: Sequence[DecodeRequest], n: int = 1) -> dict[str, int]:
    """Token counts over all sequences of a request; `n` sequences in a row share a prompt, counted once."""
    p = sum(len(s.prompt_ids) for s in seqs[::n])
    c = sum(len(s.out_ids) for s in seqs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def usage_chunk(reply: Reply, seqs: Sequence[DecodeRequest], n: int = 1) -> dict[str, Any]:
    """The last chunk of a stream with `stream_options.include_usage`: no choices, the usage."""
    return {**chunk(reply, 0, "", None), "choices": [], "usage": usage(seqs, n)}


def sse(obj: Any) -> str:
    """One server-sent event carrying `obj` as JSON."""
    return f"data: {json.dumps(obj)}\n\n"


@dataclass
class StreamLogprobs:
    """Per sequence, what a stream has sent so far: the echo'd prompt, generated tokens' logprobs, text offset."""

    token_text: TokenText | None = None  # None: no logprobs
    echo: Sequence[str] = ()  # per sequence (by tag): the prompt text to send first
    sent: dict[int, int] | None = None
    offset: dict[int, int] | None = None

    def take(self, reply: Reply, ev: Event) -> tuple[str, dict[str, Any] | None]:
        """The text prefix (the echo'd prompt, once) and the logprobs of `ev`'s chunk."""
        s, tag = ev.seq, ev.seq.tag
        sent, offset = self.sent or {}, self.offset or {}
        self.sent, self.offset = sent, offset
        first = tag not in sent
        prefix = self.echo[tag] if first and self.echo else ""
        if self.token_text is None or s.logprobs is None:
            sent[tag] = 0
            return prefix, None
        upto = ev.tokens if ev.tokens is not None else len(s.out_logprobs)
        got = out_entries(s, sent.get(tag, 0), upto)
        sent[tag] = max(sent.get(tag, 0), upto)
        if reply.kind == "chat":
            return prefix, chat_logprobs([e for _, e in got if e is not None], self.token_text)
        if first and self.echo:
            got = prompt_entries(s) + got
        lp = completion_logprobs(got, self.token_text, offset.get(tag, 0))
        offset[tag] = offset.get(tag, 0) + sum(len(t) for t in lp["tokens"])
        return prefix, lp


async def sse_events(
    reply: Reply,
    events: asyncio.Queue[Event],
    seqs: Sequence[DecodeRequest],
    include_usage: bool,
    logprobs: StreamLogprobs | None = None,
    n: int = 1,
) -> AsyncIterator[str]:
    """The SSE stream of a request until all its sequences finish; a failed sequence ends it with an error event
    (then [DONE], as every stream ends).
    `logprobs` adds the echo'd prompts and the tokens' logprobs; `n` sequences in a row share a prompt."""
    lp = logprobs or StreamLogprobs()
    if reply.kind == "chat":
        for s in seqs:
            yield sse(chunk(reply, s.tag, "", None, role="assistant"))
    left = len(seqs)
    while left:
        ev = await events.get()
        s = ev.seq
        if ev.finished:
            left -= 1
            if s.finish_reason == "error":
                err = error_from_seq(s)
                yield sse(err.body())
                yield SSE_DONE  # every stream ends with [DONE]: clients that wait for it stop cleanly
                return
        if ev.text or ev.finished:
            prefix, logprobs_ = lp.take(reply, ev)
            finish = s.finish_reason if ev.finished else None
            yield sse(chunk(reply, s.tag, prefix + ev.text, finish, logprobs=logprobs_))
    if include_usage:
        yield sse(usage_chunk(reply, seqs, n))
    yield SSE_DONE


def completion_body(
    reply: Reply,
    texts: Sequence[str],
    seqs: Sequence[DecodeRequest],
    token_text: TokenText | None = None,
    echo: bool = False,
    counted: Sequence[DecodeRequest] | None = None,
    n: int = 1,
) -> dict[str, Any]:
    """The non-streaming /v1/completions response: one choice per sequence (`texts`: with the prompt when `echo`),
    with logprobs where a sequence asked (and `token_text` is given). `counted`: the sequences the usage counts
    (all that were generated: with best_of, more than are returned), `n` in a row sharing a prompt."""
    choices = []
    for i, (t, s) in enumerate(zip(texts, seqs, strict=True)):
        lp = None
        if token_text is not None and s.logprobs is not None:
            lp = completion_logprobs((prompt_entries(s) if echo else []) + out_entries(s), token_text)
        choices.append({"index": i, "text": t, "logprobs": lp, "finish_reason": s.finish_reason})
    return {**reply.head("text_completion"), "choices": choices, "usage": usage(counted or seqs, n)}


def chat_body(
    reply: Reply, texts: Sequence[str], seqs: Sequence[DecodeRequest], token_text: TokenText | None = None
) -> dict[str, Any]:
    """The non-streaming /v1/chat/completions response: one choice per sequence, with logprobs where asked."""
    choices = []
    for i, (t, s) in enumerate(zip(texts, seqs, strict=True)):
        lp = chat_logprobs(s.out_logprobs, token_text) if token_text is not None and s.logprobs is not None else None
        message = {"role": "assistant", "content": t}
        choices.append({"index": i, "message": message, "logprobs": lp, "finish_reason": s.finish_reason})
    return {**reply.head("chat.completion"), "choices": choices, "usage": usage(seqs, len(seqs))}


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
