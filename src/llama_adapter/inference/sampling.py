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


# tokens ranked by `topk` before a row is sorted whole: at the paper's settings (top-p 0.75 at temperature 0.1) a
# nucleus holds a handful of tokens, and sorting SmolLM2's 49152 logits took 3.7 ms a row on a 2-core CPU (one
# exponential drawn per token, as the sampler drew them before, 1.1 ms more) against ~5 ms for its whole int8 decode
# step; the 64 best by `topk`, ~0.1 ms
CANDIDATES = 64


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

    A sampling row keeps the tokens of its nucleus (ranked by probability, ties by token id: those with at most
    top_p of the probability ranked before them, the first always, at most top_k of them) and draws one of them in
    proportion to its probability, by inverting their cumulative sum at one uniform number from the row's own
    generator. Each row's tokens are ranked alone (the CANDIDATES best, or the whole row where its nucleus may reach
    further; no ranking where it keeps every token), so a seeded row gives the same tokens whatever else is in the
    batch.
    """
    if greedy is None:
        greedy = logits.argmax(-1)
    sampling = temperature > 0
    if not bool(sampling.any()):
        return greedy
    return sample_at(logits, temperature, top_p, top_k, uniforms(generators, logits.device), greedy)


def uniforms(generators: Sequence[torch.Generator | None], device: torch.device) -> Tensor:
    """One number in [0, 1) a row [B], each from the row's own generator (None: the global one), drawn at every step
    in which any row samples: where a sampling row lands in its nucleus (`sample_at`)."""
    return torch.stack([torch.rand((), generator=g, device=device) for g in generators])


def sample_at(logits: Tensor, temperature: Tensor, top_p: Tensor, top_k: Tensor, u: Tensor, greedy: Tensor) -> Tensor:
    """`sample` with each row's uniform number u [B] drawn (`uniforms`): a backend's sampler takes the same ones."""
    sampling = temperature > 0
    x = logits.float() / temperature.clamp_min(1e-5)[:, None]
    V = x.shape[-1]
    top = x.amax(-1, keepdim=True)
    lse = top + _exp(x - top).sum(-1, keepdim=True).log()
    whole = sampling & (top_p >= 1) & (top_k <= 0)  # the whole distribution: no ranking needed
    k = min(CANDIDATES, V)
    cand_x, cand = _ranked(*x.topk(k, -1))
    probs = _exp(cand_x - lse)
    # rows whose nucleus may reach past the candidates: all of them kept, or the last one kept tied with the last
    # candidate (topk picks any of a tie: more of it may lie outside, of lower ids); ranked whole below
    kept = _kept(probs, top_p, top_k).sum(-1, keepdim=True)
    edge_tie = cand_x[:, -1:] == cand_x.gather(-1, (kept - 1).clamp_min(0))
    reach = sampling & ~whole & (k < V) & ((kept[:, 0] == k) | edge_tie[:, 0])
    rows = sampling & ~whole & ~reach  # the nucleus among the candidates
    if bool(rows.all()):  # (the usual batch: no row needs more, so no row is picked out)
        return _draw(probs, cand, top_p, top_k, u)
    chosen = greedy.clone()
    if bool(rows.any()):
        chosen[rows] = _draw(probs[rows], cand[rows], top_p[rows], top_k[rows], u[rows])
    if bool(reach.any()):
        sorted_x, order = x[reach].sort(dim=-1, descending=True, stable=True)  # ties by token id, as _ranked
        chosen[reach] = _draw(_exp(sorted_x - lse[reach]), order, top_p[reach], top_k[reach], u[reach])
    if bool(whole.any()):  # every token, in id order
        chosen[whole] = _draw(_exp(x[whole] - lse[whole]), None, None, None, u[whole])
    return chosen


def _exp(d: Tensor) -> Tensor:
    """e^d for d <= 0, and 0 where d < -80 (e^-80 is 1.8e-35): fp32 e^d below ~-87 is subnormal, on which x86 CPUs
    take a slow path; at temperature 0.1 most of a row is that far below its best token (a 49152-logit row's
    logsumexp took 0.48 ms, ~0.1 this way). The sums are unchanged: what is left out is below their rounding."""
    return d.clamp_min(-80.0).exp_().masked_fill_(d < -80.0, 0.0)


def _draw(probs: Tensor, ids: Tensor | None, top_p: Tensor | None, top_k: Tensor | None, u: Tensor) -> Tensor:
    """For each row of probabilities [R, n] (ranked best first, of the tokens `ids`; or every token in id order,
    ids None, and no cut), the token at u [R] (uniform in [0, 1)) of the cumulative sum of those it keeps: the
    tokens with at most top_p of the probability before them, at most top_k of them (0: no limit)."""
    if top_p is not None and top_k is not None:
        probs = probs * _kept(probs, top_p, top_k)
    cdf = probs.cumsum(-1)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_max(probs.shape[-1] - 1)
    return pick[:, 0] if ids is None else ids.gather(-1, pick)[:, 0]


def _kept(probs: Tensor, top_p: Tensor, top_k: Tensor) -> Tensor:
    """Which of the ranked tokens [R, n] (best first) a row keeps: those with at most top_p of the probability before
    them (the first always), at most top_k of them (0: no limit); a prefix of each row."""
    ranks = torch.arange(probs.shape[-1], device=probs.device)[None]
    return (probs.cumsum(-1) - probs <= top_p[:, None]) & ((top_k[:, None] <= 0) | (ranks < top_k[:, None]))


def _ranked(values: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """`topk`'s values and token ids [B, k] ordered by value and, among equal values, by token id (as a stable
    sort of the whole row ranks them): which of two tied tokens comes first must not depend on how it was found."""
    ids, by_id = ids.sort(-1)
    values, order = values.gather(-1, by_id).sort(dim=-1, descending=True, stable=True)
    return values, ids.gather(-1, order)
