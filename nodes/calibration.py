"""Calibration of the keep ratio on the user's own model: dense vs sparse runs with core's sampler, the
quality of each sparse result against the dense one, the recommended keep and a plot (torch + PIL only).

The sampling goes through ``comfy.sample.sample`` exactly as core's KSampler calls it; the sparse runs are
``apply_sparse_context`` clones of the given model with only the default budget changed (the settings of an
Apply Sparse Context already on the model are kept).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..selectors import Budget
from ..sparse_attention import PATCH_KEY, SparseContextConfig, apply_sparse_context
from .apply_node import REPORT_WRAPPER_KEY

METRICS = ("psnr", "ssim")
SPACES = ("latent", "image")


@dataclass(frozen=True)
class KeepResult:
    """One sparse run: its keep ratio, quality against dense and per-step time."""

    keep: float
    psnr: float
    ssim: float
    seconds_per_step: float


def parse_keeps(text: str) -> list[float]:
    """``"0.1, 0.25, 0.5"`` -> sorted unique ratios in (0, 1); ValueError naming ``keep_ratios`` otherwise."""
    try:
        values = sorted({float(part) for part in text.replace(";", ",").split(",") if part.strip()})
    except ValueError as err:
        raise ValueError(f"keep_ratios: expected numbers separated by commas, got {text!r}") from err
    if not values or any(not 0.0 < v < 1.0 for v in values):
        raise ValueError(f"keep_ratios: expected one or more values in (0, 1), got {text!r}")
    return values


def quality(result: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(PSNR dB, SSIM) of ``result`` against ``reference``, both (B, C, H, W) or IMAGE (B, H, W, C).

    Both are scaled by the reference's value range (so latents, whatever their scale, are compared like
    images in [0, 1]); identical inputs give PSNR inf and SSIM 1.
    """
    import kornia

    a, b = result.float().cpu(), reference.float().cpu()
    if a.shape != b.shape:
        raise ValueError(f"quality: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim == 5:  # (B, C, T, H, W) latents: frames as batch items
        a, b = (x.transpose(1, 2).flatten(0, 1) for x in (a, b))
    lo, hi = float(b.min()), float(b.max())
    span = max(hi - lo, 1e-8)
    a, b = (a - lo) / span, (b - lo) / span
    psnr = float(kornia.metrics.psnr(a, b, max_val=1.0))  # inf for identical inputs
    window = max(3, min(7, (min(a.shape[-2:]) // 2) * 2 - 1))
    ssim = float(kornia.metrics.ssim(a, b, window, max_val=1.0).mean())
    return psnr, ssim


def recommend(results: list[KeepResult], min_psnr: float, min_ssim: float) -> float:
    """The lowest keep from which every larger measured keep stays within the thresholds; 1.0 if none does.

    Requiring every larger keep to pass too makes the answer monotone: a stricter threshold never gives a
    lower keep, and a noisy dip at one ratio never recommends a keep below a failing one.
    """
    best = 1.0
    for r in sorted(results, key=lambda r: -r.keep):
        if r.psnr >= min_psnr and r.ssim >= min_ssim:
            best = r.keep
        else:
            break
    return best


def sparse_model(model, keep: float):
    """``model`` with references thinned to ``keep`` by default; an Apply Sparse Context already on the model
    keeps its other settings (rule, bucket, window, shared total, seed), with its budget replaced."""
    patch = model.model_options.get("transformer_options", {}).get(PATCH_KEY)
    base = patch.config if patch is not None else SparseContextConfig()
    budget = Budget(mode="ratio", ratio=keep, coverage=base.budget.coverage)
    return _without_apply_report(apply_sparse_context(model, dataclasses.replace(base, budget=budget, enabled=True)))


def dense_model(model):
    """``model`` with an Apply Sparse Context already on it switched off (unchanged otherwise)."""
    patch = model.model_options.get("transformer_options", {}).get(PATCH_KEY)
    if patch is None:
        return model
    return _without_apply_report(apply_sparse_context(model, dataclasses.replace(patch.config, enabled=False)))


def _without_apply_report(model):
    """A Calibrate clone does not report on the Apply node it came from (its runs are not that node's)."""
    import comfy.patcher_extension

    model.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, REPORT_WRAPPER_KEY)
    return model


def run_sampler(model, positive, negative, latent: dict, seed: int, steps: int, cfg: float, sampler: str,
                scheduler: str) -> tuple[torch.Tensor, float]:
    """Core's sampling, as KSampler calls it; returns (latent samples, seconds)."""
    import comfy.sample

    samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
    start = time.perf_counter()
    out = comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, samples,
                              denoise=1.0, noise_mask=latent.get("noise_mask"), disable_pbar=True, seed=seed)
    return out, time.perf_counter() - start


# -- the plot (torch + PIL; matplotlib is not a dependency) ------------------------------------------------------

def draw_plot(results: list[KeepResult], dense_seconds: float, recommended: float, min_psnr: float, min_ssim: float,
              metric_space: str, size: tuple[int, int] = (640, 400)) -> torch.Tensor:
    """IMAGE (1, H, W, 3): PSNR vs dense (left axis, blue) and seconds per step (right axis, orange) against the
    keep ratio, the threshold (dashed), the dense step time (dotted) and the recommended keep (green)."""
    from PIL import Image, ImageDraw, ImageFont

    w, h = size
    img = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 64, w - 64, 40, h - 48
    keeps = [r.keep for r in results] + [1.0]
    finite = [r.psnr for r in results if math.isfinite(r.psnr)]
    q_hi = max(finite + [min_psnr]) + 3 if finite else min_psnr + 10
    q_lo = min(finite + [min_psnr]) - 3 if finite else min_psnr - 10
    t_hi = max([r.seconds_per_step for r in results] + [dense_seconds]) * 1.15 or 1.0

    def x_of(k: float) -> float:
        return left + (right - left) * k

    def yq(v: float) -> float:
        v = min(max(v, q_lo), q_hi) if math.isfinite(v) else q_hi
        return bottom - (bottom - top) * (v - q_lo) / (q_hi - q_lo)

    def yt(v: float) -> float:
        return bottom - (bottom - top) * v / t_hi

    blue, orange, green, grey = (31, 119, 180), (230, 120, 20), (40, 160, 60), (120, 120, 120)
    d.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    for k in sorted(set(keeps)):
        d.line([x_of(k), bottom, x_of(k), bottom + 4], fill=(0, 0, 0))
        d.text((x_of(k) - 10, bottom + 6), f"{k:g}", fill=(0, 0, 0), font=font)
    for i in range(5):
        v = q_lo + (q_hi - q_lo) * i / 4
        d.text((4, yq(v) - 6), f"{v:.1f}", fill=blue, font=font)
        t = t_hi * i / 4
        d.text((right + 6, yt(t) - 6), f"{t:.3g}", fill=orange, font=font)
    _dashed(d, (left, yq(min_psnr)), (right, yq(min_psnr)), blue)
    _dashed(d, (left, yt(dense_seconds)), (right, yt(dense_seconds)), orange, dash=2)
    _dashed(d, (x_of(recommended), top), (x_of(recommended), bottom), green, width=2)
    q_pts = [(x_of(r.keep), yq(r.psnr)) for r in results]
    t_pts = [(x_of(r.keep), yt(r.seconds_per_step)) for r in results] + [(x_of(1.0), yt(dense_seconds))]
    for pts, colour in ((q_pts, blue), (t_pts, orange)):
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    ssim_note = f", SSIM >= {min_ssim:g}" if min_ssim > 0 else ""
    d.text((left, 6), f"Sparse Context Calibrate ({metric_space}): recommended keep {recommended:g} "
                      f"(PSNR vs dense >= {min_psnr:g} dB{ssim_note})", fill=(0, 0, 0), font=font)
    d.text((left, 20), "blue: PSNR vs dense (dB)   orange: s/step (dotted: dense)   green: recommended",
           fill=grey, font=font)
    d.text(((left + right) // 2 - 40, h - 18), "keep ratio", fill=(0, 0, 0), font=font)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


def _dashed(d, start: tuple[float, float], end: tuple[float, float], colour, dash: int = 6, width: int = 1) -> None:
    (x0, y0), (x1, y1) = start, end
    length = max(abs(x1 - x0), abs(y1 - y0))
    n = max(1, int(length // (2 * dash)))
    for i in range(n):
        a, b = i / n, (i + 0.5) / n
        d.line([x0 + (x1 - x0) * a, y0 + (y1 - y0) * a, x0 + (x1 - x0) * b, y0 + (y1 - y0) * b], fill=colour,
               width=width)
