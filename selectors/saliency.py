"""Saliency selector: spectral-residual saliency (Hou & Zhang, CVPR 2007), training-free, no weights.

For subject-driven generation: keeps the tokens that stand out from the picture's own statistics.
"""

from __future__ import annotations

import kornia
import torch
import torch.nn.functional as F

from ._checks import as_image, check_nonneg
from .edges import to_gray
from .tokens import token_canvas, token_grid_shape


def spectral_residual(gray: torch.Tensor, blur_px: float) -> torch.Tensor:
    """Spectral-residual saliency of (B, 1, H, W) grey -> (B, 1, H, W) >= 0, max 1 per item.

    The picture is mirrored to (2H, 2W) first so the FFT's periodic extension has no seams (a seam
    would light up the borders); the log amplitude minus its 3x3 mean (circular: the spectrum is
    periodic) is the residual; back-transform with the original phase, square, Gaussian-blur.
    """
    h, w = gray.shape[-2:]
    x = torch.cat([gray, gray.flip(-1)], -1)
    x = torch.cat([x, x.flip(-2)], -2).double()
    spec = torch.fft.fft2(x)
    log_amp = torch.log(spec.abs() + 1e-9)
    smooth = F.avg_pool2d(F.pad(log_amp, (1, 1, 1, 1), mode="circular"), 3, stride=1)
    resid = torch.exp(torch.complex(log_amp - smooth, torch.angle(spec)))
    sal = torch.fft.ifft2(resid).abs().square()[..., :h, :w].float()
    if blur_px > 0:
        k = 2 * int(3 * blur_px + 0.5) + 1
        sal = kornia.filters.gaussian_blur2d(sal, (k, k), (blur_px, blur_px), border_type="reflect")
    peak = sal.amax(dim=(-2, -1), keepdim=True)
    # A flat picture has no residual worth keeping (its map is numerical noise): report zeros.
    flat = gray.flatten(1).std(1).view(-1, 1, 1, 1) < 1e-6
    return torch.where((peak > 0) & ~flat, sal / peak.clamp_min(1e-30), torch.zeros_like(sal))


def saliency_scores(
    image: torch.Tensor, stride: int = 16, *, work_size: int = 128, blur_tokens: float = 1.0
) -> torch.Tensor:
    """Spectral-residual saliency per token.

    Args:
        image: ComfyUI IMAGE (B, H, W, C) in [0, 1], any device.
        stride: pixels per token.
        work_size: the saliency is computed with the longer token-grid side at about this many
            pixels (Hou & Zhang work at 64 px; the method is scale-dependent, coarser = bigger blobs).
        blur_tokens: Gaussian smoothing sigma, in tokens.

    Returns:
        (B, h_tok, w_tok) float32 in [0, 1] (max 1 per item unless the picture is perfectly flat,
        which gives all zeros) on ``image.device``; grid = ``token_grid_shape(H, W, stride)``.
    """
    x = as_image(image)
    work_size = int(check_nonneg(work_size, "work_size", integer=True))
    if work_size < 8:
        raise ValueError(f"work_size: expected an int >= 8, got {work_size}")
    blur_tokens = float(check_nonneg(blur_tokens, "blur_tokens"))
    grid = token_grid_shape(x.shape[1], x.shape[2], stride)
    p = max(1, min(stride, round(work_size / max(grid))))
    gray = token_canvas(to_gray(x), grid, stride, p)
    sal = spectral_residual(gray, blur_tokens * p)
    return F.avg_pool2d(sal, p).squeeze(1)
