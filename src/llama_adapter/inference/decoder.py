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
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from llama_adapter.backends.cpu import fused_decode as cpu_decode
from llama_adapter.inference.sampling import SamplingParams, sample
from llama_adapter.inference.text_stream import TextStream
from llama_adapter.model import KVCache, Transformer
from llama_adapter.zero_init_attention import PromptKV

PKV = dict[int, PromptKV]
_ids = itertools.count()


@dataclass(eq=False)
class DecodeRequest:
    """One request in the decoder: prompt ids, adapter, sampling settings and the generated state."""

    prompt_ids: list[int]
    adapter: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    image_features: Tensor | None = None  # [1, F]
    tag: Any = None  # caller's handle (row index, server request)
    id: int = field(default_factory=lambda: next(_ids))
    # state
    pkv: PKV | None = None
    stream: TextStream | None = None
    out_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None
    cancelled: bool = False
    generator: torch.Generator | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Event:
    seq: DecodeRequest
    text: str
    finished: bool


def merge_prompt_kv(rows: Sequence[PKV | None]) -> PKV | None:
    """Batch-level prompt K/V from per-sequence ones ([1, ...] each, or None for base rows).

    Covers the union of adapted layers; rows without an adapter at a layer get zero K/V and gate 0, and
    prompts shorter than the longest are padded and masked. Rand-init adapters cannot be mixed.
    """
    n = len(rows)
    present = [r for r in rows if r]
    if not present:
        return None
    if all(r is rows[0] for r in rows):  # one adapter for the whole batch (contiguous: CPU matmuls want it)
        return {li: PromptKV(p.k.expand(n, -1, -1, -1).contiguous(), p.v.expand(n, -1, -1, -1).contiguous(),
                             p.gate.expand(n, -1),
                             p.random_init, None if p.mask is None else p.mask.expand(n, -1, -1, -1))
                for li, p in rows[0].items()}  # type: ignore[union-attr]
    random_init = any(p.random_init for r in present for p in r.values())
    groups: dict[int, tuple[PKV, list[int]]] = {}
    for i, r in enumerate(rows):
        if r:
            groups.setdefault(id(r), (r, []))[1].append(i)
    layers = sorted({li for r in present for li in r})
    if random_init:
        ks = {p.k.shape[2] for r in present for p in r.values()}
        if len(present) < n or len(ks) > 1 or any(set(r) != set(layers) for r in present):
            raise ValueError("a rand-init adapter cannot share a batch with other adapters or base rows")
    out: PKV = {}
    for li in layers:
        entries = [(r[li], idx) for r, idx in groups.values() if li in r]
        ref = entries[0][0]
        kmax = max(p.k.shape[2] for p, _ in entries)
        _, n_kv, _, hd = ref.k.shape
        k = ref.k.new_zeros(n, n_kv, kmax, hd)
        v = ref.v.new_zeros(n, n_kv, kmax, hd)
        gate = ref.gate.new_zeros(n, ref.gate.shape[1])
        need_mask = any(p.k.shape[2] < kmax or p.mask is not None for p, _ in entries)
        mask = torch.ones(n, 1, 1, kmax, dtype=torch.bool, device=k.device) if need_mask else None
        for p, idx in entries:
            K = p.k.shape[2]
            t = torch.tensor(idx, device=k.device)
            k[t, :, :K] = p.k[:1].to(k.dtype)
            v[t, :, :K] = p.v[:1].to(v.dtype)
            gate[t] = p.gate[:1].to(gate.dtype)
            if mask is not None:
                mask[t, :, :, K:] = False
                if p.mask is not None:
                    mask[t, :, :, :K] = p.mask[:1]
        out[li] = PromptKV(k, v, gate, random_init=random_init, mask=mask)
    return out


# Prompt K/V per adapter object (sequences without an image), shared by every decoder: projected once per adapter
# and its current values, not once per `generate` call. The key holds the storage and version counter of the
# adapter's parameters and of the frozen k/v projections they go through, so training or reloading either one
# (in place or not) is seen.
_PROMPT_KV: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[Any, ...], PKV | None]] = weakref.WeakKeyDictionary()


class BatchDecoder:
    """Fixed cache slots; live sequences packed in rows 0..n-1; one forward per decode step.

    `add(seqs)` prefills joining sequences (one forward for all of them) and samples their first token;
    `step()` decodes one token for every live sequence. Both return `Event`s (text deltas; `finished` on a
    sequence's last one); finished and cancelled sequences leave the batch at once.
    """

    def __init__(self, model: Transformer, max_batch: int, max_len: int | None = None,
                 tokenizer: Any = "model") -> None:
        self.model = model
        model.pack_for_decoding()
        self.max_batch = max_batch
        self.max_len = min(max_len or model.config.max_seq_len, model.config.max_seq_len)
        self.tokenizer = model.tokenizer if tokenizer == "model" else tokenizer
        eos = set(model.config.eos_token_ids or [])
        if self.tokenizer is not None:
            eos |= set(getattr(self.tokenizer, "eos_ids", []) or [])
        self.eos = eos
        self.device = model.tok_embeddings.weight.device
        # fp32 keys/values on CPUs: small bf16 batched matmuls are slow there (cpu_kernels.decode_attention)
        self.kv_dtype = torch.float32 if self.device.type == "cpu" else model.tok_embeddings.weight.dtype
        self.cache: KVCache = model.new_cache(max_batch, self.max_len, dtype=self.kv_dtype)
        self.seqs: list[DecodeRequest] = []
        self._last = torch.zeros(0, 1, dtype=torch.long, device=self.device)
        self._pos = torch.zeros(0, 1, dtype=torch.long, device=self.device)
        self._pkv: PKV | None = None
        self._knobs: tuple[Tensor, Tensor, Tensor, list[torch.Generator | None]] | None = None
        self._use_fused = cpu_decode.supported(model)  # bf16 on CPUs with the C++ kernels: cpu_decode.py
        self._fused: cpu_decode.FusedPrompts | None = None

    # ---- membership ----------------------------------------------------------------------------------
    @property
    def free(self) -> int:
        return self.max_batch - len(self.seqs)

    def _random_init(self, name: str | None) -> bool:
        a = self.model.adapters[name] if name is not None and name in self.model.adapters else None
        return a is not None and a.cfg.init == "random"  # type: ignore[union-attr]

    def can_join(self, seq: DecodeRequest, others: Sequence[DecodeRequest] = ()) -> bool:
        """Rand-init adapters only share a batch with sequences of the same adapter."""
        live = [*self.seqs, *others]
        if not live:
            return True
        if self._random_init(seq.adapter) or any(self._random_init(s.adapter) for s in live):
            return all(s.adapter == seq.adapter for s in live) and seq.image_features is None
        return True

    def prompt_kv_for(self, seq: DecodeRequest) -> PKV | None:
        if seq.adapter is None:
            return None
        if seq.image_features is not None:
            return self._to_kv_dtype(self.model.prompt_kv(seq.adapter, 1, seq.image_features.to(self.device)))
        adapter = self.model.adapters[seq.adapter]
        layers = self.model.layers[adapter.first_layer:]
        tensors = (adapter.prompts, adapter.gates, *(layer.attention.wqkv.weight for layer in layers))
        key = (id(self.model), self.kv_dtype, *((t.data_ptr(), t._version) for t in tensors))
        hit = _PROMPT_KV.get(adapter)
        if hit is None or hit[0] != key:
            hit = _PROMPT_KV[adapter] = (key, self._to_kv_dtype(self.model.prompt_kv(seq.adapter, 1)))
        return hit[1]

    def _to_kv_dtype(self, pkv: PKV | None) -> PKV | None:
        if pkv is None:
            return None
        return {li: replace(p, k=p.k.to(self.kv_dtype), v=p.v.to(self.kv_dtype)) for li, p in pkv.items()}

    def forget_adapter(self, name: str) -> None:
        """Drop cached prompt K/V of an adapter; live sequences keep theirs. (A removed or replaced adapter's
        entry goes with the adapter object anyway.)"""
        if name in self.model.adapters:
            _PROMPT_KV.pop(self.model.adapters[name], None)

    def _init_seq(self, seq: DecodeRequest) -> None:
        p = seq.params
        seq.stream = TextStream(self.tokenizer, p.stop)
        seq.out_ids = []
        if p.seed is not None:
            seq.generator = torch.Generator(device=self.device)
            seq.generator.manual_seed(p.seed % (1 << 64))  # any integer, negative or huge

    @torch.no_grad()
    def add(self, seqs: Sequence[DecodeRequest]) -> list[Event]:
        """Prefill `seqs` into free slots (raises if there are not enough); returns their first events."""
        if len(seqs) > self.free:
            raise ValueError(f"{len(seqs)} sequences for {self.free} free slots")
        events: list[Event] = []
        joining = []
        for s in seqs:
            if not s.prompt_ids:
                raise ValueError("empty prompt")
            if len(s.prompt_ids) >= self.max_len:
                raise ValueError(f"prompt of {len(s.prompt_ids)} tokens does not fit the context of "
                                 f"{self.max_len} tokens")
            self._init_seq(s)
            if s.pkv is None:
                s.pkv = self.prompt_kv_for(s)
            if s.params.max_new_tokens == 0 or s.cancelled:
                s.finish_reason = "cancelled" if s.cancelled else "length"
                events.append(Event(s, s.stream.finish() if s.stream else "", True))
            else:
                joining.append(s)
        if not joining:
            return events
        n, j = len(self.seqs), len(joining)
        lens = [len(s.prompt_ids) for s in joining]
        T = max(lens)
        pad = self.tokenizer.pad_id if self.tokenizer is not None else 0
        ids = torch.tensor([s.prompt_ids + [pad] * (T - len(s.prompt_ids)) for s in joining],
                           dtype=torch.long, device=self.device)
        pos = torch.arange(T, device=self.device)[None].expand(j, T)
        view = KVCache([k[n:n + j] for k in self.cache.k], [v[n:n + j] for v in self.cache.v])
        pkv = merge_prompt_kv([s.pkv for s in joining])
        h = self.model(ids, input_pos=pos, cache=view, prompt_kv=pkv, return_hidden=True)
        last = torch.tensor([x - 1 for x in lens], device=self.device)
        logits = self.model.logits(h[torch.arange(j, device=self.device), last])
        temp, top_p, top_k, gens = self._make_knobs(joining)
        tokens = sample(logits.float(), temp, top_p, top_k, gens)
        self.seqs.extend(joining)
        self._last = torch.cat([self._last, tokens[:, None]])
        self._pos = torch.cat([self._pos, torch.tensor(lens, device=self.device)[:, None]])
        self._pkv, self._knobs = (pkv, (temp, top_p, top_k, gens)) if n == 0 else (None, None)
        self._fused = None
        events += self._accept(tokens.tolist(), first_row=n)
        return events

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
        self._pkv = self._knobs = self._fused = None
        return events

    # ---- decoding ------------------------------------------------------------------------------------
    def _make_knobs(self, seqs: Sequence[DecodeRequest]) -> tuple[Tensor, Tensor, Tensor, list[torch.Generator | None]]:
        d = self.device
        temp = torch.tensor([s.params.temperature for s in seqs], device=d)
        top_p = torch.tensor([s.params.top_p for s in seqs], device=d)
        top_k = torch.tensor([s.params.top_k for s in seqs], device=d)
        return temp, top_p, top_k, [s.generator for s in seqs]

    @torch.no_grad()
    def step(self) -> list[Event]:
        events = self._drop_cancelled()
        if not self.seqs:
            return events
        if self._pkv is None:
            self._pkv = merge_prompt_kv([s.pkv for s in self.seqs])
        if self._knobs is None:
            self._knobs = self._make_knobs(self.seqs)
        if self._fused is None and self._use_fused and not any(p.random_init for p in (self._pkv or {}).values()):
            self._fused = cpu_decode.FusedPrompts(self._pkv)
        if self._fused is not None:
            logits = cpu_decode.decode_step(self.model, self._last[:, 0], self._pos[:, 0], self.cache, self._fused)
        else:
            logits = self.model(self._last, input_pos=self._pos, cache=self.cache, prompt_kv=self._pkv)[:, -1]
        tokens = sample(logits.float(), *self._knobs)
        self._last = tokens[:, None]
        self._pos = self._pos + 1
        events += self._accept(tokens.tolist(), first_row=0)
        return events

    def _accept(self, tokens: list[int], first_row: int) -> list[Event]:
        """Record each row's new token (already written at its position), finish rows, compact."""
        events = []
        done = []
        for r, t in enumerate(tokens, start=first_row):
            s = self.seqs[r]
            assert s.stream is not None
            p = s.params
            if t in self.eos and not p.ignore_eos:
                s.finish_reason = "stop"
            else:
                s.out_ids.append(t)
                text = s.stream.push(t)
                if s.stream.stopped:
                    s.finish_reason = "stop"
                elif len(s.out_ids) >= p.max_new_tokens or len(s.prompt_ids) + len(s.out_ids) >= self.max_len:
                    s.finish_reason = "length"
                if text and not s.finished:
                    events.append(Event(s, text, False))
                    continue
                if s.finished:
                    text += s.stream.finish()
                    events.append(Event(s, text, True))
                    done.append(r)
                continue
            events.append(Event(s, s.stream.finish(), True))
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
        self._pkv = self._knobs = self._fused = None
