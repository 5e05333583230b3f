"""Mask selector: a user MASK mapped to per-token coverage, with dilation and feathering in tokens."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._checks import as_image, as_mask, check_grid, check_nonneg, describe
from .tokens import resize_scores, token_canvas, token_grid_shape

ASPECT_TOLERANCE = 0.02  # a mask of another size is resized to the image only if aspects agree this well


def _dilate(cov: torch.Tensor, r: int) -> torch.Tensor:
    """Chebyshev dilation by ``r`` tokens of (B, h, w) values (max-pool, no wrap-around)."""
    return F.max_pool2d(cov.unsqueeze(1), 2 * r + 1, stride=1, padding=r).squeeze(1) if r > 0 else cov


def mask_scores(
    mask: torch.Tensor,
    grid: tuple[int, int] | None = None,
    *,
    image: torch.Tensor | None = None,
    stride: int = 16,
    inside: float = 1.0,
    outside: float = 0.0,
    dilate_tokens: int = 0,
    feather_tokens: int = 0,
) -> torch.Tensor:
    """Token scores from a MASK: ``outside + (inside - outside) * coverage``.

    Args:
        mask: ComfyUI MASK (B, H, W) or (H, W) in [0, 1].
        grid: token grid (h_tok, w_tok) to score. Default: ``token_grid_shape`` of ``image`` if
            given, else of the mask itself, at ``stride``.
        image: the reference IMAGE (B, H, W, C) the mask belongs to (optional). When given, the mask
            is resized to the image first, which is allowed only if the two aspect ratios agree
            within 2 % (``ASPECT_TOLERANCE``); its batch must be 1 (shared by every image) or B.
        stride: pixels per token (used to lay the mask on the token grid the way the VAE does:
            crop to a multiple of stride/2, pad to whole tokens).
        inside, outside: scores (>= 0) of fully covered and uncovered tokens; ``inside=1, outside=0``
            keeps the subject, ``inside=0, outside=1`` keeps an edit region's surroundings.
        dilate_tokens: grow the covered area by this many tokens (Chebyshev / 3x3 neighbourhood
            steps; a token becomes as covered as the most covered token within that distance).
        feather_tokens: N > 0 adds a linear falloff over N tokens outside the (dilated) area: a
            token at Chebyshev distance d (1 <= d <= N) gets coverage ``(1 - d / (N + 1)) * c`` of the
            nearest covered coverage c.

    Returns:
        (B, h, w) float32 scores between ``min(inside, outside)`` and ``max(inside, outside)``.
        Coverage of a token = mean mask value over its pixels.

    Raises:
        ValueError: bad rank/values, an all-zero mask (item index named), a batch or aspect
        mismatch with ``image``, negative weights, or ``inside == outside``.
    """
    m = as_mask(mask)
    inside = float(check_nonneg(inside, "inside"))
    outside = float(check_nonneg(outside, "outside"))
    if inside == outside:
        raise ValueError(f"inside/outside: must differ (both {inside}), otherwise the mask selects nothing")
    dilate_tokens = int(check_nonneg(dilate_tokens, "dilate_tokens", integer=True))
    feather_tokens = int(check_nonneg(feather_tokens, "feather_tokens", integer=True))
    empty = [i for i in range(m.shape[0]) if not bool((m[i] > 0).any())]
    if empty:
        raise ValueError(f"mask: item(s) {empty} are all zero (nothing masked); draw a mask or choose another selector")
    size = tuple(m.shape[-2:])
    if image is not None:
        img = as_image(image, "image")
        b, size = img.shape[0], tuple(img.shape[1:3])
        if m.shape[0] not in (1, b):
            raise ValueError(f"mask: batch {m.shape[0]} does not match image batch {b}; expected 1 or {b}")
        m = m.expand(b, -1, -1)
        if tuple(m.shape[-2:]) != size:
            ar_m, ar_i = m.shape[-1] / m.shape[-2], size[1] / size[0]
            if abs(math.log(ar_m / ar_i)) > math.log1p(ASPECT_TOLERANCE):
                raise ValueError(
                    f"mask: {describe(mask)} has aspect ratio {ar_m:.4f} but image {size[0]}x{size[1]} has "
                    f"{ar_i:.4f}; expected the same aspect within {ASPECT_TOLERANCE:.0%} (resize or crop the mask)"
                )
            m = F.interpolate(m.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1).clamp(0, 1)
    grid = check_grid(grid) if grid is not None else token_grid_shape(int(size[0]), int(size[1]), stride)
    if grid == token_grid_shape(int(size[0]), int(size[1]), stride):
        cov = F.avg_pool2d(token_canvas(m.unsqueeze(1), grid, stride, None), stride).squeeze(1)
    else:  # the grid of another picture: plain area mapping
        cov = resize_scores(m, grid)
    cov = _dilate(cov, dilate_tokens)
    if feather_tokens:
        out = cov
        for d in range(1, feather_tokens + 1):
            out = torch.maximum(out, (1.0 - d / (feather_tokens + 1)) * _dilate(cov, d))
        cov = out
    return outside + (inside - outside) * cov
