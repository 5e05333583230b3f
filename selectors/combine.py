"""Combining score maps from several selectors."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._checks import as_scores, check_nonneg
from .tokens import resize_scores


def normalize_scores(scores: torch.Tensor) -> torch.Tensor:
    """Scale each batch item of a (B, h, w) map (>= 0) so its maximum is 1; all-zero items stay 0.

    Dividing by the max (not min-max) keeps "0 = no evidence" meaningful, e.g. a mask's outside.
    """
    peak = scores.amax(dim=(-2, -1), keepdim=True)
    return torch.where(peak > 0, scores / peak.clamp_min(torch.finfo(scores.dtype).tiny), torch.zeros_like(scores))


def combine_scores(
    maps: Sequence[torch.Tensor], weights: Sequence[float] | None = None, mode: str = "mix"
) -> torch.Tensor:
    """Combine score maps into one (B, h, w) map.

    Args:
        maps: one or more (B, h, w) or (h, w) maps, each >= 0. They are mapped onto the first map's
            grid with :func:`resize_scores` and batch 1 broadcasts to the largest batch.
        weights: one weight >= 0 per map (not all zero); default all 1.
        mode: ``"mix"`` = weighted mean of the normalised maps; ``"max"`` = max of weight x map.

    Each map is first normalised per batch item to max 1 (:func:`normalize_scores`).
    Returns (B, h, w) float32 (rank 3 even for (h, w) inputs).
    """
    if isinstance(maps, torch.Tensor) or not isinstance(maps, Sequence) or len(maps) == 0:
        raise ValueError("maps: expected a non-empty list of score maps")
    if mode not in ("mix", "max"):
        raise ValueError(f"mode: expected 'mix' or 'max', got {mode!r}")
    if weights is None:
        weights = [1.0] * len(maps)
    if isinstance(weights, torch.Tensor):
        weights = weights.tolist()
    if len(weights) != len(maps):
        raise ValueError(f"weights: expected {len(maps)} weights (one per map), got {len(weights)}")
    weights = [float(check_nonneg(w, f"weights[{i}]")) for i, w in enumerate(weights)]
    if sum(weights) <= 0:
        raise ValueError("weights: all zero; at least one map needs a positive weight")
    xs = []
    for i, m in enumerate(maps):
        x = as_scores(m, f"maps[{i}]").float()
        if bool((x < 0).any()):
            raise ValueError(f"maps[{i}]: scores must be >= 0, got min {float(x.min()):.4g}")
        xs.append(x if x.ndim == 3 else x.unsqueeze(0))
    grid = tuple(xs[0].shape[-2:])
    batches = {x.shape[0] for x in xs} - {1}
    if len(batches) > 1:
        raise ValueError(f"maps: batch sizes {sorted(batches)} differ; expected equal batches (or 1)")
    b = batches.pop() if batches else 1
    device = xs[0].device
    xs = [normalize_scores(resize_scores(x.to(device), grid)).expand(b, -1, -1) for x in xs]
    stacked = torch.stack(xs)
    w = torch.tensor(weights, dtype=stacked.dtype, device=device).view(-1, 1, 1, 1)
    if mode == "mix":
        return (stacked * w).sum(0) / w.sum()
    return (stacked * w).amax(0)
