"""Tiny REAL ComfyUI models for CPU tests: ComfyUI's own classes at toy sizes, seeded weights.

Each family is built the way ComfyUI builds a loaded checkpoint: the host's model detection on the
checkpoint's keys -> its ``supported_models`` config -> ``get_model`` -> ``ModelPatcher``; only the sizes are
small and the weights are drawn from a seeded generator instead of being read from a file. Needs ComfyUI
importable (``comfy`` on sys.path).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .host_config import HostLacksModel, checkpoint_keys, host_model_config

# Families: the SIZES of each tiny model (hidden size 32-64, one or two blocks, rope axes summing to the head
# dimension) and the checkpoint keys they imply. Everything structural (rope theta, modulation, biases, the
# default reference method, FLUX.2's text position ids on newer hosts, ...) comes from the running ComfyUI's own
# model detection on a state dict with the real checkpoint key names (``host_config``).
FAMILIES: dict[str, dict] = {
    "flux1_kontext": dict(
        image_model="flux", in_channels=16, vec_in_dim=8, context_in_dim=16, hidden_size=32, num_heads=2,
        depth=1, depth_single_blocks=1, axes_dim=[4, 6, 6], patch_size=2, guidance_embed=True,
    ),
    "flux2_klein": dict(
        image_model="flux2", in_channels=128, context_in_dim=16, hidden_size=32, num_heads=2, depth=1,
        depth_single_blocks=1, axes_dim=[4, 4, 4, 4], patch_size=1,
    ),
    "qwen_image_edit": dict(
        image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16, num_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6),
    ),
    # Detection tells Mage-Flow from Qwen-Image by its 2560-wide text norm and 128-channel output (0.29+).
    "mage_flow": dict(
        image_model="mage_flow", in_channels=128, out_channels=128, num_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=2560, axes_dims_rope=(4, 6, 6),
    ),
    # Krea 2 (0.26+, references 0.29+): detection hard-codes 128-wide heads, so the head counts are set here.
    "krea2": dict(
        image_model="krea2", features=64, channels=16, patch=2, layers=1, heads=2, kvheads=1, txtlayers=2,
        txtdim=16, txtheads=2, txtkvheads=2,
    ),
    # LongCat-Image(-Edit) (0.30+): core's Flux class; detection picks it by its 3584-wide text input.
    "longcat_image_edit": dict(
        image_model="flux", in_channels=16, context_in_dim=3584, hidden_size=32, num_heads=2, depth=1,
        depth_single_blocks=1, axes_dim=[4, 6, 6], patch_size=2, guidance_embed=False,
    ),
    # Z-Image omni (0.10+): references with their own captions and SigLIP features (``TextEncodeZImageOmni``);
    # its modulation needs a width of at least 256.
    "z_image_omni": dict(
        image_model="lumina2", patch_size=2, in_channels=16, dim=256, n_layers=1, n_refiner_layers=1, n_heads=8,
        n_kv_heads=8, axes_dims=[8, 12, 12], cap_feat_dim=16, siglip_feat_dim=16,
    ),
    # Z-Image pixel space (0.16+): core's NextDiTPixelSpace, a NextDiT subclass on RGB patches with a per-patch
    # decoder; built without SigLIP (references enter through the omni path with caption pads only).
    "z_image_pixel": dict(
        image_model="zimage_pixel", patch_size=4, in_channels=3, dim=256, n_layers=1, n_refiner_layers=1, n_heads=8,
        n_kv_heads=8, axes_dims=[8, 12, 12], cap_feat_dim=16, decoder_hidden_size=32, decoder_num_res_blocks=1,
        decoder_max_freqs=2,
    ),
    # JoyImage-Edit (0.29+): core fixes its RoPE axes to (16, 56, 56), so one 128-wide head; text width 4096.
    "joyimage_edit": dict(image_model="joyimage", in_channels=16, hidden_size=128, num_attention_heads=1, num_layers=1),
}

#: Families that share an ``image_model`` with another: the ``supported_models`` config the host must pick.
EXPECTED_CONFIG = {"longcat_image_edit": "LongCatImage"}
#: Families detection picks by the full-size width (overridden for the tiny model): the config to build.
MODEL_CONFIG = {"z_image_omni": "ZImage"}
#: A unet-config field only hosts with the family's reference path detect.
HOST_FIELD = {"z_image_omni": "siglip_feat_dim"}
#: The host feature a family's image model is (named when a host's detection lacks it).
HOST_FEATURE = {"z_image_pixel": "Z-Image pixel space (comfy.ldm.lumina.model.NextDiTPixelSpace, ComfyUI 0.16+)"}


@dataclass(frozen=True)
class FamilySpec:
    """What a graph needs to feed a family: latent channels/downscale and conditioning sizes."""

    latent_channels: int
    downscale: int  # pixels per latent cell
    context_dim: int
    pooled_dim: int | None
    video_latent: bool  # Qwen-Image and Krea 2 use 5-D (B, C, T, H, W) latents (Wan VAEs)
    timestep_arg: str = "timestep"  # the forward's name of the timestep (Krea 2: ``timesteps``)
    flux_conds: bool = False  # the forward takes FLUX's ``y`` and ``guidance``
    pixels_per_token: int = 16  # pixels per token (downscale x patch size)
    num_tokens: bool = False  # the forward takes the text length (Lumina 2 / Z-Image)
    target_arg: str = "x"  # the forward's name of the noisy latent (JoyImage: ``hidden_states``)


SPECS = {
    "flux1_kontext": FamilySpec(16, 8, 16, 8, False, flux_conds=True),
    "flux2_klein": FamilySpec(128, 16, 16, None, False, flux_conds=True),
    "qwen_image_edit": FamilySpec(16, 8, 16, None, True),
    "mage_flow": FamilySpec(128, 16, 2560, None, False),
    # Krea 2: Wan 2.1 VAE latents (B, C, T, H, W); context: txtlayers x txtdim
    "krea2": FamilySpec(16, 8, 32, None, True, timestep_arg="timesteps"),
    "longcat_image_edit": FamilySpec(16, 8, 3584, None, False, flux_conds=True),
    "z_image_omni": FamilySpec(16, 8, 16, None, False, timestep_arg="timesteps", num_tokens=True),
    "z_image_pixel": FamilySpec(3, 1, 16, None, False, timestep_arg="timesteps", pixels_per_token=4, num_tokens=True),
    "joyimage_edit": FamilySpec(16, 8, 4096, None, True, target_arg="hidden_states"),
}


#: Checkpoint variants that a host's detection tells apart by a marker key: name -> (family, marker key).
#: Qwen-Image-Edit-2511 modulates its references at t=0 (``index_timestep_zero``; ComfyUI 0.10+).
VARIANTS: dict[str, tuple[str, str]] = {"qwen_image_edit_2511": ("qwen_image_edit", "__index_timestep_zero__")}


def _model_config(family: str):
    base, marker = VARIANTS.get(family, (family, None))
    sizes = dict(FAMILIES[base])
    keys = checkpoint_keys(sizes["image_model"], sizes)
    if marker is not None:
        keys[marker] = torch.empty(0, device="meta")
    field = HOST_FIELD.get(base)
    if field is not None:
        import comfy.model_detection

        if field not in (comfy.model_detection.detect_unet_config(keys, "") or {}):
            raise HostLacksModel(f"this ComfyUI's model detection reads no {field} ({base}'s reference path)")
    try:
        config = host_model_config(keys, sizes, model_config=MODEL_CONFIG.get(base))
    except HostLacksModel as err:
        if base not in HOST_FEATURE:
            raise
        raise HostLacksModel(f"no {HOST_FEATURE[base]} in this ComfyUI: {err}") from err
    expected = EXPECTED_CONFIG.get(base)
    if expected is not None and type(config).__name__ != expected:
        raise HostLacksModel(f"this ComfyUI's model detection has no {expected} (it picks {type(config).__name__})")
    return config


def host_lacks(family: str) -> str | None:
    """Why the running ComfyUI cannot build ``family`` (its detection does not know the model), or None."""
    try:
        _model_config(family)
    except HostLacksModel as err:
        return str(err)
    return None


@torch.no_grad()
def init_weights(module: torch.nn.Module, seed: int, dtype: torch.dtype = torch.float32) -> None:
    """Seeded weights with a scale that keeps activations O(1) through a few blocks."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        fan_in = p.shape[-1] if p.ndim > 1 else 1
        if p.ndim == 1:
            base = 1.0 if ("norm" in name or name.endswith("scale")) else 0.0
            noise = 0.02 * torch.randn(p.shape, generator=gen)
            p.copy_((base + noise).to(p.dtype))
        else:
            p.copy_((torch.randn(p.shape, generator=gen) / math.sqrt(fan_in)).to(p.dtype))


def build_model_patcher(family: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                        manual_cast: torch.dtype | None = None, operations=None):
    """A ComfyUI ``ModelPatcher`` around a tiny real model of ``family``, on the CPU.

    ``manual_cast``: store the weights in ``dtype`` and compute in ``manual_cast``, with the ops ComfyUI picks
    for that (as loading with an fp8 ``weight_dtype`` does). ``operations``: build with these ComfyUI ops
    instead (``model_config.custom_operations``, as loaders pass them)."""
    import comfy.model_patcher

    if family not in FAMILIES and family not in VARIANTS:
        raise ValueError(f"unknown tiny model family {family!r}; choose from {sorted(FAMILIES) + sorted(VARIANTS)}")
    config = _model_config(family)
    # as a loader does: the model knows its weight dtype (apply_model casts the inputs to it)
    config.set_inference_dtype(dtype, manual_cast)
    if operations is not None:
        config.custom_operations = operations
    model = config.get_model({}, "")
    init_weights(model.diffusion_model, seed)
    model.diffusion_model.to(dtype)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def make_conditioning(family: str, seed: int, tokens: int = 8, references: list[torch.Tensor] | None = None) -> list:
    """ComfyUI CONDITIONING without a text encoder: seeded context (+ pooled vector for FLUX.1)."""
    spec = SPECS[family]
    gen = torch.Generator().manual_seed(seed)
    context = torch.randn((1, tokens, spec.context_dim), generator=gen)
    # FLUX.1 needs a pooled vector; FLUX.2's encode_adm reads the key but accepts None.
    extra: dict = {"pooled_output": None}
    if spec.pooled_dim is not None:
        extra["pooled_output"] = torch.randn((1, spec.pooled_dim), generator=gen)
    if references:
        extra["reference_latents"] = list(references)
    return [[context, extra]]


def make_latent(family: str, seed: int, width: int, height: int, batch: int = 1) -> torch.Tensor:
    """A seeded latent of the family's layout, as VAEEncode gives it: ``(B, C, H/d, W/d)``, or
    ``(B, C, 1, H/d, W/d)`` for Qwen-Image and Krea 2, whose Wan VAEs make one-frame video latents."""
    spec = SPECS[family]
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, spec.latent_channels, height // spec.downscale, width // spec.downscale)
    latent = torch.randn(shape, generator=gen)
    return latent.unsqueeze(2) if spec.video_latent else latent


def build_omnigen2_patcher():
    """A tiny OmniGen2 (a reference-latent model the pack leaves dense), built by core's own model config."""
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.Omnigen2({
        "image_model": "omnigen2", "patch_size": 2, "in_channels": 16, "hidden_size": 32, "num_layers": 1,
        "num_refiner_layers": 1, "num_attention_heads": 2, "num_kv_heads": 1, "multiple_of": 16,
        "axes_dim_rope": (4, 6, 6), "axes_lens": (64, 64, 64), "text_feat_dim": 16})
    config.set_inference_dtype(torch.float32, None)
    return comfy.model_patcher.ModelPatcher(config.get_model({}, ""), torch.device("cpu"), torch.device("cpu"))
