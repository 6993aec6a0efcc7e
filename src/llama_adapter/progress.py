"""Progress display that suits where it goes: a live bar on a terminal, plain periodic lines anywhere else.

A carriage-return bar written to a file or a pipe (a CI log, `2> train.log`, `| tee`) is one ever-growing line:
a 600-step demo left a 62,847-character line of 509 updates. So `Progress` asks its stream once: on a terminal it
is a tqdm bar; otherwise it prints one short line each time another tenth of the work is done or `every_s`
seconds have passed (whichever comes first), and a last line at the end, never a carriage return.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import IO, Any

LINE_EVERY_FRACTION = 0.1  # a line per tenth of the work...
LINE_EVERY_S = 30.0  # ... or per half minute, whichever comes first


def is_terminal(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' warnings and progress bars silenced while a checkpoint loads, then restored as they were: the
    unused task head of a *For... checkpoint is not news here, and a bar for loading a few tensors would interleave
    with our own progress lines."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _fmt_time(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """Progress of `total` units of work, reported to `stream` (default: stderr) as a bar or as lines.

    `update(n, **stats)` advances by n units and sets the short statistics shown with it (loss=..., acc=...;
    values are shown as given, so pass them formatted). `close()` (or leaving a `with` block) ends the display.
    `enabled=False` shows nothing, so callers need no branches of their own.
    """

    def __init__(
        self,
        total: int,
        desc: str,
        *,
        unit: str = "step",
        initial: int = 0,
        stream: IO[str] | None = None,
        enabled: bool = True,
        every_fraction: float = LINE_EVERY_FRACTION,
        every_s: float = LINE_EVERY_S,
    ) -> None:
        self.total, self.desc, self.unit = max(0, total), desc, unit
        self.n = self.start = initial
        self.stream: IO[str] = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.stats: dict[str, Any] = {}
        self.every_n = max(1, round(self.total * every_fraction)) if self.total else 1
        self.every_s = every_s
        self.t0 = self.last_t = time.monotonic()
        self.last_n = initial
        self.closed = False
        self.bar: Any = None
        if enabled and is_terminal(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=self.stream
            )

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def lines(self) -> bool:
        """True when reporting as plain lines (enabled, not a terminal)."""
        return self.enabled and self.bar is None

    def update(self, n: int = 1, **stats: Any) -> None:
        if not self.enabled or self.closed:
            return
        self.n += n
        self.stats.update(stats)
        if self.bar is not None:
            if stats:
                self.bar.set_postfix(self.stats, refresh=False)
            self.bar.update(n)
            return
        now = time.monotonic()
        # a line when the count passes a multiple of `every_n` (unless a timed line came just before), or when
        # `every_s` went by
        crossed = self.n // self.every_n > self.last_n // self.every_n
        if (crossed and self.n - self.last_n >= max(1, self.every_n // 4)) or now - self.last_t >= self.every_s:
            self._line(now)

    def _line(self, now: float) -> None:
        done = self.n - self.start
        elapsed = now - self.t0
        parts = [f"{self.desc}: {self.n}/{self.total} {self.unit}s"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts += [f"{k} {v}" for k, v in self.stats.items()]
        timing = f"{_fmt_time(elapsed)} elapsed"
        if done > 0 and self.n < self.total:
            timing += f", ETA {_fmt_time(elapsed / done * (self.total - self.n))}"
        parts.append(timing)
        print(" | ".join(parts), file=self.stream, flush=True)
        self.last_t, self.last_n = now, self.n

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.n != self.last_n:  # the last state, unless its line is already out
            self._line(time.monotonic())
