"""Mage-Flow: ``comfy.ldm.mage_flow.model.MageFlowTransformer2DModel`` (ComfyUI 0.29+).

``process_img(ref, index)`` makes one token per 128-channel latent cell (patch size 1) with ids (index, row, col)
centred on the grid, appended after the target; the blocks are Qwen-Image's, so the cache layout holds.
"""

from .base import ReferenceFamily

MAGE_FLOW = ReferenceFamily(
    name="Mage-Flow",
    class_path="comfy.ldm.mage_flow.model.MageFlowTransformer2DModel",
    variants=(("Mage-Flow", "0.30.0", "no"),),
    positions="ids (index, centred row, centred col), patch size 1",
)
