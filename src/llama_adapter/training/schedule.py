"""The learning-rate schedule and the run's step counts (paper sec. 4.1).

The rate is the peak lr times `lr_factor`: linear warm-up over `warmup_epochs`, then a half-cosine to 0 at
`epochs`, stepped per optimiser step (not per epoch). `--max-steps` stops a run early without stretching or
shrinking this schedule, so a short run follows the first steps of the long one exactly.
"""

from __future__ import annotations

import math

from llama_adapter.training.data import steps_per_epoch


def lr_factor(step: int, spe: int, epochs: float, warmup_epochs: float) -> float:
    """Multiplier of the peak lr at (0-based) step: linear warm-up, then half-cosine to 0 at `epochs`."""
    w, total = warmup_epochs * spe, epochs * spe
    if step < w:
        return min(1.0, (step + 1) / w)
    if total <= w:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - w) / (total - w))))


def step_counts(n_examples: int, batch_size: int, epochs: float, max_steps: int | None) -> tuple[int, int, int]:
    """(steps per epoch, steps of the whole schedule, steps this run takes: at most `max_steps`)."""
    spe = steps_per_epoch(n_examples, batch_size)
    total_steps = max(1, math.ceil(epochs * spe))
    run_steps = min(total_steps, max_steps) if max_steps else total_steps
    return spe, total_steps, run_steps
