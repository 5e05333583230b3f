"""Held-out evaluation THROUGH THE PACK'S MODEL PATCH.

Each reference gets a ``ReferenceSelection`` whose scores come from the pack's selectors run on the
reference IMAGE (4 px per token here, so ``stride=4``), bound with a ``SelectionBinding`` in the
conditioning's ``model_conds``; the model is ``apply_sparse_context(model, config)``; sampling is
ComfyUI's own ``comfy.sample.sample`` (Euler, "simple" schedule, cfg 1), one item at a time because a
selection is per reference, not per batch item.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import kornia
import torch

from . import encoding, tasks

STRIDE = encoding.PX_PER_TOKEN


@dataclass(frozen=True)
class Selector:
    """A named scoring rule: ``score(image (1,H,W,3), mask (1,H,W), grid, seed) -> (h, w)`` + its coverage floor."""

    name: str
    score: Callable[[torch.Tensor, torch.Tensor, tuple[int, int], int], torch.Tensor]
    coverage: float


def _selectors() -> dict[str, Selector]:
    from sparse_context.selectors import (
        DEFAULT_COVERAGE,
        combine_scores,
        edge_scores,
        grid_scores,
        mask_scores,
        random_scores,
        saliency_scores,
    )

    def edge(img, mask, grid, seed):
        return edge_scores(img, stride=STRIDE)[0]

    def sal(img, mask, grid, seed):
        return saliency_scores(img, stride=STRIDE)[0]

    def msk(img, mask, grid, seed):
        return mask_scores(mask, image=img, stride=STRIDE, dilate_tokens=1)[0]

    def mix(*fns):
        return lambda img, mask, grid, seed: combine_scores([f(img, mask, grid, seed) for f in fns])[0]

    cov = DEFAULT_COVERAGE
    items = [
        Selector("random", lambda img, mask, grid, seed: random_scores(1, grid, seed)[0], cov["random"]),
        Selector("grid", lambda img, mask, grid, seed: grid_scores(grid)[0], cov["grid"]),
        Selector("edge", edge, cov["edge"]),
        Selector("edge_nofloor", edge, 0.0),  # the prototype's pure top-k Canny, for the record
        Selector("saliency", sal, cov["saliency"]),
        Selector("saliency_nofloor", sal, 0.0),
        Selector("mask", msk, cov["mask"]),
        Selector("mask_nofloor", msk, 0.0),  # the object (+1 token) first, nothing spread elsewhere
        Selector("edge+mask", mix(edge, msk), max(cov["edge"], cov["mask"])),
        Selector("saliency+mask", mix(sal, msk), max(cov["saliency"], cov["mask"])),
        Selector("edge+saliency", mix(edge, sal), max(cov["edge"], cov["saliency"])),
    ]
    return {s.name: s for s in items}


#: The pack's per-task default selector, from this experiment's evidence (README): even coverage (grid, the
#: pack's default rule) for spatially aligned edits, where every token of the picture must be copied;
#: saliency (no mask needed) for subject-driven and multi-reference generation, as the paper says.
DEFAULT_SELECTOR = {"edit": "grid", "subject": "saliency", "multi": "saliency"}


def binding_for(item: tasks.TaskBatch, selector: Selector, ratio: float, seed: int):
    """SelectionBinding with one selection per reference of a one-item batch."""
    from sparse_context.selectors import Budget, token_grid_shape
    from sparse_context.sparse_attention import ReferenceSelection, SelectionBinding

    binding = SelectionBinding()
    for i, (ref, mask) in enumerate(zip(item.refs, item.ref_masks, strict=True)):
        grid = token_grid_shape(ref.shape[1], ref.shape[2], STRIDE)
        scores = selector.score(ref, mask, grid, seed * 31 + i)
        budget = Budget(mode="ratio", ratio=ratio, coverage=selector.coverage)
        binding = binding.with_selection(i, ReferenceSelection(scores, budget, rule=selector.name))
    return binding


def conditioning(item: tasks.TaskBatch, binding=None) -> list:
    """ComfyUI CONDITIONING of a one-item batch: text tokens, pooled vector, reference latents (as
    chained ReferenceLatent nodes give them, method "offset") and the selection binding."""
    import comfy.conds
    from sparse_context.sparse_attention import BINDING_KEY

    extra = {"pooled_output": item.pooled, "reference_latents": [encoding.encode(r) for r in item.refs],
             "reference_latents_method": "offset"}
    if binding is not None:
        extra["model_conds"] = {BINDING_KEY: comfy.conds.CONDConstant(binding)}
    return [[item.context, extra]]


def generate(model, item: tasks.TaskBatch, binding, steps: int, seed: int) -> tuple[torch.Tensor, float]:
    """Sample one item with ComfyUI's sampler; returns (IMAGE (1, 64, 64, 3), seconds)."""
    from sc_harness.sampling import sample

    cond = conditioning(item, binding)
    latent = torch.zeros(1, 16, tasks.SIZE // 2, tasks.SIZE // 2)
    t0 = time.perf_counter()
    out = sample(model, cond, cond, latent, steps=steps, cfg=1.0, seed=seed)
    return encoding.decode(out), time.perf_counter() - t0


def metrics(pred: torch.Tensor, item: tasks.TaskBatch) -> dict[str, float]:
    """PSNR / SSIM (kornia, data range 1) and, where objects are placed, the IoU of where they landed."""
    p, t = pred.permute(0, 3, 1, 2), item.target.permute(0, 3, 1, 2)
    out = {"psnr": float(kornia.metrics.psnr(p, t, 1.0)), "ssim": float(kornia.metrics.ssim(p, t, 7).mean())}
    if item.task in ("subject", "multi"):
        landed = (pred - item.background.view(-1, 1, 1, 3)).abs().amax(-1) > 0.2
        truth = item.target_mask > 0.5
        out["iou"] = float((landed & truth).sum() / (landed | truth).sum().clamp_min(1))
    return out
