"""Test-pack nodes for the demo (``scripts/demo.py``): a VAE stand-in for the tiny models, and the seam
through which a trained small model (safetensors + JSON config) replaces the seeded tiny one.

Tests and demo only; never shipped (the test pack is in .comfyignore).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from comfy_api.latest import io

from .tiny_models import FAMILIES, SPECS

#: Model classes a config file may name (``comfy.supported_models.<name>``); nothing else is built.
MODEL_CONFIGS = ("Flux", "Flux2", "QwenImage")


def _projection(family: str) -> torch.Tensor:
    """Fixed (C, 3*d*d) matrix from pixels of one latent cell to the family's latent channels."""
    spec = SPECS[family]
    gen = torch.Generator().manual_seed(1234)
    n = 3 * spec.downscale * spec.downscale
    return torch.randn((spec.latent_channels, n), generator=gen) / math.sqrt(n)


def image_to_latent(image: torch.Tensor, family: str) -> torch.Tensor:
    """IMAGE (B, H, W, 3) in [0, 1] -> a latent of the family's layout, as VAEEncode would give it.

    Each latent cell is a fixed linear projection of its d x d pixels (d = the family's downscale), so
    a reference's structure (edges, regions) is in its latent where the image has it. Sizes are cropped
    down to a multiple of d. Returns (B, C, H/d, W/d), or (B, C, 1, H/d, W/d) for Qwen-Image.
    """
    spec = SPECS[family]
    d = spec.downscale
    x = image[..., :3].float().movedim(-1, 1) * 2 - 1  # (B, 3, H, W) in [-1, 1]
    h, w = (x.shape[2] // d) * d, (x.shape[3] // d) * d
    if h == 0 or w == 0:
        raise ValueError(f"image: must be at least {d}x{d} pixels for {family}, got {tuple(image.shape[1:3])}")
    cells = F.pixel_unshuffle(x[:, :, :h, :w], d)  # (B, 3*d*d, H/d, W/d)
    latent = torch.einsum("cn,bnhw->bchw", _projection(family), cells)
    return latent.unsqueeze(2) if spec.video_latent else latent


class ImageToLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SCTest_ImageToLatent", category="SparseContextTest",
            description="A fixed linear projection of an IMAGE to a latent of the family's layout, in place of "
                        "VAEEncode (tests and demo only).",
            inputs=[
                io.Image.Input("image", tooltip="Image to encode."),
                io.Combo.Input("family", options=sorted(FAMILIES), tooltip="Latent layout of this tiny model family."),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, image: torch.Tensor, family: str) -> io.NodeOutput:
        return io.NodeOutput({"samples": image_to_latent(image, family)})


def load_safetensors_model(path: str | Path):
    """A ComfyUI ModelPatcher from ``<name>.safetensors`` and its config ``<name>.json`` (or the one
    config ``*.json`` in the same folder): ``{"model_config": "comfy.supported_models.Flux" | ...,
    "flux_kwargs" | "unet_config": {...}}``. Weights load with ``safe_load`` and ``strict=True``."""
    import comfy.model_patcher
    import comfy.supported_models as sm
    import comfy.utils

    path = Path(path).expanduser()
    if not path.is_file() or path.suffix != ".safetensors":
        raise ValueError(f"path: expected an existing .safetensors file, got {str(path)!r}")
    config_file = path.with_suffix(".json")
    if not config_file.is_file():
        found = sorted(path.parent.glob("*.json"))
        if len(found) != 1:
            raise ValueError(f"path: no config {config_file.name} next to {path.name} (and not exactly one *.json)")
        config_file = found[0]
    info = json.loads(config_file.read_text(encoding="utf-8"))
    name = str(info.get("model_config", "comfy.supported_models.Flux")).rsplit(".", 1)[-1]
    if name not in MODEL_CONFIGS:
        raise ValueError(f"{config_file.name}: model_config must be one of {MODEL_CONFIGS}, got {name!r}")
    unet = info.get("flux_kwargs") or info.get("unet_config")
    if not isinstance(unet, dict):
        raise ValueError(f"{config_file.name}: needs a 'flux_kwargs' or 'unet_config' object")
    config = getattr(sm, name)(dict(unet))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, "")
    model.diffusion_model.load_state_dict(comfy.utils.load_torch_file(str(path), safe_load=True), strict=True)
    model.eval()
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


class SafetensorsModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SCTest_SafetensorsModel", category="SparseContextTest",
            description="A small trained model from a .safetensors file and its JSON config, in place of the "
                        "seeded tiny model (tests and demo only).",
            inputs=[io.String.Input("path", tooltip="Absolute path of the .safetensors file (config JSON beside it).")],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, path: str) -> io.NodeOutput:
        try:
            return io.NodeOutput(load_safetensors_model(path))
        except ValueError as err:
            raise ValueError(f"SCTest_SafetensorsModel: {err}") from err


DEMO_NODES: list[type[io.ComfyNode]] = [ImageToLatent, SafetensorsModel]
