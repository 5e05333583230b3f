"""Which base model a ComfyUI model is, as recorded in (and checked against) a LoRA's metadata."""

from __future__ import annotations

#: ComfyUI ``unet_config["image_model"]`` -> (family id, display name, architecture for target presets).
FAMILIES = {
    "flux": ("flux1", "FLUX.1 (dev / Kontext)", "flux"),
    "flux2": ("flux2", "FLUX.2 (dev / klein)", "flux"),
    "qwen_image": ("qwen_image", "Qwen-Image(-Edit)", "qwen_image"),
    "mage_flow": ("mage_flow", "Mage-Flow", "qwen_image"),  # Qwen-Image's blocks
    "krea2": ("krea2", "Krea 2", "krea2"),
    "lumina2": ("z_image", "Z-Image (omni)", "z_image"),
    "zimage_pixel": ("z_image_pixel", "Z-Image pixel space", "z_image"),  # Z-Image's blocks, RGB patches
}
#: ``supported_models`` configs that share another's ``image_model`` but are another base model.
_CONFIGS = {"LongCatImage": ("longcat_image", "LongCat-Image(-Edit)", "flux")}
#: unet_config entries that fix the LoRA's shapes (recorded for the user; shapes are checked directly).
_SIZE_KEYS = ("hidden_size", "depth", "depth_single_blocks", "num_heads", "mlp_ratio", "in_channels",
              "num_layers", "attention_head_dim", "num_attention_heads", "joint_attention_dim", "features", "layers",
              "heads", "dim", "n_layers", "n_heads")


def base_family(model_patcher) -> tuple[str, str, str]:
    """``(family id, display name, arch)`` of a ComfyUI ``ModelPatcher``; ValueError if unsupported."""
    config = getattr(model_patcher.model, "model_config", None)
    image_model = (getattr(config, "unet_config", None) or {}).get("image_model")
    if type(config).__name__ in _CONFIGS:
        return _CONFIGS[type(config).__name__]
    if image_model not in FAMILIES:
        supported = ", ".join(v[1] for v in FAMILIES.values())
        raise ValueError(f"model: {type(model_patcher.model).__name__} (image_model={image_model!r}) is not a "
                         f"supported base model; supported: {supported}")
    return FAMILIES[image_model]


def architecture(model_patcher) -> dict:
    """The size entries of the model's unet config (JSON-able), e.g. hidden size and block counts."""
    unet = model_patcher.model.model_config.unet_config
    out = {"image_model": unet.get("image_model")}
    for k in _SIZE_KEYS:
        if k in unet:
            v = unet[k]
            out[k] = list(v) if isinstance(v, tuple) else v
    return out
