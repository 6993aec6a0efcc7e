"""Incremental detokenisation: token ids in, UTF-8-safe text deltas out, stop strings applied."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class TextStream:
    """Turns generated token ids into UTF-8-safe text deltas and applies stop strings.

    Decodes a small window (the last emitted token onwards) and diffs against the window's old text, so
    tokenizers that merge bytes or strip leading spaces (byte-level BPE, sentencepiece) give exact text and
    a partial multi-byte character (decoded as U+FFFD) is held back until its last byte arrives. Text that
    could be the start of a stop string is held back too, until it is clear.

    With `strip_separator`, one space at the start of the text is dropped: the space that separates a template's
    response marker ("### Response:", "[/INST]") from the answer belongs to neither (stop strings apply after).
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = (), strip_separator: bool = False) -> None:
        self.tok, self.stop = tokenizer, tuple(stop)
        self._strip = strip_separator
        self.ids: list[int] = []
        self._prefix = self._read = 0
        self.text = ""  # everything decoded so far (cut at a stop string)
        self._sent = 0  # chars of `text` handed out
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; returns the text that can be emitted now (maybe empty)."""
        self.ids.append(token_id)
        if self.tok is None:
            return ""
        old = self.tok.decode(self.ids[self._prefix : self._read])
        new = self.tok.decode(self.ids[self._prefix :])
        if len(new) > len(old) and not new.endswith("\ufffd"):
            self._add(new[len(old) :])
            self._prefix, self._read = self._read, len(self.ids)
        return self._emit(final=False)

    def finish(self) -> str:
        """The remaining text at the end of the sequence (flushes held-back text)."""
        if self.tok is not None and not self.stopped:
            old = self.tok.decode(self.ids[self._prefix : self._read])
            new = self.tok.decode(self.ids[self._prefix :]).rstrip("\ufffd")
            if len(new) > len(old):
                self._add(new[len(old) :])
        return self._emit(final=True)

    def _add(self, delta: str) -> None:
        if self.stopped:
            return
        if self._strip and delta:
            self._strip = False
            delta = delta[1:] if delta.startswith(" ") else delta
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        self.text += delta
        cut = min((i for i in (self.text.find(s, start) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True

    def _emit(self, final: bool) -> str:
        end = len(self.text)
        if not final and not self.stopped:
            for s in self.stop:  # hold back a suffix that may grow into a stop string
                for n in range(min(len(s) - 1, end - self._sent), 0, -1):
                    if self.text.endswith(s[:n]):
                        end = min(end, len(self.text) - n)
                        break
        out, self._sent = self.text[self._sent : end], max(self._sent, end)
        return out
