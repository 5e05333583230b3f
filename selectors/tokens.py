"""Token-grid geometry: which grid a picture becomes, and mapping score maps between grids.

Shapes: images (B, H, W, C), score maps (B, h, w) or (h, w) on a token grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import as_scores, check_grid, check_stride


def token_grid_shape(height: int, width: int, stride: int = 16) -> tuple[int, int]:
    """Token grid ``(h_tok, w_tok)`` a ``height x width`` picture becomes in the model.

    ComfyUI's VAE encode crops the picture to a multiple of the VAE factor (``stride // 2`` = 8 px),
    and Flux/Qwen patchify the latent 2x2 with padding, so ``h_tok = ceil((H // (stride//2)) / 2)``
    ``= ((H // (stride // 2)) + 1) // 2`` (same for the width). 1024 px -> 64 tokens; 1000 px -> 63
    (the last token row covers 8 real pixels plus padding).

    A side shorter than ``stride // 2`` px (the VAE would crop it away) counts as one token, so any
    picture of at least 1 x 1 px has a grid and the selectors score it (``token_canvas`` pads it).

    Raises ``ValueError`` if a side is not an int >= 1.
    """
    stride = check_stride(stride)
    half = stride // 2
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a picture side of at least 1 px, got {v!r}")
    return max(1, ((height // half) + 1) // 2), max(1, ((width // half) + 1) // 2)


def resize_scores(scores: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Map a score map onto another token grid with area interpolation.

    Args:
        scores: (B, h, w) or (h, w) float, finite.
        grid: target (h2, w2).

    Returns:
        Same rank as ``scores``, shape (..., h2, w2), same dtype/device. Each axis that shrinks is
        area-averaged (adaptive average pooling, so the mean score is kept); each axis that grows is
        bilinearly interpolated (``align_corners=False``), so constant maps stay constant and
        non-negative maps stay non-negative.
    """
    x = as_scores(scores)
    h2, w2 = check_grid(grid)
    squeeze = x.ndim == 2
    x4 = x.reshape(1, 1, *x.shape) if squeeze else x.unsqueeze(1)
    h, w = x4.shape[-2:]
    if (h, w) != (h2, w2):
        # Shrink first (exact area mean), then grow what still needs growing.
        mid = (min(h, h2), min(w, w2))
        if mid != (h, w):
            x4 = F.adaptive_avg_pool2d(x4, mid)
        if mid != (h2, w2):
            x4 = F.interpolate(x4, size=(h2, w2), mode="bilinear", align_corners=False)
    return x4.reshape(h2, w2) if squeeze else x4.squeeze(1)


def token_canvas(x: torch.Tensor, grid: tuple[int, int], stride: int, px_per_token: int | None) -> torch.Tensor:
    """Lay a (B, C, H, W) picture onto the model's token grid at ``px_per_token`` pixels per token.

    Mirrors the model: crop to a multiple of ``stride // 2`` (VAE; a side shorter than that is kept
    whole), pad bottom/right to a whole token (replicate, so the padding adds no edges), then
    area-resize so each token is exactly ``p x p`` pixels. Returns (B, C, h_tok * p, w_tok * p).
    """
    h, w = grid
    half = stride // 2
    H, W = ((side // half) * half or side for side in x.shape[-2:])
    x = x[..., :H, :W]
    pad_h, pad_w = h * stride - H, w * stride - W
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    p = stride if px_per_token is None else px_per_token
    if p != stride:
        x = F.interpolate(
            x,
            size=(h * p, w * p),
            mode="area" if p < stride else "bilinear",
            align_corners=None if p < stride else False,
        )
    return x
