"""Qwen-Image(-Edit), 2509 and 2511: ``comfy.ldm.qwen_image.model.QwenImageTransformer2DModel``."""

from .base import ReferenceFamily

QWEN_IMAGE = ReferenceFamily(
    name="Qwen-Image(-Edit)",
    class_path="comfy.ldm.qwen_image.model.QwenImageTransformer2DModel",
    variants=(("Qwen-Image-Edit (2509, 2511)", "0.3.75", "index_timestep_zero (2511 default, 0.10+)"),),
    positions="ids (frame, row, col), latents (B, C, T, H, W)",
)
