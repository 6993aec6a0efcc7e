"""Decoding settings of one sequence (`SamplingParams`) and the sampler that applies them row by row."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


class SamplingError(ValueError):
    """A bad decoding setting: `field` names it and `requirement` says what it must be, so that a caller speaking
    another vocabulary (the server's `max_tokens` for `max_new_tokens`) can word the error its own way."""

    def __init__(self, field: str, requirement: str, value: object) -> None:
        super().__init__(f"{field} {requirement}, not {value!r}")
        self.field, self.requirement, self.value = field, requirement, value


@dataclass
class SamplingParams:
    """Decoding settings of one sequence. temperature 0 means greedy; top_k 0 means no top-k cut.

    Defaults are the paper's (temperature 0.1, top-p 0.75). `stop` strings end the completion (the stop
    string itself is not included). `seed` makes sampling reproducible, independently of the batch.
    """

    max_new_tokens: int = 128
    temperature: float = 0.1
    top_p: float = 0.75
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # benchmarks: always run to max_new_tokens

    def __post_init__(self) -> None:
        def is_int(x: object) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x: object) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool)

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise SamplingError("max_new_tokens", "must be an integer >= 0", self.max_new_tokens)
        if not is_num(self.temperature) or not 0 <= self.temperature < float("inf"):
            raise SamplingError("temperature", "must be a number >= 0", self.temperature)
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise SamplingError("top_p", "must be in (0, 1]", self.top_p)
        if not is_int(self.top_k) or self.top_k < 0:
            raise SamplingError("top_k", "must be an integer >= 0", self.top_k)
        if self.seed is not None and not is_int(self.seed):
            raise SamplingError("seed", "must be an integer", self.seed)
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if not all(isinstance(s, str) and s for s in stop):
            raise SamplingError("stop", "must be a non-empty string or a list of non-empty strings", self.stop)
        self.stop = stop
        self.temperature, self.top_p = float(self.temperature), float(self.top_p)
        self.top_k = min(self.top_k, 1 << 31)  # beyond any vocabulary; keeps the int64 tensor sane


def sample(
    logits: Tensor,
    temperature: Tensor,
    top_p: Tensor,
    top_k: Tensor,
    generators: Sequence[torch.Generator | None],
    greedy: Tensor | None = None,
) -> Tensor:
    """Next tokens [B] from logits [B, V] with per-row temperature / top-p / top-k (temperature 0: argmax;
    `greedy`, where given, is that argmax already taken, e.g. by the backend's faster kernel).

    Sampling is an exponential race (argmax of p / E, E ~ Exp(1)) with each row's noise drawn from its own
    generator, so a seeded row gives the same tokens whatever else is in the batch.
    """
    if greedy is None:
        greedy = logits.argmax(-1)
    if not bool((temperature > 0).any()):
        return greedy
    x = logits.float() / temperature.clamp_min(1e-5)[:, None]
    sorted_x, order = x.sort(-1, descending=True)
    probs = sorted_x.softmax(-1)
    drop = (probs.cumsum(-1) - probs) > top_p[:, None]  # the first token is always kept
    ranks = torch.arange(probs.shape[-1], device=probs.device)[None]
    drop |= (top_k[:, None] > 0) & (ranks >= top_k[:, None])
    probs = probs.masked_fill(drop, 0.0)
    noise = torch.empty_like(probs)
    for i, g in enumerate(generators):
        noise[i].exponential_(generator=g)
    choice = (probs / noise).argmax(-1, keepdim=True)
    sampled = order.gather(-1, choice)[:, 0]
    return torch.where(temperature > 0, sampled, greedy)
