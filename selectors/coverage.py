"""Content-blind selectors: a seeded uniform random subset and a stratified (ordered-dither) grid.

Both return score maps (B, h_tok, w_tok); the top-k of a map is what ``pick_tokens`` keeps.
"""

from __future__ import annotations

import functools

import torch

from ._checks import check_grid, check_nonneg


def _check_seed(seed: object) -> int:
    return int(check_nonneg(seed, "seed", integer=True))


def grid_ranking(grid: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Stratified order of the tokens of ``grid``: LongTensor (h*w,) of flat row-major indices, first = best.

    The key is a Bayer ordered-dither matrix of side ``M`` = the next power of two >= max(h, w),
    cyclically shifted by an offset ``(dy, dx)`` and cropped to the grid. In a Bayer matrix the
    entries below ``(M/s)**2`` sit exactly on the lattice of spacing ``s`` (for every power of two
    ``s``), and the order inside each level keeps interleaving across the whole image. Hence:

    * for every power of two ``s``, the first ``L(s) <= ceil(h/s) * ceil(w/s)`` tokens of the order are
      one lattice of spacing ``s``: once ``k >= ceil(h/s) * ceil(w/s)``, every ``s x s`` window of
      the grid holds at least one of the top-k tokens;
    * k between two levels is spread too (no row-by-row filling).

    ``seed`` 0 uses the offset ``M // 3`` (binary 0101..), which keeps the sparse levels away from
    the borders; any other seed draws the offset from its own CPU generator, so different seeds give
    different (equally stratified) subsets. Computed on CPU with integers: identical everywhere.
    """
    return _grid_ranking(*check_grid(grid), _check_seed(seed)).clone()  # clone: callers may write to it


@functools.lru_cache(maxsize=64)  # grids repeat (one per reference size): rank each once
def _grid_ranking(h: int, w: int, seed: int) -> torch.Tensor:
    n = max(1, (max(h, w) - 1).bit_length())
    m = 1 << n
    if seed == 0:
        dy = dx = m // 3
    else:
        g = torch.Generator().manual_seed(seed)
        dy, dx = (int(v) for v in torch.randint(m, (2,), generator=g))
    y = ((torch.arange(h, dtype=torch.int64) + dy) % m).view(h, 1).expand(h, w)
    x = ((torch.arange(w, dtype=torch.int64) + dx) % m).view(1, w).expand(h, w)
    xy = x ^ y
    key = torch.zeros(h, w, dtype=torch.int64)
    for b in range(n):  # low coordinate bits -> high key bits (bit reversal): coarse lattice first
        key = (key << 2) | (((xy >> b) & 1) << 1) | ((y >> b) & 1)
    return torch.argsort(key.flatten(), stable=True)


def grid_scores(
    grid: tuple[int, int], batch: int = 1, seed: int = 0, device: torch.device | str | None = None
) -> torch.Tensor:
    """Stratified coverage scores: (batch, h, w) float32 in (0, 1], all distinct.

    Score ``1 - r / N`` for the token at position ``r`` of :func:`grid_ranking`, so the top-k tokens
    are spread evenly over the picture for every k (see :func:`grid_ranking` for the guarantee).
    """
    h, w = check_grid(grid)
    batch = int(check_nonneg(batch, "batch", integer=True))
    if batch < 1:
        raise ValueError(f"batch: expected an int >= 1, got {batch}")
    order = grid_ranking((h, w), seed)
    n = h * w
    scores = torch.empty(n, dtype=torch.float32)
    scores[order] = 1.0 - torch.arange(n, dtype=torch.float32) / n
    return scores.view(1, h, w).expand(batch, h, w).contiguous().to(device)


def random_scores(
    batch: int, grid: tuple[int, int], seed: int = 0, device: torch.device | str | None = None
) -> torch.Tensor:
    """Uniform random scores (batch, h, w) float32 in [0, 1): top-k is a uniform random subset.

    This is the training-time rule (random token dropping). Drawn on CPU from a private
    ``torch.Generator`` seeded with ``seed`` (the global RNG is never touched), then moved to
    ``device``, so a seed gives the same subset on every device.
    """
    h, w = check_grid(grid)
    batch = int(check_nonneg(batch, "batch", integer=True))
    if batch < 1:
        raise ValueError(f"batch: expected an int >= 1, got {batch}")
    g = torch.Generator().manual_seed(_check_seed(seed))
    return torch.rand((batch, h, w), generator=g, dtype=torch.float32).to(device)
