"""Model configs taken from the RUNNING ComfyUI's own model detection, so tiny and saved test models build
on every host (0.30 needs FLUX.2's ``txt_ids_dims``; later releases add fields of their own).

A state dict with the real checkpoints' key names (tiny shapes, on the meta device) goes through
``comfy.model_detection.detect_unet_config``: every structural field (image model, rope theta, modulation,
reference method, text ids, ...) is the host's own. Only sizes detection hard-codes for the full-size
checkpoints (head count, rope axes) are set by the caller. Self-contained (imports only torch and comfy), so
scripts and experiments can load this file by path.
"""

from __future__ import annotations

import torch


def _flux_keys(hidden: int, in_channels: int, patch: int, context: int, head_dim: int, depth: int, single: int,
               vec: int | None, guidance: bool, flux2: bool) -> dict[str, tuple[int, ...]]:
    keys = {"img_in.weight": (hidden, in_channels * patch * patch), "txt_in.weight": (hidden, context)}
    if vec:
        keys["vector_in.in_layer.weight"] = (hidden, vec)
    if guidance:
        keys["guidance_in.in_layer.weight"] = (hidden, 256)
    if flux2:
        keys["double_stream_modulation_img.lin.weight"] = (6 * hidden, hidden)
    for i in range(depth):
        keys[f"double_blocks.{i}.img_attn.norm.key_norm.scale"] = (head_dim,)
    for i in range(single):
        keys[f"single_blocks.{i}.norm.key_norm.scale"] = (head_dim,)
    return keys


def _qwen_keys(inner: int, in_channels: int, context: int, layers: int, out: int) -> dict[str, tuple[int, ...]]:
    keys = {"txt_norm.weight": (context,), "img_in.weight": (inner, in_channels), "proj_out.weight": (out, inner)}
    for i in range(layers):
        keys[f"transformer_blocks.{i}.attn.to_q.weight"] = (inner, inner)
    return keys


def _krea2_keys(features: int, channels: int, layers: int, txtlayers: int, txtdim: int) -> dict[str, tuple[int, ...]]:
    keys = {"txtfusion.projector.weight": (1, txtlayers), "first.weight": (features, channels * 4),
            "txtfusion.layerwise_blocks.0.prenorm.scale": (txtdim,)}
    for i in range(layers):
        keys[f"blocks.{i}.attn.wq.weight"] = (features, features)
        keys[f"blocks.{i}.attn.wk.weight"] = (features, features)
    return keys


def _z_image_keys(cap_feat_dim: int, layers: int, siglip_feat_dim: int | None) -> dict[str, tuple[int, ...]]:
    """Z-Image (omni): detection reads the 3840 width from the caption embedder (the tiny width is set by the
    caller), the 32-token padding from ``cap_pad_token`` and the SigLIP width from its embedder (omni only)."""
    keys = {"cap_embedder.1.weight": (3840, cap_feat_dim), "noise_refiner.0.attention.k_norm.weight": (16,),
            "cap_pad_token": (1, 3840)}
    if siglip_feat_dim:
        keys["siglip_embedder.0.weight"] = (siglip_feat_dim,)
    for i in range(layers):
        keys[f"layers.{i}.attention.k_norm.weight"] = (16,)
    return keys


def _z_image_pixel_keys(patch: int, hidden: int, res_blocks: int, max_freqs: int) -> dict[str, tuple[int, ...]]:
    """Z-Image pixel space (``dec_net``): detection reads the patch size from the RGB patch embedder, the decoder's
    width, depth and DCT frequencies from its layers."""
    flat = 3 * patch * patch
    keys = {"x_embedder.weight": (3840, flat), "dec_net.cond_embed.weight": (hidden, 3840),
            "dec_net.final_layer.linear.weight": (flat, hidden),
            "dec_net.input_embedder.embedder.0.weight": (hidden, flat + max_freqs ** 2)}
    for i in range(res_blocks):
        keys[f"dec_net.res_blocks.{i}.in_ln.weight"] = (hidden,)
    return keys


def _joyimage_keys(hidden: int, in_channels: int, head_dim: int, layers: int) -> dict[str, tuple[int, ...]]:
    keys = {"img_in.weight": (hidden, in_channels, 1, 2, 2), "condition_embedder.time_embedder.linear_1.weight":
            (hidden, 256)}
    for i in range(layers):
        keys[f"double_blocks.{i}.attn.img_attn_qkv.weight"] = (3 * hidden, hidden)
        keys[f"double_blocks.{i}.attn.img_attn_q_norm.weight"] = (head_dim,)
    return keys


def checkpoint_keys(image_model: str, sizes: dict) -> dict[str, torch.Tensor]:
    """Meta tensors under the key names of a real ``image_model`` checkpoint ("flux", "flux2", "qwen_image",
    "mage_flow", "krea2", "lumina2", "zimage_pixel", "joyimage"), shaped by ``sizes`` (the unet-config names: hidden_size, in_channels, depth, ...).
    Mage-Flow is told from Qwen-Image by its text-norm (2560) and output (128) widths, as the host's detection does."""
    s = sizes
    if image_model in ("flux", "flux2"):
        head_dim = s["hidden_size"] // s["num_heads"]
        shapes = _flux_keys(s["hidden_size"], s["in_channels"], s["patch_size"], s["context_in_dim"], head_dim,
                            s["depth"], s["depth_single_blocks"], s.get("vec_in_dim"), s.get("guidance_embed", False),
                            image_model == "flux2")
    elif image_model in ("qwen_image", "mage_flow"):
        inner = s["num_attention_heads"] * s["attention_head_dim"]
        patch = s.get("patch_size", 1)
        shapes = _qwen_keys(inner, s["in_channels"], s["joint_attention_dim"], s["num_layers"],
                            patch ** 2 * s["out_channels"])
    elif image_model in ("lumina2", "zimage_pixel"):
        shapes = _z_image_keys(s["cap_feat_dim"], s["n_layers"], s.get("siglip_feat_dim"))
        if image_model == "zimage_pixel":
            shapes.update(_z_image_pixel_keys(s["patch_size"], s["decoder_hidden_size"], s["decoder_num_res_blocks"],
                                              s["decoder_max_freqs"]))
    elif image_model == "joyimage":
        shapes = _joyimage_keys(s["hidden_size"], s["in_channels"], s["hidden_size"] // s["num_attention_heads"],
                                s["num_layers"])
    elif image_model == "krea2":
        shapes = _krea2_keys(s["features"], s["channels"], s["layers"], s["txtlayers"], s["txtdim"])
    else:
        raise ValueError(f"no checkpoint layout for image_model {image_model!r}")
    return {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}


class HostLacksModel(ValueError):
    """The running ComfyUI does not have this model (its detection reads the keys as another one)."""


def host_model_config(state_dict: dict, unet_overrides: dict, dtype: torch.dtype = torch.float32,
                      model_config: str | None = None):
    """The host's ``supported_models`` config for a checkpoint with these keys, ``unet_overrides`` applied on top
    of what the host's detection says (sizes it cannot read from key shapes, deliberate toy choices).

    ``model_config`` names the ``comfy.supported_models`` class to use (e.g. "Flux" for a model without guidance
    embedding, which detection would take for FLUX.1 schnell, whose sampling differs); None = what detection picks.
    """
    import comfy.model_detection
    import comfy.supported_models

    unet = comfy.model_detection.detect_unet_config(state_dict, "")
    wanted = unet_overrides.get("image_model")
    if unet is None:
        raise HostLacksModel(f"this ComfyUI's model detection does not recognise the {wanted!r} checkpoint layout")
    if wanted is not None and unet.get("image_model") != wanted:
        raise HostLacksModel(f"this ComfyUI's model detection has no {wanted!r} (it reads these keys as "
                             f"{unet.get('image_model')!r})")
    unet.update(unet_overrides)
    if model_config is not None:
        config = getattr(comfy.supported_models, model_config)(unet)
    else:
        config = comfy.model_detection.model_config_from_unet_config(unet, state_dict)
    if config is None:
        raise ValueError(f"this ComfyUI has no model config for {unet.get('image_model')!r}")
    config.set_inference_dtype(dtype, None)
    return config


def config_for_sizes(sizes: dict, dtype: torch.dtype = torch.float32, model_config: str | None = None):
    """The host's config for a toy model: ``sizes`` shapes the checkpoint keys and overrides detection."""
    return host_model_config(checkpoint_keys(sizes["image_model"], sizes), sizes, dtype, model_config)
