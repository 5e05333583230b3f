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


#: The mask selector here takes the object plus one token around it.
MASK_OPTIONS = {"dilate_tokens": 1}


def selectors() -> dict[str, Selector]:
    """Every selector this experiment measures, by name: the pack's (``reference_scores``) with its default
    coverage floor, and the pure top-k pick of edge, saliency and mask without one (``_nofloor``, for the record:
    the prototype's top-k Canny; the mask's object first and nothing spread elsewhere)."""
    from sparse_context.selectors import default_coverage, reference_scores

    def scorer(name: str):
        return lambda img, mask, grid, seed: reference_scores(name, img, mask, stride=STRIDE, seed=seed, grid=grid,
                                                              by_part={"mask": MASK_OPTIONS})[0]

    items = []
    for name in ("random", "grid", "edge", "edge_nofloor", "saliency", "saliency_nofloor", "mask", "mask_nofloor",
                 "edge+mask", "saliency+mask", "edge+saliency"):
        base = name.removesuffix("_nofloor")
        items.append(Selector(name, scorer(base), 0.0 if base != name else default_coverage(name)))
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
