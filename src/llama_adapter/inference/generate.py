"""The offline API: `generate`, `stream_generate` and `generate_tokens` drive a `BatchDecoder` over a list of
prompts (they join as rows finish), with one adapter, none, or one per prompt.

    from llama_adapter.inference.generate import generate, stream_generate
    texts = generate(model, ["Tell me about alpacas."], adapter="alpaca", temperature=0.0)
    for row, delta in stream_generate(model, prompts, adapter=["a", None, "b"]):
        ...   # text deltas per row, in order; each row's deltas concatenate to its completion
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence

from torch import Tensor

from llama_adapter.inference.decoder import BatchDecoder, DecodeRequest, Event
from llama_adapter.inference.sampling import SamplingParams
from llama_adapter.model import Transformer


def _encode_prompts(model: Transformer, prompts: Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
    out = []
    for p in prompts:
        if isinstance(p, str):
            if model.tokenizer is None:
                raise ValueError("the model has no tokenizer; pass token ids instead of text")
            out.append(model.tokenizer.encode(p, bos=True))
        else:
            out.append([int(t) for t in p])
    return out


def _row_adapters(adapter: str | None | Sequence[str | None], n: int) -> list[str | None]:
    rows = [adapter] * n if adapter is None or isinstance(adapter, str) else list(adapter)
    if len(rows) != n:
        raise ValueError(f"{len(rows)} adapter entries for {n} prompts")
    return rows


def iter_events(
    model: Transformer,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    *,
    adapter: str | None | Sequence[str | None] = None,
    max_new_tokens: int = 128,
    temperature: float = 0.1,
    top_p: float = 0.75,
    top_k: int = 0,
    stop: Sequence[str] | None = None,
    seed: int | None = None,
    image_features: Tensor | None = None,
    max_batch_size: int = 32,
    ignore_eos: bool = False,
    on_step: Callable[[], None] | None = None,
    strip_separator: bool = False,
) -> Iterator[Event]:
    """The events behind `generate`/`stream_generate` (Event.seq.tag is the prompt's index)."""
    ids = _encode_prompts(model, prompts)
    rows = _row_adapters(adapter, len(ids))
    if image_features is not None and image_features.shape[0] != len(ids):
        raise ValueError(f"image_features has {image_features.shape[0]} rows for {len(ids)} prompts")
    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        stop=tuple(stop or ()),
        seed=seed,
        ignore_eos=ignore_eos,
    )
    ctx = model.config.max_seq_len
    for i, p in enumerate(ids):
        if not p:
            raise ValueError(f"prompt {i} is empty")
        if len(p) >= ctx:
            raise ValueError(f"prompt {i} has {len(p)} tokens; the model's context is {ctx}")
    for r in rows:
        if r is not None and r not in model.adapters:
            raise KeyError(f"no adapter named {r!r} (loaded: {', '.join(model.adapters) or 'none'})")
    seqs = [
        DecodeRequest(
            p,
            rows[i],
            params,
            None if image_features is None else image_features[i : i + 1],
            tag=i,
            strip_separator=strip_separator,
        )
        for i, p in enumerate(ids)
    ]
    if not seqs:
        return
    max_len = min(ctx, max(len(p) for p in ids) + max_new_tokens + 1)
    dec = BatchDecoder(model, min(max_batch_size, len(seqs)), max_len)
    waiting = list(reversed(seqs))
    while waiting or dec.seqs:
        joining: list[DecodeRequest] = []
        while waiting and len(joining) < dec.free and dec.can_join(waiting[-1], joining):
            joining.append(waiting.pop())
        events = dec.add(joining) if joining else []
        if dec.seqs:
            events += dec.step()
            if on_step is not None:
                on_step()
        yield from events


def generate(
    model: Transformer,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    *,
    adapter: str | None | Sequence[str | None] = None,
    max_new_tokens: int = 128,
    temperature: float = 0.1,
    top_p: float = 0.75,
    top_k: int = 0,
    stop: Sequence[str] | None = None,
    seed: int | None = None,
    image_features: Tensor | None = None,
    max_batch_size: int = 32,
    strip_separator: bool = False,
) -> list[str]:
    """Completions (text after the prompt) for a batch of prompts.

    Text prompts are encoded as is with BOS prepended (apply templates before); token-id prompts are used
    verbatim. `adapter`: one name for all rows, None (the base), or one entry per prompt. temperature 0 is
    greedy. With `seed`, every row samples from its own generator seeded with `seed`, so a row's output does
    not depend on the other rows. `image_features` [B, F]: one row per prompt for multi-modal adapters.
    Up to `max_batch_size` rows decode together; the rest join as rows finish. `strip_separator`: the prompts end
    with a template's response marker ("### Response:"); one leading space of each answer is dropped (a completion
    keeps the text exactly as the model wrote it: the default). For conversations, see `inference.chat.chat`.
    """
    out = [""] * len(prompts)
    for ev in iter_events(
        model,
        prompts,
        adapter=adapter,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        stop=stop,
        seed=seed,
        image_features=image_features,
        max_batch_size=max_batch_size,
        strip_separator=strip_separator,
    ):
        out[ev.seq.tag] += ev.text
    return out


def generate_tokens(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    adapter: str | None | Sequence[str | None] = None,
    max_new_tokens: int = 128,
    temperature: float = 0.1,
    top_p: float = 0.75,
    top_k: int = 0,
    seed: int | None = None,
    image_features: Tensor | None = None,
    max_batch_size: int = 32,
    ignore_eos: bool = False,
) -> list[list[int]]:
    """Generated token ids (no EOS) per prompt; works without a tokenizer (benchmarks)."""
    out: list[list[int]] = [[] for _ in prompts]
    for ev in iter_events(
        model,
        prompts,
        adapter=adapter,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        image_features=image_features,
        max_batch_size=max_batch_size,
        ignore_eos=ignore_eos,
    ):
        if ev.finished:
            out[ev.seq.tag] = list(ev.seq.out_ids)
    return out


def stream_generate(
    model: Transformer,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    *,
    adapter: str | None | Sequence[str | None] = None,
    max_new_tokens: int = 128,
    temperature: float = 0.1,
    top_p: float = 0.75,
    top_k: int = 0,
    stop: Sequence[str] | None = None,
    seed: int | None = None,
    image_features: Tensor | None = None,
    max_batch_size: int = 32,
    strip_separator: bool = False,
) -> Generator[tuple[int, str], None, None]:
    """Like `generate`, but yields `(row_index, text_delta)` as tokens are decoded.

    Deltas are non-empty, UTF-8 safe (no partial characters) and never contain (a prefix of) a stop string
    that later completes; each row's deltas concatenate to exactly its `generate` completion. Closing the
    iterator (e.g. on Ctrl-C) stops decoding.
    """
    for ev in iter_events(
        model,
        prompts,
        adapter=adapter,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        stop=stop,
        seed=seed,
        image_features=image_features,
        max_batch_size=max_batch_size,
        strip_separator=strip_separator,
    ):
        if ev.text:
            yield ev.seq.tag, ev.text
