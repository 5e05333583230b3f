"""Test-only ComfyUI node pack: tiny real models, conditioning and latents without text encoders or VAEs.

Loaded only by the tests' server fixture (and the demo, which says so); never shipped (see .comfyignore).
"""

from __future__ import annotations

import torch
from comfy_api.latest import ComfyExtension, io

from .demo_nodes import DEMO_NODES
from .pack_node import pack_node
from .stand_ins import StandInEncoder
from .step_timer import StepTimer
from .tiny_models import (
    FAMILIES,
    SPECS,
    VARIANTS,
    build_model_patcher,
    build_omnigen2_patcher,
    host_lacks,
    make_conditioning,
    make_latent,
)

_FAMILY = io.Combo.Input("family", options=sorted(FAMILIES), tooltip="Tiny model family.")
_SEED = io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed.")


@pack_node("SCTest_TinyModel", "A tiny real model (tests only).", [_FAMILY, _SEED], [io.Model.Output()])
def TinyModel(family: str, seed: int) -> io.NodeOutput:
    return io.NodeOutput(build_model_patcher(family, seed))


@pack_node("SCTest_Conditioning", "Seeded conditioning (tests only).",
           [_FAMILY, _SEED, io.Int.Input("tokens", default=8, min=1, max=512, tooltip="Text tokens.")],
           [io.Conditioning.Output()])
def TinyConditioning(family: str, seed: int, tokens: int) -> io.NodeOutput:
    return io.NodeOutput(make_conditioning(family, seed, tokens))


@pack_node("SCTest_Latent", "A seeded latent in the family's layout, as VAEEncode gives (tests only); empty=zeros.",
           [_FAMILY, _SEED,
            io.Int.Input("width", default=64, min=16, max=1024, step=16, tooltip="Pixels."),
            io.Int.Input("height", default=64, min=16, max=1024, step=16, tooltip="Pixels."),
            io.Int.Input("batch_size", default=1, min=1, max=8, tooltip="Batch."),
            io.Boolean.Input("empty", default=False, tooltip="Zeros, for sampling from noise.")],
           [io.Latent.Output()])
def TinyLatent(family: str, seed: int, width: int, height: int, batch_size: int, empty: bool) -> io.NodeOutput:
    latent = make_latent(family, seed, width, height, batch_size)
    return io.NodeOutput({"samples": torch.zeros_like(latent) if empty else latent})


@pack_node("SCTest_LatentToImage", "A fixed projection of a latent to an IMAGE, in place of a VAE (tests only).",
           [io.Latent.Input("samples", tooltip="Latent.")], [io.Image.Output()])
def LatentToImage(samples: dict) -> io.NodeOutput:
    x = samples["samples"]
    if x.ndim == 5:
        x = x[:, :, 0]
    groups = torch.tensor_split(x.float(), 3, dim=1)
    rgb = torch.stack([g.mean(dim=1) for g in groups], dim=-1)
    return io.NodeOutput(torch.sigmoid(rgb))


@pack_node("SCTest_CheckFinite",
           "Reports in its UI output whether an IMAGE / LATENT holds only finite values (tests only).",
           [io.Image.Input("image", optional=True, tooltip="Image to check."),
            io.Latent.Input("latent", optional=True, tooltip="Latent to check.")],
           is_output_node=True)
def CheckFinite(image=None, latent=None) -> io.NodeOutput:
    x = image if latent is None else latent["samples"]
    return io.NodeOutput(ui={"finite": [bool(torch.isfinite(x).all())], "shape": list(x.shape)})


class TinyTestExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [TinyModel, TinyConditioning, TinyLatent, LatentToImage, CheckFinite, StepTimer, *DEMO_NODES]


async def comfy_entrypoint() -> TinyTestExtension:
    return TinyTestExtension()


__all__ = ["FAMILIES", "SPECS", "VARIANTS", "StandInEncoder", "build_model_patcher", "build_omnigen2_patcher", "host_lacks", "make_conditioning",
           "make_latent",
           "comfy_entrypoint"]
