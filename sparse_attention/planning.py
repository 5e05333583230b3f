"""Pure token arithmetic for the model patch (no ComfyUI import).

Shapes: a reference latent is (B, C, H, W) or (B, C, T, H, W); the model patchifies it into a token
grid (h, w) = (ceil(H / p), ceil(W / p)) for patch size p (ComfyUI pads to the patch size), row-major.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..selectors import DEFAULT_COVERAGE, Budget, grid_scores, pick_tokens, random_scores, resize_scores, share_budget
from .config import SparseContextConfig
from .selection import ReferenceSelection


def latent_token_grid(latent_shape: tuple[int, ...], patch_size: int) -> tuple[int, int]:
    """Token grid (h, w) of a latent of shape (..., H, W) for ComfyUI's padded patchify."""
    h, w = latent_shape[-2], latent_shape[-1]
    return (h + patch_size - 1) // patch_size, (w + patch_size - 1) // patch_size


def bucket_round(k: int, bucket: int, n: int) -> int:
    """Round a kept count UP to a multiple of the bucket, never past ``n``; 0 stays 0.

    The bucket is capped at 1/16 of the reference's ``n`` tokens, so rounding never adds more than
    ~6 % of a small reference (a 64-token bucket on a 256-token reference would turn keep 0.1 into 0.25).
    """
    if k <= 0:
        return 0
    step = max(1, min(bucket, n // 16))
    return min(n, -(-k // step) * step)


def latent_detail_scores(latent: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Structure in a latent, per token: mean gradient magnitude over channels.

    Args:
        latent: (C, H, W) or (C, T, H, W) (the first frame is used).
        grid: token grid (h, w).
    Returns:
        (h, w) float32 scores >= 0.
    """
    x = latent.detach().float()
    if x.ndim == 4:
        x = x[:, 0]
    dy = torch.zeros_like(x)
    dx = torch.zeros_like(x)
    dy[:, 1:] = (x[:, 1:] - x[:, :-1]).abs()
    dx[:, :, 1:] = (x[:, :, 1:] - x[:, :, :-1]).abs()
    return resize_scores((dx + dy).mean(dim=0).cpu(), grid).clamp_min(0)


def default_scores(rule: str, latent: torch.Tensor, grid: tuple[int, int], seed: int) -> torch.Tensor:
    """Scores (h, w) of a patch-level default rule for a reference latent (C, [T,] H, W)."""
    if rule == "grid":
        return grid_scores(grid)[0]
    if rule == "random":
        return random_scores(1, grid, seed)[0]
    if rule == "detail":
        return latent_detail_scores(latent, grid)
    if rule == "attention":  # placeholder until the model measured its attention (every token is kept until then)
        return grid_scores(grid)[0]
    raise ValueError(f"rule: unknown default rule {rule!r}")


@dataclass(frozen=True)
class ReferencePlan:
    """Which tokens of one reference the model sees."""

    grid: tuple[int, int]
    indices: torch.Tensor  # (k,) int64, sorted, unique, row-major into h*w
    rule: str

    @property
    def total(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def kept(self) -> int:
        return int(self.indices.numel())


def selection_budget(selection: ReferenceSelection, default: Budget) -> Budget:
    """The budget a bound selection is thinned with: its own, else ``default`` with the selection rule's
    coverage floor (an edge or mask map alone loses what lies between; see ``selectors.DEFAULT_COVERAGE``)."""
    if selection.budget is not None:
        return selection.budget
    return replace(default, coverage=max(default.coverage, DEFAULT_COVERAGE.get(selection.rule, 0.0)))


def reference_scores(index: int, latent: torch.Tensor | None, grid: tuple[int, int],
                     selection: ReferenceSelection | None, config: SparseContextConfig
                     ) -> tuple[torch.Tensor, Budget, float, str]:
    """What reference ``index`` (0-based) is thinned by: (scores (h, w), budget, weight, rule name).

    A bound selection brings its scores, budget (else ``config.budget`` with its rule's coverage floor)
    and weight; other references use ``config.rule`` on ``latent`` (C, [T,] H, W), seeded per reference.
    """
    if selection is not None:
        scores = resize_scores(selection.scores, grid).clamp_min(0)
        return scores, selection_budget(selection, config.budget), selection.weight, selection.rule
    if latent is None:
        raise ValueError("latent: required for a reference without a selection")
    return default_scores(config.rule, latent, grid, config.seed + 7919 * index), config.budget, 1.0, config.rule


def pick_reference(index: int, scores: torch.Tensor, count: int, budget: Budget, config: SparseContextConfig) -> torch.Tensor:
    """Kept indices (k,) of reference ``index``: ``count`` rounded up to the bucket, picked with the
    budget's coverage floor and a per-reference seed."""
    n = scores.numel()
    k = bucket_round(int(count), config.bucket, n)
    return pick_tokens(scores, k, coverage=budget.coverage, seed=config.seed + 104729 * index)


def plan_selection(index: int, grid: tuple[int, int], selection: ReferenceSelection,
                   config: SparseContextConfig) -> ReferencePlan:
    """The plan of reference ``index`` bound to ``selection`` when each reference has its own budget
    (``config.total_tokens`` unset): the same steps as :func:`plan_references` (what Preview shows)."""
    scores, budget, _, rule = reference_scores(index, None, grid, selection, config)
    count = budget.token_count(scores, grid[0] * grid[1])
    return ReferencePlan(grid, pick_reference(index, scores, count, budget, config), rule)


def plan_references(
    latents: list[torch.Tensor],
    grids: list[tuple[int, int]],
    selections: list[ReferenceSelection | None],
    config: SparseContextConfig,
) -> list[ReferencePlan]:
    """Kept token indices for every reference of one forward.

    Args:
        latents: per reference, (C, [T,] H, W) (one batch row; indices are shared by the batch).
        grids: per reference, its token grid (h, w).
        selections: per reference, its bound selection or None (then ``config.rule``).
        config: budget, shared total, bucket and seed.
    """
    inputs = [reference_scores(i, latent, grid, sel, config)
              for i, (latent, grid, sel) in enumerate(zip(latents, grids, selections, strict=True))]
    scores = [s for s, _, _, _ in inputs]
    if config.total_tokens is not None:
        counts = share_budget(scores, config.total_tokens, [w for _, _, w, _ in inputs])
    else:
        counts = [b.token_count(s, g[0] * g[1]) for (s, b, _, _), g in zip(inputs, grids, strict=True)]
    return [ReferencePlan(grid, pick_reference(i, s, k, b, config), rule)
            for i, ((s, b, _, rule), k, grid) in enumerate(zip(inputs, counts, grids, strict=True))]


def needs_attention(selections: list[ReferenceSelection | None], config: SparseContextConfig) -> list[bool]:
    """Per reference: whether its tokens are chosen (partly) by the model's attention."""
    return [(sel.attention > 0) if sel is not None else config.rule == "attention" for sel in selections]


def keep_all(plan: ReferencePlan) -> ReferencePlan:
    """A plan that keeps every token of the plan's reference (under the same rule name)."""
    return ReferencePlan(plan.grid, torch.arange(plan.total), plan.rule)


def attention_work_ratio(text_tokens: int, target_tokens: int, dense_refs: list[int], kept_refs: list[int]) -> float:
    """Sparse / dense joint-attention work, which grows with the squared sequence length."""
    dense = text_tokens + target_tokens + sum(dense_refs)
    sparse = text_tokens + target_tokens + sum(kept_refs)
    return (sparse / dense) ** 2 if dense else 1.0


__all__ = [
    "ReferencePlan",
    "attention_work_ratio",
    "bucket_round",
    "default_scores",
    "keep_all",
    "latent_detail_scores",
    "latent_token_grid",
    "needs_attention",
    "pick_reference",
    "plan_references",
    "plan_selection",
    "reference_scores",
    "selection_budget",
]
