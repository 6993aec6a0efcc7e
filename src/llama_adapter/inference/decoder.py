"""The decoding engine: `BatchDecoder` runs many requests (any mix of adapters) as one batch.

A fixed number of cache slots, the live requests packed in rows 0..n-1. Requests join between decode steps
(their prompts are prefilled in one forward of their own, written straight into their cache rows) and leave as
soon as they finish (EOS, a stop string or the length limit), so one decode step is always one forward pass over
exactly the live rows, whatever adapters they use. `inference.generate` drives it for a list of prompts;
`serving.engine` drives it for the server.

Each request's adapter prompt keys/values are computed once, when it joins (`inference.prompt_cache`); the
batch-level `PromptKV` the forward needs is assembled from those (`zero_init_attention.batch_prompt_kv`) only when
the batch's membership changes. The model's compute backend (`backends`) is chosen once, here: its KV-cache
dtype, its weight layout for decoding and, where it has one, its fused decode step.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from llama_adapter.adapter_batch import batch_prompt_kv, can_share_batch
from llama_adapter.backends import backend_of
from llama_adapter.inference.prompt_cache import SHARED, PromptKVCache, to_dtype
from llama_adapter.inference.sampling import SamplingParams, uniforms
from llama_adapter.inference.text_stream import TextStream
from llama_adapter.model import KVCache, Transformer
from llama_adapter.zero_init_attention import PromptKV

PKV = dict[int, PromptKV]
_UNSET: Any = object()  # the fused prompts are worked out again at the next step
_ids = itertools.count()


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability under the model and the `top` most likely tokens at its position.

    These are the model's own: `log_softmax` of the logits before temperature, top-p and top-k (what OpenAI and
    vLLM report), so they do not depend on how the token was sampled.
    """

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token, logprob), most likely first


def token_logprobs(logits: Tensor, tokens: Tensor, tops: Sequence[int]) -> list[TokenLogprob]:
    """Each row's `tokens` logprob and its `tops[row]` most likely alternatives, from logits [B, V]."""
    lp = torch.log_softmax(logits.float(), -1)
    chosen = lp.gather(-1, tokens[:, None].long())[:, 0].tolist()
    k = min(max(tops, default=0), lp.shape[-1])
    vals, idx = lp.topk(k, -1) if k else (lp[:, :0], lp[:, :0].long())
    vals_l, idx_l = vals.tolist(), idx.tolist()
    return [
        TokenLogprob(int(t), c, tuple(zip(idx_l[r][: tops[r]], vals_l[r][: tops[r]], strict=True)))
        for r, (t, c) in enumerate(zip(tokens.tolist(), chosen, strict=True))
    ]


@dataclass(eq=False)
class DecodeRequest:
    """One request in the decoder: prompt ids, adapter, sampling settings and the generated state."""

    prompt_ids: list[int]
    adapter: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    image_features: Tensor | None = None  # [1, F]
    tag: Any = None  # caller's handle (row index, server request)
    strip_separator: bool = False  # the prompt ends with a response marker: drop one leading space of the answer
    # None: no log-probabilities (no work at all); k >= 0: each generated token's logprob and k alternatives
    logprobs: int | None = None
    echo_logprobs: bool = False  # also the prompt's tokens' (from the prefill; needs `logprobs`), even at 0 tokens
    id: int = field(default_factory=lambda: next(_ids))
    # state
    pkv: PKV | None = None
    stream: TextStream | None = None
    out_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None
    cancelled: bool = False
    generator: torch.Generator | None = None
    out_logprobs: list[TokenLogprob] = field(default_factory=list)  # one per out_ids entry, with `logprobs`
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token (the first None)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Event:
    seq: DecodeRequest
    text: str
    finished: bool
    tokens: int | None = None  # len(seq.out_ids) when the event was made (the decoder thread runs ahead)


def merge_prompt_kv(rows: Sequence[PKV | None]) -> PKV | None:
    """Batch-level prompt K/V from per-request ones ([1, ...] per layer, or None for base rows).

    Covers the union of adapted layers; each layer is assembled by `adapter_batch.batch_prompt_kv` (rows without
    an adapter at a layer get zero K/V and gate 0; shorter prompts are padded and masked). Requests sharing one
    projection (the same adapter, no image) form one group.
    """
    groups: dict[int, tuple[PKV, list[int]]] = {}
    for i, r in enumerate(rows):
        if r:
            groups.setdefault(id(r), (r, []))[1].append(i)
    if not groups:
        return None
    device = next(iter(next(iter(groups.values()))[0].values())).k.device
    index = {key: torch.tensor(idx, device=device) for key, (_, idx) in groups.items()}
    layers = sorted({li for r, _ in groups.values() for li in r})
    return {
        li: batch_prompt_kv([(r[li], index[key]) for key, (r, _) in groups.items() if li in r], len(rows))
        for li in layers
    }


class BatchDecoder:
    """Fixed cache slots; live sequences packed in rows 0..n-1; one forward per decode step.

    `add(seqs)` prefills joining sequences (one forward for all of them) and samples their first token;
    `step()` decodes one token for every live sequence. Both return `Event`s (text deltas; `finished` on a
    sequence's last one); finished and cancelled sequences leave the batch at once.
    """

    def __init__(
        self,
        model: Transformer,
        max_batch: int,
        max_len: int | None = None,
        tokenizer: Any = "model",
        prompt_cache: PromptKVCache | None = None,
    ) -> None:
        self.model = model
        self.backend = backend_of(model)  # chosen once per model (llama_adapter.backends)
        self.backend.prepare_decoding()
        self.prompt_cache = prompt_cache if prompt_cache is not None else SHARED
        self.max_batch = max_batch
        self.max_len = min(max_len or model.config.max_seq_len, model.config.max_seq_len)
        self.tokenizer = model.tokenizer if tokenizer == "model" else tokenizer
        eos = set(model.config.eos_token_ids or [])
        if self.tokenizer is not None:
            eos |= set(getattr(self.tokenizer, "eos_ids", []) or [])
        self.eos = eos
        self.device = model.tok_embeddings.weight.device
        self.kv_dtype = self.backend.kv_cache_dtype
        self.prompt_dtype = self.backend.prompt_kv_dtype
        self.cache: KVCache = model.new_cache(max_batch, self.max_len, dtype=self.kv_dtype)
        self.seqs: list[DecodeRequest] = []
        self._last = torch.zeros(0, 1, dtype=torch.long, device=self.device)
        self._pos = torch.zeros(0, 1, dtype=torch.long, device=self.device)
        self._pkv: PKV | None = None
        self._knobs: tuple[Tensor, Tensor, Tensor, list[torch.Generator | None]] | None = None
        self._fused: Any = _UNSET  # the batch's prompts laid out for the backend's fused decode step (None: none)
        self._lp_rows: bool | None = None  # whether any live row wants logprobs (None: work it out at the next step)
        self._views: tuple[Tensor, Tensor, Tensor, Tensor] | None = None  # _row_views: (_last, _pos, their views)

    # ---- membership ----------------------------------------------------------------------------------
    @property
    def free(self) -> int:
        return self.max_batch - len(self.seqs)

    def can_join(self, seq: DecodeRequest, others: Sequence[DecodeRequest] = ()) -> bool:
        """Whether `seq` may decode beside the live requests and `others` (`adapter_batch.can_share_batch`)."""
        live = [*self.seqs, *others]
        if not live:
            return True
        loaded = self.model.adapters
        return can_share_batch(
            [loaded[s.adapter] if s.adapter is not None and s.adapter in loaded else None for s in (seq, *live)]
        )

    def prompt_kv_for(self, seq: DecodeRequest) -> PKV | None:
        """The request's prompt K/V in the backend's dtype for them: cached per adapter, or projected with its image."""
        if seq.adapter is None:
            return None
        if seq.image_features is not None:
            return to_dtype(self.model.prompt_kv(seq.adapter, 1, seq.image_features.to(self.device)), self.prompt_dtype)
        return self.prompt_cache.get(self.model, seq.adapter, self.prompt_dtype)

    def forget_adapter(self, name: str) -> None:
        """Drop cached prompt K/V of an adapter; live requests keep theirs."""
        self.prompt_cache.forget(self.model, name)

    def _init_seq(self, seq: DecodeRequest) -> None:
        p = seq.params
        seq.stream = TextStream(self.tokenizer, p.stop, seq.strip_separator)
        seq.out_ids = []
        seq.out_logprobs = []
        seq.prompt_logprobs = None
        if p.seed is not None:
            seq.generator = torch.Generator(device=self.device)
            seq.generator.manual_seed(p.seed % (1 << 64))  # any integer, negative or huge

    @torch.no_grad()
    def add(self, seqs: Sequence[DecodeRequest]) -> list[Event]:
        """Prefill `seqs` into free slots (raises if there are not enough); returns their first events."""
        if len(seqs) > self.free:
            raise ValueError(f"{len(seqs)} sequences for {self.free} free slots")
        events: list[Event] = []
        joining: list[DecodeRequest] = []
        scoring: list[DecodeRequest] = []  # nothing to generate, but the prompt's logprobs are wanted (echo)
        for s in seqs:
            if not s.prompt_ids:
                raise ValueError("empty prompt")
            if len(s.prompt_ids) >= self.max_len:
                raise ValueError(
                    f"prompt of {len(s.prompt_ids)} tokens does not fit the context of {self.max_len} tokens"
                )
            self._init_seq(s)
            if s.pkv is None:
                s.pkv = self.prompt_kv_for(s)
            if s.cancelled:
                s.finish_reason = "cancelled"
                events.append(Event(s, s.stream.finish() if s.stream else "", True))
            elif s.params.max_new_tokens == 0:
                if s.echo_logprobs and s.logprobs is not None:
                    scoring.append(s)
                else:
                    s.finish_reason = "length"
                    events.append(Event(s, s.stream.finish() if s.stream else "", True))
            else:
                joining.append(s)
        if not joining and not scoring:
            return events
        # one prefill for all; the scoring rows use free slots past the joining ones and never join the batch
        batch = joining + scoring
        n, j, b = len(self.seqs), len(joining), len(joining) + len(scoring)
        lens = [len(s.prompt_ids) for s in batch]
        T = max(lens)
        pad = self.tokenizer.pad_id if self.tokenizer is not None else 0
        ids = torch.tensor(
            [s.prompt_ids + [pad] * (T - len(s.prompt_ids)) for s in batch], dtype=torch.long, device=self.device
        )
        pos = torch.arange(T, device=self.device)[None].expand(b, T)
        view = KVCache([k[n : n + b] for k in self.cache.k], [v[n : n + b] for v in self.cache.v])
        pkv = self._batch_prompt_kv(batch)
        h = self.model(ids, input_pos=pos, cache=view, prompt_kv=pkv, return_hidden=True)
        for r, s in enumerate(batch):
            if s.echo_logprobs and s.logprobs is not None:
                self._score_prompt(s, h[r, : lens[r] - 1])
        for s in scoring:
            assert s.stream is not None
            s.finish_reason = "length"
            events.append(Event(s, s.stream.finish(), True, tokens=0))
        if not joining:
            return events
        last = torch.tensor([x - 1 for x in lens[:j]], device=self.device)
        logits = self.backend.logits(h[torch.arange(j, device=self.device), last])
        knobs = self._make_knobs(joining)
        tokens = self._next_tokens(joining, logits, knobs, self._samples(joining))
        lps = self._logprobs(joining, logits, tokens)
        self.seqs.extend(joining)
        self._last = torch.cat([self._last, tokens[:, None]])
        self._pos = torch.cat([self._pos, torch.tensor(lens[:j], device=self.device)[:, None]])
        self._pkv, self._knobs = (pkv, knobs) if n == 0 and not scoring else (None, None)
        self._lp_rows = None
        self._fused = _UNSET
        events += self._accept(tokens.tolist(), first_row=n, lps=lps)
        return events

    def _score_prompt(self, seq: DecodeRequest, hidden: Tensor) -> None:
        """The prompt tokens' logprobs (the first has no context: None) from the prefill's hidden states [T-1, D]."""
        k = seq.logprobs or 0
        scored = []
        if hidden.shape[0]:
            targets = torch.tensor(seq.prompt_ids[1:], device=self.device)
            scored = token_logprobs(self.backend.logits(hidden), targets, [k] * hidden.shape[0])
        seq.prompt_logprobs = [None, *scored]

    @staticmethod
    def _logprobs(seqs: Sequence[DecodeRequest], logits: Tensor, tokens: Tensor) -> dict[int, TokenLogprob] | None:
        """Row -> the sampled token's logprob, for the rows that asked (None, and no work, when none did)."""
        rows = [r for r, s in enumerate(seqs) if s.logprobs is not None]
        if not rows:
            return None
        idx = torch.tensor(rows, device=logits.device)
        tops = [seqs[r].logprobs or 0 for r in rows]
        return dict(zip(rows, token_logprobs(logits[idx], tokens[idx], tops), strict=True))

    def cancel(self, seq: DecodeRequest) -> None:
        """Mark a sequence cancelled; it leaves the batch at the next `step` (or `add`)."""
        seq.cancelled = True

    def fail_all(self, message: str) -> list[Event]:
        events = []
        for s in self.seqs:
            s.finish_reason, s.error = "error", message
            events.append(Event(s, "", True))
        self.seqs = []
        self._last, self._pos = self._last[:0], self._pos[:0]
        self._pkv = self._knobs = None
        self._lp_rows = None
        self._fused = _UNSET
        return events

    # ---- decoding ------------------------------------------------------------------------------------
    def _make_knobs(self, seqs: Sequence[DecodeRequest]) -> tuple[Tensor, Tensor, Tensor, list[torch.Generator | None]]:
        d = self.device
        temp = torch.tensor([s.params.temperature for s in seqs], device=d)
        top_p = torch.tensor([s.params.top_p for s in seqs], device=d)
        top_k = torch.tensor([s.params.top_k for s in seqs], device=d)
        return temp, top_p, top_k, [s.generator for s in seqs]

    def _next_tokens(
        self,
        seqs: Sequence[DecodeRequest],
        logits: Tensor,
        knobs: tuple[Tensor, Tensor, Tensor, list[torch.Generator | None]],
        samples: bool,
    ) -> Tensor:
        """Each row's next token: the backend's argmax, and the sampler only where a row samples (`samples`, from
        `_samples(seqs)`: the sampler's own check for that is a tensor op and a sync, at every step)."""
        tokens = self.backend.greedy(logits)
        if samples:
            temperature, top_p, top_k, generators = knobs
            tokens = self.backend.sample(logits, temperature, top_p, top_k, uniforms(generators, logits.device), tokens)
        return tokens

    @staticmethod
    def _samples(seqs: Sequence[DecodeRequest]) -> bool:
        """Whether any of the rows samples (temperature > 0) rather than taking the argmax."""
        return any(s.params.temperature > 0 for s in seqs)

    @torch.no_grad()
    def step(self) -> list[Event]:
        events = self._drop_cancelled()
        if not self.seqs:
            return events
        if self._pkv is None:
            self._pkv = self._batch_prompt_kv(self.seqs)
        if self._fused is _UNSET:
            self._fused = self.backend.fused_prompts(self._pkv)
        if self._knobs is None:
            self._knobs = self._make_knobs(self.seqs)
        samples = self._samples(self.seqs)
        if self._fused is not None:
            logits = self.backend.decode_step(*self._row_views(), self.cache, self._fused, advance=not samples)
        else:
            h = self.model(self._last, input_pos=self._pos, cache=self.cache, prompt_kv=self._pkv, return_hidden=True)
            logits = self.backend.logits(h[:, -1])
        tokens = self._next_tokens(self.seqs, logits, self._knobs, samples)
        if self._lp_rows is None:
            self._lp_rows = any(s.logprobs is not None for s in self.seqs)
        lps = self._logprobs(self.seqs, logits, tokens) if self._lp_rows else None
        if not self.backend.advanced(logits):  # (where it did, _last and _pos already hold the next step's inputs)
            self._last = tokens[:, None]
            self._pos = self._pos + 1
        events += self._accept(tokens.tolist(), first_row=0, lps=lps)
        return events

    def _row_views(self) -> tuple[Tensor, Tensor]:
        """The rows' last tokens and positions as [B] views of `_last` and `_pos` ([B, 1]), made again only when
        those change (membership, or a step the backend did not advance): each view is a tensor op, and between two
        decode steps, whose weight stream has just emptied the caches, one costs ~10 us."""
        if self._views is None or self._views[0] is not self._last or self._views[1] is not self._pos:
            self._views = (self._last, self._pos, self._last[:, 0], self._pos[:, 0])
        return self._views[2], self._views[3]

    @staticmethod
    def _batch_prompt_kv(seqs: Sequence[DecodeRequest]) -> PKV | None:
        """The rows' prompt K/V for one forward, contiguous (CPU matmuls want it); once per membership change."""
        pkv = merge_prompt_kv([s.pkv for s in seqs])
        if pkv is None:
            return None
        return {li: replace(p, k=p.k.contiguous(), v=p.v.contiguous()) for li, p in pkv.items()}

    def _accept(self, tokens: list[int], first_row: int, lps: dict[int, TokenLogprob] | None = None) -> list[Event]:
        """Record each row's new token (already written at its position) and its logprob (`lps`: by index into
        `tokens`), finish rows, compact."""
        events = []
        done = []
        for i, t in enumerate(tokens):
            r = first_row + i
            s = self.seqs[r]
            assert s.stream is not None
            p = s.params
            if t in self.eos and not p.ignore_eos:
                s.finish_reason = "stop"
            else:
                s.out_ids.append(t)
                if lps is not None and i in lps:
                    s.out_logprobs.append(lps[i])
                text = s.stream.push(t)
                if s.stream.stopped:
                    s.finish_reason = "stop"
                elif len(s.out_ids) >= p.max_new_tokens or len(s.prompt_ids) + len(s.out_ids) >= self.max_len:
                    s.finish_reason = "length"
                if text and not s.finished:
                    events.append(Event(s, text, False, tokens=len(s.out_ids)))
                    continue
                if s.finished:
                    text += s.stream.finish()
                    events.append(Event(s, text, True, tokens=len(s.out_ids)))
                    done.append(r)
                continue
            events.append(Event(s, s.stream.finish(), True, tokens=len(s.out_ids)))
            done.append(r)
        if done:
            self._remove(done)
        return events

    def _drop_cancelled(self) -> list[Event]:
        rows = [i for i, s in enumerate(self.seqs) if s.cancelled]
        events = []
        for i in rows:
            s = self.seqs[i]
            s.finish_reason = "cancelled"
            events.append(Event(s, "", True))
        if rows:
            self._remove(rows)
        return events

    def _remove(self, rows: Sequence[int]) -> None:
        gone = set(rows)
        keep = [i for i in range(len(self.seqs)) if i not in gone]
        m = len(keep)
        if keep != list(range(m)):  # move survivors' cache rows down over the gaps
            idx = torch.tensor(keep, device=self.device)
            used = int(self._pos.max()) + 1 if m else 0
            for kc, vc in zip(self.cache.k, self.cache.v, strict=True):
                kc[:m, :, :used] = kc[idx, :, :used]
                vc[:m, :, :used] = vc[idx, :, :used]
            self._last, self._pos = self._last[idx], self._pos[idx]
        else:
            self._last, self._pos = self._last[:m], self._pos[:m]
        self.seqs = [self.seqs[i] for i in keep]
        self._pkv = self._knobs = None
        self._lp_rows = None
        self._fused = _UNSET
