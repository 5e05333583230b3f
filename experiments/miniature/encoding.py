"""An invertible pixel-space "VAE": 64x64 RGB <-> a 16-channel latent at 1/2 resolution.

RGB plus its luma (4 channels) is folded 2x2 into channels (space-to-depth, 16 channels at H/2,
W/2); the model patchifies 2x2, so one token is 4x4 pixels and a 64 px picture is 16x16 tokens.
The values are pre-scaled with the inverse of FLUX.1's latent format, so inside the model
(after ``process_latent_in``) a latent is exactly ``2 * pixels - 1`` in [-1, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PX_PER_TOKEN = 4  # 2 (space-to-depth) x 2 (Flux patch)
# comfy.latent_formats.Flux: process_latent_in(z) = (z - shift) * scale
FLUX_SCALE, FLUX_SHIFT = 0.3611, 0.1159


def encode(image: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) in [0, 1] (H, W even) -> (B, 16, H/2, W/2) latent (ComfyUI LATENT samples)."""
    x = image.permute(0, 3, 1, 2).float() * 2 - 1
    luma = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    x = F.pixel_unshuffle(torch.cat([x, luma], 1), 2)
    return x / FLUX_SCALE + FLUX_SHIFT


def decode(latent: torch.Tensor) -> torch.Tensor:
    """(B, 16, h, w) latent -> (B, 2h, 2w, 3) image in [0, 1] (the luma channel is dropped)."""
    x = F.pixel_shuffle((latent.float() - FLUX_SHIFT) * FLUX_SCALE, 2)[:, :3]
    return ((x + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
