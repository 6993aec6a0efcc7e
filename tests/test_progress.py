"""`llama_adapter.progress`: a bar on a terminal, short periodic lines anywhere else."""

from __future__ import annotations

import io

from llama_adapter.progress import Progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_lines_at_each_tenth_and_at_the_end() -> None:
    out = io.StringIO()
    with Progress(95, "work", stream=out, every_s=1e9) as p:
        for i in range(95):
            p.update(1, loss=f"{1 / (i + 1):.3f}")
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert [x.split(" | ")[0] for x in lines] == [
        f"work: {n}/95 steps ({100 * n / 95:.0f}%)" for n in range(10, 91, 10)
    ] + ["work: 95/95 steps (100%)"]
    assert "loss 0.011" in lines[-1] and "elapsed" in lines[-1] and "ETA" not in lines[-1]
    assert "ETA" in lines[0]


def test_a_line_every_interval_when_slow_and_resumed_counts() -> None:
    out = io.StringIO()
    p = Progress(1000, "finetune", initial=500, stream=out, every_s=0.0)
    p.update(1)
    p.update(1)
    p.close()
    p.close()  # idempotent
    lines = out.getvalue().splitlines()
    assert [x.split(" | ")[0] for x in lines] == ["finetune: 501/1000 steps (50%)", "finetune: 502/1000 steps (50%)"]


def test_terminal_gets_a_bar_and_disabled_gets_nothing() -> None:
    tty = FakeTerminal()
    with Progress(10, "bar", stream=tty) as p:
        assert not p.lines
        for _ in range(10):
            p.update(1, acc="50.00")
    assert "\r" in tty.getvalue() and "acc=50.00" in tty.getvalue()
    quiet = io.StringIO()
    with Progress(10, "off", stream=quiet, enabled=False) as p:
        p.update(10)
    assert quiet.getvalue() == ""
