"""A VAE and text encoder stand-in for tests (no weights exist at tiny sizes): images and captions become
latents and conditioning of a family's layout, deterministically, so a folder of image examples can be
encoded and trained on. ``training.example_folder.ExampleEncoder`` protocol."""

from __future__ import annotations

import zlib

import torch

from .tiny_models import SPECS, make_conditioning


class StandInEncoder:
    """``latent``: each d x d pixel patch (d = the family's VAE downscale) through a fixed seeded linear map to
    the latent channels. ``conditioning``: a context seeded from the caption, references attached."""

    def __init__(self, family: str):
        self.family = family
        self.spec = SPECS[family]
        d = self.spec.downscale
        gen = torch.Generator().manual_seed(7)
        self.proj = torch.randn((self.spec.latent_channels, 3 * d * d), generator=gen) / (3 * d * d) ** 0.5

    def latent(self, image: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.pixel_unshuffle(image[..., :3].permute(0, 3, 1, 2).float() * 2 - 1, self.spec.downscale)
        z = torch.einsum("oc,bchw->bohw", self.proj, x) * 4.0
        return z.unsqueeze(2) if self.spec.video_latent else z

    def conditioning(self, caption: str, references: list[torch.Tensor]) -> list:
        return make_conditioning(self.family, zlib.crc32(caption.encode("utf-8")), 8,
                                 references=[self.latent(r) for r in references])
