"""Krea 2: ``comfy.ldm.krea2.model.SingleStreamDiT`` (references from ComfyUI 0.29).

Its patch size attribute is ``patch``; ``process_img`` returns (tokens, ids, h, w). References are appended only
when a reference method is set; with ``index_timestep_zero`` every token after the target runs at t=0.
Its text-fusion transformer calls the same attention override as the image blocks before them, so the reference
cache and the attention rule (which append to / measure every override call) are refused.
"""

from .base import NeedsMethod

KREA2 = NeedsMethod(
    name="Krea 2",
    class_path="comfy.ldm.krea2.model.SingleStreamDiT",
    variants=(("Krea 2", "0.30.0", "index_timestep_zero (every token after the target)"),),
    positions="ids (index, row, col)",
    cache_layout=False,
    cache_refusal="Krea 2's text-fusion transformer calls the same attention override before the image blocks, "
                  "so cached reference keys would be appended there too",
    patch_attr="patch",
    embed_attr="first",
)
