"""Held-out evaluation through the pack's model patch, and the classical baseline on the same selections.

Selections, bindings and the conditioning are the miniature's (``sc_miniature.evaluate``: the pack's selectors
on the reference IMAGE at 4 px per token, a ``SelectionBinding`` in ``model_conds``); sampling is ComfyUI's
``comfy.sample.sample``. The baseline keeps exactly the tokens the patch keeps (the patch's own
``plan_references`` on the same selection and config), fills the dropped 4x4 px tokens by biharmonic
inpainting (``skimage.restoration.inpaint_biharmonic``) and applies the task's exact change.

Rows are (task, model, selector, keep ratio, mode): a selector bound per reference is an entry of ``SELECTORS``, one
of the patch's own rules (``attention``) an entry of ``RULE_SELECTORS``, a reference-cache mode an entry of
``run.CACHE_MODES`` (measured with the default selector).
"""

from __future__ import annotations

import time

import kornia
import torch

from . import tasks

#: Selectors measured (names of ``sc_miniature.evaluate.selectors()``); "mask" = the reference mask of
#: ``tasks`` (the region a user would paint / the part that reaches the target), grown by one token.
SELECTORS = ("random", "grid", "edge", "saliency", "mask")
#: Selectors that are the patch's own rules (no bound selection): the model's attention picks the tokens.
RULE_SELECTORS = ("attention",)
#: The pack's per-task default selector, from this experiment (README): set by the full run's evidence.
DEFAULT_SELECTOR = {"subject": "grid", "edit": "grid", "composition": "grid"}
SEED = 0


def selectors() -> dict:
    from sc_miniature.evaluate import selectors as every_selector

    every = every_selector()
    return {name: every[name] for name in SELECTORS}


def binding(item: tasks.Item, selector, ratio: float, seed: int):
    """The ``SelectionBinding`` of one item (the miniature's: one selection per reference)."""
    from sc_miniature.evaluate import binding_for

    return binding_for(item, selector, ratio, seed)


def sparse_config(ratio: float, selector: str = "grid", mode: str = "drop"):
    """The patch settings of a sparse row: exact kept counts (bucket 1); references without a bound selection use
    the rule ``selector`` if it is one of the patch's rules (else grid); ``mode`` = "drop" or a cache mode."""
    from sparse_context.selectors import Budget
    from sparse_context.sparse_attention import SparseContextConfig

    rule = selector if selector in RULE_SELECTORS else "grid"
    return SparseContextConfig(budget=Budget(mode="ratio", ratio=ratio), rule=rule, bucket=1, seed=SEED,
                               cache="off" if mode == "drop" else mode)


def generate(model, item: tasks.Item, binding, steps: int, seed: int) -> tuple[torch.Tensor, float]:
    """Sample one item with ComfyUI's sampler at the target's size; returns (IMAGE (1, h, w, 3), seconds)."""
    from sc_harness.sampling import sample
    from sc_miniature import encoding
    from sc_miniature.evaluate import conditioning

    cond = conditioning(item, binding)
    h, w = item.target.shape[1:3]
    latent = torch.zeros(1, 16, h // 2, w // 2)
    t0 = time.perf_counter()
    out = sample(model, cond, cond, latent, steps=steps, cfg=1.0, seed=seed)
    return encoding.decode(out), time.perf_counter() - t0


#: PSNR of an exact result (the baseline when every token the target needs was kept) is capped here, as 8-bit
#: pictures cannot tell more apart; the mean over items stays finite.
PSNR_CAP = 60.0


def metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """PSNR (capped at ``PSNR_CAP``) and SSIM (kornia, data range 1, 7 px window) of IMAGEs (1, h, w, 3)."""
    p, t = pred.permute(0, 3, 1, 2).clamp(0, 1), target.permute(0, 3, 1, 2)
    return {"psnr": min(PSNR_CAP, float(kornia.metrics.psnr(p, t, 1.0))),
            "ssim": float(kornia.metrics.ssim(p, t, 7).mean())}


def kept_token_masks(item: tasks.Item, binding, ratio: float) -> list[torch.Tensor]:
    """Per reference, the (h, w) bool grid of the tokens the patch keeps for this item and selection."""
    from sc_miniature import encoding
    from sparse_context.sparse_attention.planning import latent_token_grid, plan_references

    latents = [encoding.encode(r) for r in item.refs]
    grids = [latent_token_grid(tuple(z.shape), 2) for z in latents]
    plans = plan_references([z[0] for z in latents], grids, [binding.get(i) for i in range(len(latents))],
                            sparse_config(ratio))
    out = []
    for plan in plans:
        m = torch.zeros(plan.total, dtype=torch.bool)
        m[plan.indices] = True
        out.append(m.view(plan.grid))
    return out


def baseline(item: tasks.Item, binding, ratio: float) -> torch.Tensor:
    """Biharmonic inpainting of the dropped tokens of every reference, then the task's exact change."""
    import numpy as np
    from skimage.restoration import inpaint_biharmonic

    filled = []
    for ref, kept in zip(item.refs, kept_token_masks(item, binding, ratio), strict=True):
        missing = ~kept.repeat_interleave(tasks.CELL, 0).repeat_interleave(tasks.CELL, 1)
        img = ref[0].numpy().astype(np.float64)
        if bool(missing.any()):
            img = inpaint_biharmonic(img, missing.numpy(), channel_axis=-1)
        filled.append(torch.from_numpy(np.clip(img, 0, 1)).float()[None])
    return item.apply(filled)
