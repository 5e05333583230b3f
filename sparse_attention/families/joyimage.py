"""JoyImage-Edit: ``comfy.ldm.joyimage.model.JoyImageTransformer3DModel`` (ComfyUI 0.29+).

It has no per-reference method: ``_forward`` patchifies [target, ref0, ...] with one Conv3d each and builds the 3-D
RoPE of all of them with ``get_rotary_pos_embed_for_components(component_sizes)``. So the patch (1) hands the model
each thinned reference as a one-row strip of its kept patches (a Conv3d whose stride equals its kernel turns each
patch into the same token, in the kept order) and (2) object-patches the RoPE method: it computes the frequencies of
the references' true grids and keeps the rows of the kept tokens. The joint order is [image, text], so the
reference cache's [text, target, references] layout does not hold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ReferenceFamily


@dataclass(frozen=True)
class JoyImageFamily(ReferenceFamily):
    def patch_size(self, diffusion_model) -> int:
        pt, ph, pw = diffusion_model.patch_size
        if pt != 1 or ph != pw:
            raise ValueError(f"model: JoyImage patch size {diffusion_model.patch_size} is not [1, p, p]")
        return int(ph)

    def pack(self, ref: torch.Tensor, idx: torch.Tensor, patch: int) -> torch.Tensor:
        """Reference latent (B, C, 1, H, W) -> (B, C, 1, p, K*p): its kept patches ``idx`` (row-major over the
        padded patch grid) side by side."""
        import comfy.ldm.common_dit

        ref = comfy.ldm.common_dit.pad_to_patch_size(ref, (1, patch, patch))
        b, c, t, h, w = ref.shape
        if t != 1:
            raise ValueError(f"SparseContext: JoyImage reference latents must have one frame, got {t}")
        cells = ref.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 1, 2, 4, 3, 5)
        kept = cells.reshape(b, c, -1, patch, patch).index_select(2, idx.to(ref.device))
        return kept.permute(0, 1, 3, 2, 4).reshape(b, c, 1, patch, -1)


JOYIMAGE = JoyImageFamily(
    name="JoyImage-Edit",
    class_path="comfy.ldm.joyimage.model.JoyImageTransformer3DModel",
    variants=(("JoyImage-Edit (JoyAI)", "0.30.0", "no"),),
    hook="get_rotary_pos_embed_for_components",
    positions="RoPE frequencies (component t offset, row, col) from the true grids",
    cache_layout=False,
    cache_refusal="JoyImage-Edit's joint order is [image, text], not the [text, target, references] the reference "
                  "cache and the attention rule expect",
    target_arg="hidden_states",
    packs=True,
    embed_attr="img_in",
)
