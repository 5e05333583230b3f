"""Token budgets: how many tokens a reference keeps, which ones, and sharing one budget across references.

Scores are (h, w) maps on a token grid; picked tokens are flat row-major indices into h * w.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._checks import as_scores, check_nonneg, check_unit, describe
from .coverage import grid_ranking
from .tokens import resize_scores

MODES = ("ratio", "count", "adaptive")


@dataclass(frozen=True)
class Budget:
    """How many reference tokens to keep, and how many of them go to the stratified coverage floor.

    Attributes:
        mode: ``"ratio"`` (keep ``ratio`` of the tokens), ``"count"`` (keep ``count`` tokens) or
            ``"adaptive"`` (keep as many as needed to hold ``mass`` of the score mass, clamped to
            ``[min_ratio, max_ratio]`` of the tokens).
        ratio: in [0, 1]; 0 keeps nothing (the reference then contributes nothing).
        count: int >= 0 (capped at the number of tokens).
        mass: in (0, 1], adaptive only.
        min_ratio, max_ratio: in [0, 1], ``min_ratio <= max_ratio``, adaptive only.
        coverage: in [0, 1): share of the kept tokens taken from the stratified grid ranking before
            the scores choose the rest (the coverage floor).
    """

    mode: str = "ratio"
    ratio: float = 0.25
    count: int = 1024
    mass: float = 0.8
    min_ratio: float = 0.05
    max_ratio: float = 0.5
    coverage: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {self.mode!r}")
        check_unit(self.ratio, "ratio")
        check_nonneg(self.count, "count", integer=True)
        check_unit(self.mass, "mass", low_open=True)
        check_unit(self.min_ratio, "min_ratio")
        check_unit(self.max_ratio, "max_ratio")
        if self.min_ratio > self.max_ratio:
            raise ValueError(f"min_ratio: must be <= max_ratio, got {self.min_ratio} > {self.max_ratio}")
        check_unit(self.coverage, "coverage", high_open=True)

    def token_count(self, scores: torch.Tensor | None = None, n_tokens: int | None = None) -> int:
        """Number of tokens to keep out of ``N`` (``n_tokens``, default ``scores.numel()``).

        * ratio: ``round(ratio * N)`` (half up); count: ``min(count, N)``.
        * adaptive: the smallest k whose top-k scores hold >= ``mass`` of the total, measured on
          ``scores - scores.min()`` (the part of the map that differs from its floor): a flat map
          (all scores equal, e.g. a plain picture's zero edges) has no mass and gets the minimum;
          a map whose mass is spread (busy picture) needs more tokens than a peaked one. The
          fraction k / numel is applied to N (so a map on a coarser grid still sizes the real one),
          rounded half up and clamped to ``[round(min_ratio N), round(max_ratio N)]``.
          Scale-invariant: multiplying the scores by a constant does not change the count.

        Args:
            scores: (h, w) map, required for adaptive.
            n_tokens: token count of the grid being selected from, if it differs from ``scores``.
        """
        if scores is not None:
            scores = as_scores(scores, ranks=(2,))
        if n_tokens is None:
            if scores is None:
                raise ValueError("scores: required when n_tokens is not given")
            n_tokens = scores.numel()
        n = int(check_nonneg(n_tokens, "n_tokens", integer=True))
        if self.mode == "ratio":
            return _round_half_up(self.ratio * n)
        if self.mode == "count":
            return min(self.count, n)
        if scores is None:
            raise ValueError("scores: required for mode 'adaptive'")
        s = scores.detach().to("cpu", torch.float64).flatten()
        s = s - s.min()
        total = float(s.sum())
        frac = 0.0
        if total > 0:
            csum = torch.cumsum(torch.sort(s, descending=True).values, 0)
            # tolerance so that e.g. mass 0.5 of [1, 1] is 1 token despite rounding in the sum
            k = int(torch.searchsorted(csum, torch.tensor([self.mass * total * (1 - 1e-12)], dtype=torch.float64))) + 1
            frac = min(k, s.numel()) / s.numel()
        lo, hi = _round_half_up(self.min_ratio * n), _round_half_up(self.max_ratio * n)
        return min(max(_round_half_up(frac * n), lo), hi)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5 + 1e-9))  # 1e-9: 0.3 * 10 is 2.9999999999999996


def pick_tokens(scores: torch.Tensor, k: int, coverage: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Indices of the tokens to keep: LongTensor (k,), sorted ascending, unique, flat row-major into h * w.

    The first ``ceil(coverage * k)`` tokens come from the stratified grid ranking
    (:func:`~.coverage.grid_ranking` with ``seed``), so with ``ceil(coverage * k) >=
    ceil(h/s) * ceil(w/s)`` every ``s x s`` window of the grid (s a power of two) keeps a token.
    The rest are the highest scores among the remaining tokens. Ties are broken by the grid
    ranking, so constant regions are thinned evenly and a constant map (e.g. all zeros) falls back
    to the grid ranking exactly.

    Determinism: the ranking runs on CPU in float64 with that integer tie-break, so the same score
    values and seed give the same tokens on any device. The result is on ``scores.device``.

    Args:
        scores: (h, w) finite map (higher = keep first).
        k: 0 <= k <= h * w; 0 -> empty, h * w -> arange(h * w).
        coverage: in [0, 1).
        seed: picks the grid ranking's offset (see :func:`~.coverage.grid_ranking`).
    """
    s = as_scores(scores, ranks=(2,))
    n = s.numel()
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
        raise ValueError(f"k: expected an int in [0, {n}] (the number of tokens), got {k!r}")
    coverage = check_unit(coverage, "coverage", high_open=True)
    device = s.device
    if k == n:
        return torch.arange(n, device=device)
    order = grid_ranking(tuple(s.shape), seed)
    n_cov = min(k, math.ceil(coverage * k - 1e-9))
    # Stable sort of the scores listed in grid order: descending score, ties in grid order.
    in_grid_order = s.detach().to("cpu", torch.float64).flatten()[order[n_cov:]]
    best = torch.sort(-in_grid_order, stable=True).indices[: k - n_cov]
    keep = torch.cat([order[:n_cov], order[n_cov:][best]])
    return torch.sort(keep).values.to(device)


def select(
    scores: torch.Tensor, budget: Budget, seed: int = 0, grid: tuple[int, int] | None = None
) -> list[torch.Tensor]:
    """Pick tokens for each item of a (B, h, w) or (h, w) map: one sorted LongTensor per item.

    ``grid``: map the scores onto this token grid first (:func:`resize_scores`), e.g. the real
    latent's grid at run time; indices then refer to that grid.
    """
    s = as_scores(scores)
    if grid is not None:
        s = resize_scores(s, grid)
    if s.ndim == 2:
        s = s.unsqueeze(0)
    if not isinstance(budget, Budget):
        raise ValueError(f"budget: expected a Budget, got {describe(budget)}")
    return [pick_tokens(x, budget.token_count(x), budget.coverage, seed) for x in s]


def share_budget(scores_list: Sequence[torch.Tensor], total: int, weights: Sequence[float] | None = None) -> list[int]:
    """Split one budget of ``total`` tokens across references; returns one count per reference.

    Each reference i gets a share proportional to ``mass_i * weights[i]``, where ``mass_i`` is the
    sum of its (h, w) map after scaling its max to 1 (so maps of different selectors compare; a
    bigger or busier reference weighs more), capped at its token count ``N_i``. What capped
    references cannot take is redistributed among the others. Rounding is largest remainder
    (ties: lower index first). The counts sum to exactly ``min(total, sum N_i)``; if the
    uncapped references have no mass (all-zero maps or zero weights) the rest is spread in
    proportion to their free capacity, so even a weight-0 reference can receive the overflow.
    """
    if isinstance(scores_list, torch.Tensor) or not isinstance(scores_list, Sequence) or not scores_list:
        raise ValueError("scores_list: expected a non-empty list of (h, w) score maps")
    total = int(check_nonneg(total, "total", integer=True))
    maps = [
        as_scores(s, f"scores_list[{i}]", ranks=(2,)).detach().to("cpu", torch.float64)
        for i, s in enumerate(scores_list)
    ]
    for i, m in enumerate(maps):
        if bool((m < 0).any()):
            raise ValueError(f"scores_list[{i}]: scores must be >= 0, got min {float(m.min()):.4g}")
    if weights is None:
        weights = [1.0] * len(maps)
    if len(weights) != len(maps):
        raise ValueError(f"weights: expected {len(maps)} weights (one per reference), got {len(weights)}")
    weights = [float(check_nonneg(w, f"weights[{i}]")) for i, w in enumerate(weights)]
    caps = [m.numel() for m in maps]
    shares = [float((m / m.max()).sum()) * w if float(m.max()) > 0 else 0.0 for m, w in zip(maps, weights, strict=True)]
    counts = [0] * len(maps)
    remaining = min(total, sum(caps))
    free = list(range(len(maps)))
    while remaining > 0 and free:
        base = [shares[i] for i in free]
        if sum(base) <= 0:  # no mass left among the free ones: use their capacity
            base = [float(caps[i] - counts[i]) for i in free]
        s = sum(base)
        ideal = [remaining * b / s for b in base]
        over = [i for i, x in zip(free, ideal, strict=True) if counts[i] + x >= caps[i]]
        if over:  # fill these to their cap and share the rest again
            for i in over:
                remaining -= caps[i] - counts[i]
                counts[i] = caps[i]
            free = [i for i in free if i not in over]
            continue
        floors = [math.floor(x) for x in ideal]
        left = remaining - sum(floors)
        by_remainder = sorted(range(len(free)), key=lambda j: (-(ideal[j] - floors[j]), free[j]))
        for j in by_remainder[:left]:
            floors[j] += 1
        for i, f in zip(free, floors, strict=True):
            counts[i] += f
        remaining = 0
    return counts
