"""The server's decoding engine: `Engine`, one background thread running a `BatchDecoder` over all requests.

Continuous batching: requests are queued with `submit(seqs, sink)`; between decode steps the loop admits
waiting requests into free slots (FIFO, any mix of adapters; rand-init adapters only with themselves),
prefills them, and then runs one decode step (one forward pass) for every live request. Each `Event` (a text
delta, or the final one with `seq.finish_reason`) is handed to the request's `sink`, which must be cheap and
thread-safe (the server uses `loop.call_soon_threadsafe(queue.put_nowait, event)`). A cancelled request (client
gone) leaves the batch before the next step. A failing forward fails the requests in it, never the loop.
Adapters are changed only under `model_lock()`, and through `forget_adapter` for the decoder's caches.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch

from llama_adapter.inference.decoder import BatchDecoder, DecodeRequest, Event
from llama_adapter.model import Transformer

log = logging.getLogger("llama_adapter.serving.engine")
Sink = Callable[[Event], None]


class EngineObserver(Protocol):
    """What the engine reports per sequence (`serving.metrics.Metrics`); called from the engine thread."""

    def on_first_token(self, seconds: float) -> None: ...

    def on_finish(self, adapter: str | None, prompt_tokens: int, generated: int, per_token_s: float | None) -> None: ...


SHUTTING_DOWN = "the server is shutting down"


class QueueFull(Exception):
    """The waiting queue is at its limit (the server answers 429)."""


class EngineStopped(RuntimeError):
    """The engine was stopped (the server is shutting down: it answers 503, never a 500)."""


class Engine:
    """Continuous batching over one `BatchDecoder`: a queue of waiting requests and the thread that decodes them."""

    def __init__(
        self, model: Transformer, max_batch_size: int = 8, max_queue: int = 64, max_len: int | None = None
    ) -> None:
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError("max_batch_size must be >= 1 and max_queue >= 0")
        self.model = model
        self.decoder = BatchDecoder(model, max_batch_size, max_len)
        self.max_len = self.decoder.max_len
        self.max_queue = max_queue
        self._pending: deque[DecodeRequest] = deque()
        self._sinks: dict[int, Sink] = {}
        self._cond = threading.Condition()
        self._model_lock = threading.RLock()  # model + adapters + decoder; held for each step
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.peak_batch = 0  # most requests decoded together so far
        self.observer: EngineObserver | None = None  # set by the server for its metrics
        self._times: dict[int, list[float]] = {}  # seq id -> [queued at, first token at] (monotonic seconds)

    # ---- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="llama-adapter-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def drain(self, grace_s: float) -> None:
        """Stop after letting the requests in flight finish for at most `grace_s` seconds: a graceful shutdown.
        Those still queued or decoding then end with finish_reason "error" ("the server is shutting down"), which
        the server sends as a final event (streams) or a 503, so no client sees a torn connection."""
        deadline = time.monotonic() + max(0.0, grace_s)
        with self._cond:
            while (self._pending or self.decoder.seqs) and self._thread is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(timeout=min(left, 0.1))
        self.stop()

    @contextmanager
    def model_lock(self) -> Any:
        """Hold while changing the model's adapters (never during a step)."""
        with self._model_lock:
            yield self.model

    # ---- requests -------------------------------------------------------------------------------------
    def submit(self, seqs: Sequence[DecodeRequest], sink: Sink) -> None:
        """Queue sequences (all or none); raises QueueFull when the queue cannot take them."""
        with self._cond:
            if self._stop:
                raise EngineStopped(SHUTTING_DOWN)
            free = self.decoder.free
            if len(self._pending) + len(seqs) > self.max_queue + free:
                # pending requests up to the free slots join the batch at the next step: they are not waiting
                waiting = max(0, len(self._pending) - free)
                raise QueueFull(f"{waiting} requests waiting (limit {self.max_queue})")
            now = time.monotonic()
            for s in seqs:
                self._sinks[s.id] = sink
                self._times[s.id] = [now]
                self._pending.append(s)
            self._cond.notify_all()

    def cancel(self, seq: DecodeRequest) -> None:
        seq.cancelled = True
        with self._cond:
            self._cond.notify_all()

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self.decoder.seqs)

    @property
    def capacity(self) -> int:
        """The most sequences that can be decoding or waiting at once."""
        return self.max_queue + self.decoder.max_batch

    def adapters_in_use(self) -> set[str]:
        """The adapters of every queued or decoding request (cancelled ones too, until they leave): the ones an
        adapter registry must not evict."""
        with self._cond:
            names = {s.adapter for s in self._pending}
        names.update(s.adapter for s in list(self.decoder.seqs))
        return {n for n in names if n is not None}

    def forget_adapter(self, name: str) -> None:
        """Drop the decoder's cached state of adapter `name` (after it was loaded, replaced or removed)."""
        with self._model_lock:
            self.decoder.forget_adapter(name)

    # ---- the loop -------------------------------------------------------------------------------------
    def _observe(self, ev: Event) -> None:
        """Time to first token when the sequence's first token shows, tokens and time per token when it ends."""
        obs, s = self.observer, ev.seq
        times = self._times.get(s.id)
        if obs is None or times is None:
            if ev.finished:
                self._times.pop(s.id, None)
            return
        now = time.monotonic()
        if len(times) == 1 and s.out_ids:
            times.append(now)
            obs.on_first_token(now - times[0])
        if ev.finished:
            self._times.pop(s.id, None)
            n = len(s.out_ids)
            per_token = (now - times[1]) / (n - 1) if len(times) > 1 and n > 1 else None
            obs.on_finish(s.adapter, len(s.prompt_ids), n, per_token)

    def _emit(self, events: Sequence[Event]) -> None:
        for ev in events:
            try:
                self._observe(ev)
            except Exception:  # noqa: BLE001 -- metrics must never stop the loop
                log.exception("engine observer failed")
            sink = self._sinks.get(ev.seq.id)
            if ev.finished:
                self._sinks.pop(ev.seq.id, None)
            if sink is not None:
                try:
                    sink(ev)
                except Exception:  # noqa: BLE001 -- a dead consumer must not stop the loop
                    log.exception("event sink failed")

    def _admit(self) -> tuple[list[DecodeRequest], list[Event]]:
        joining: list[DecodeRequest] = []
        events: list[Event] = []
        dec = self.decoder
        with self._cond:
            for s in [s for s in self._pending if s.cancelled]:
                self._pending.remove(s)
                s.finish_reason = "cancelled"
                events.append(Event(s, "", True))
            while self._pending and len(joining) < dec.free and dec.can_join(self._pending[0], joining):
                joining.append(self._pending.popleft())
        ready = []
        for s in joining:
            if s.adapter is not None and s.adapter not in self.model.adapters:  # deleted while the request waited
                s.finish_reason, s.error = "error", f"no adapter named {s.adapter!r}"
                events.append(Event(s, "", True))
                continue
            try:
                s.pkv = dec.prompt_kv_for(s)
                ready.append(s)
            except Exception as e:  # noqa: BLE001 -- e.g. the adapter was removed while the request waited
                s.finish_reason, s.error = "error", (str(e.args[0]) if isinstance(e, KeyError) else str(e))
                events.append(Event(s, "", True))
        return ready, events

    def _run(self) -> None:
        with torch.no_grad():
            while True:
                with self._cond:
                    while not self._stop and not self._pending and not self.decoder.seqs:
                        self._cond.wait(timeout=1.0)
                    if self._stop:
                        break
                with self._model_lock:
                    self._tick()
        with self._model_lock:
            self._emit(self.decoder.fail_all(SHUTTING_DOWN))
            with self._cond:
                pending, self._pending = list(self._pending), deque()
            for s in pending:
                s.finish_reason, s.error = "error", SHUTTING_DOWN
            self._emit([Event(s, "", True) for s in pending])

    def _tick(self) -> None:
        dec = self.decoder
        joining, events = self._admit()
        self._emit(events)
        if joining:
            try:
                self._emit(dec.add(joining))
            except Exception as e:  # noqa: BLE001
                log.exception("prefill failed")
                failed = [s for s in joining if not s.finished and s not in dec.seqs]
                for s in failed:
                    s.finish_reason, s.error = "error", f"prefill failed: {e}"
                self._emit([Event(s, "", True) for s in failed])
        if dec.seqs:
            self.peak_batch = max(self.peak_batch, len(dec.seqs))
            try:
                self._emit(dec.step())
                self.steps += 1
            except Exception as e:  # noqa: BLE001
                log.exception("decode step failed")
                self._emit(dec.fail_all(f"decoding failed: {e}"))
