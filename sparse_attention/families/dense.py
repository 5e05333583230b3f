"""Reference-conditioned families of ComfyUI 0.30 that run dense, and why (README table, the one-time warning)."""

from .base import DenseFamily

_NO_EXACT_HOOK = ("no official hook gives an exact route: its forward runs no DIFFUSION_MODEL wrapper, all references "
                  "are flattened into one padded stream by flat_and_pad_to_seq and their RoPE ids are written into "
                  "fixed row slices inside the rope_embedder module. Core would need a DIFFUSION_MODEL "
                  "WrapperExecutor in forward() and a per-reference process_img-like method that returns a "
                  "reference's tokens with its ids")

DENSE_FAMILIES = (
    DenseFamily("OmniGen2", "comfy.ldm.omnigen.omnigen2.OmniGen2Transformer2DModel", "0.3.75", _NO_EXACT_HOOK),
    DenseFamily("Boogu-Image", "comfy.ldm.boogu.model.BooguTransformer2DModel", "0.30.0", _NO_EXACT_HOOK),
    DenseFamily("TripoSplat", "comfy.ldm.triposplat.model.LatentSeqMMFlowModel", "0.30.0",
                "not reference-token concatenation: its reference latent is added to the image-feature context"),
    DenseFamily("WAN 2.2 S2V", "comfy.ldm.wan.model.WanModel_S2V", "0.3.75",
                "not separable: one reference frame is patchified inline in forward_orig and its per-frame "
                "modulation assumes equal tokens per frame"),
    DenseFamily("WAN 2.1 SCAIL", "comfy.ldm.wan.model.SCAILWanModel", "0.30.0",
                "not separable: reference frames are concatenated on the video's time axis before patch embedding"),
)
