"""The miniature model: a tiny FLUX.1-Kontext-shaped ComfyUI ``Flux``, saved and loaded as safetensors.

Needs ComfyUI importable and ``scripts/`` on sys.path (``packload.load_experiment``, the tests' conftest): the model config
comes from the running ComfyUI's own detection (``tests/comfy_testpack/host_config.py``).
``load_trained_model(weights, lora)`` returns a ComfyUI ModelPatcher (base, or base + the drop-robust LoRA).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

#: ``comfy.supported_models.Flux`` unet config of the miniature model (FLUX.1 Kontext layout at toy
#: size: 16 latent channels, patch 2, 3 RoPE axes, pooled vector; no guidance embedding).
#: Why these sizes (measured with ``probe.py``, see README): hidden 128 > the 64 input dims of a token, so
#: queries/keys can hold a position-only part that the noisy target content does not swamp; 2 heads of 64
#: with 24 RoPE dims per spatial axis and theta 4 (frequencies 1 .. 0.36 rad/token) let a target token
#: single out the reference token at its own position. The first version (hidden 64, 4 heads, axes
#: [4, 6, 6], theta 10000: 3 frequencies of 1 / 0.05 / 0.002 rad/token) never learned to copy (12 dB).
FLUX_KWARGS: dict = dict(
    image_model="flux", in_channels=16, out_channels=16, vec_in_dim=24, context_in_dim=16,
    hidden_size=128, mlp_ratio=2.0, num_heads=2, depth=2, depth_single_blocks=2,
    axes_dim=[16, 24, 24], theta=4, patch_size=2, qkv_bias=True, guidance_embed=False,
)


class ModelFiles:
    """The files of one trained model in a results folder, named after the experiment that trained it
    (``<experiment>_flux.safetensors``, its config ``<experiment>_flux.json``, the drop-robust LoRA and, for the
    natural experiment, the drop-robust full fine-tune with its own config)."""

    def __init__(self, folder: str | Path, experiment: str):
        stem = Path(folder) / f"{experiment}_flux"
        self.folder, self.experiment = Path(folder), experiment
        self.base, self.config = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
        self.lora = Path(f"{stem}_lora.safetensors")
        self.full_ft, self.full_ft_config = Path(f"{stem}_full_ft.safetensors"), Path(f"{stem}_full_ft.json")


#: Initial value of the q/k RMSNorm scales. Their product bounds an attention logit at
#: ``qk_scale**2 * sqrt(head_dim)``; at 1.0 (head dim 32: <= 5.7) a token cannot single out the one aligned
#: reference token among ~500 (needs > ln 500 = 6.2 plus margin), and the scales take ~1000 steps to grow.
QK_NORM_INIT = 2.0


def build_model(flux_kwargs: dict | None = None, seed: int = 0, qk_norm_init: float = QK_NORM_INIT):
    """A fresh ModelPatcher around ``Flux(**flux_kwargs)`` on the CPU, float32, seeded init.

    Init: linear weights N(0, 1/fan_in), biases 0, q/k norm scales ``qk_norm_init``; the adaLN modulations and the final
    projection start at zero (adaLN-Zero), so every block starts as the identity.
    """
    import comfy.model_patcher
    from packload import load_testpack

    # supported_models.Flux (FLUX.1 dev's sampling) although there is no guidance embedding (detection: schnell)
    config = load_testpack().host_config.config_for_sizes(dict(flux_kwargs or FLUX_KWARGS), model_config="Flux")
    model = config.get_model({}, "")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.diffusion_model.named_parameters()):
            if p.ndim == 1:
                p.fill_(qk_norm_init if name.endswith("scale") else 0.0)
            elif "modulation" in name or name.startswith("final_layer"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    model.eval()
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def save_model(model_patcher, files: ModelFiles, flux_kwargs: dict | None = None, metadata: dict | None = None,
               full_ft: bool = False) -> Path:
    """Write the diffusion model's weights (safetensors, float16) and its config JSON: the base model's, or with
    ``full_ft`` the full fine-tune's (its config names its own weights and the base model it was tuned from)."""
    from safetensors.torch import save_file

    Path(files.folder).mkdir(parents=True, exist_ok=True)
    weights, config = (files.full_ft, files.full_ft_config) if full_ft else (files.base, files.config)
    # float16 on disk (half the size; loading casts back to the model's float32)
    sd = {k: v.detach().to(torch.float16).contiguous().cpu()
          for k, v in model_patcher.model.diffusion_model.state_dict().items()}
    save_file(sd, str(weights), metadata={"format": "sparse_context_miniature", "prefix": ""})
    info = {"flux_kwargs": flux_kwargs or FLUX_KWARGS, "model_config": "comfy.supported_models.Flux",
            "weights": weights.name, **({"fine_tune_of": files.base.name} if full_ft else {"lora": files.lora.name}),
            "latent": "encoding.py: RGB+luma folded 2x2 -> 16 ch at 1/2 res, scaled so process_latent_in gives 2*px-1",
            **(metadata or {})}
    config.write_text(json.dumps(info, indent=2), encoding="utf-8")
    return weights


def load_trained_model(weights: str | Path, lora: bool | str | Path = False, strength: float = 1.0):
    """A trained model as a ComfyUI ModelPatcher.

    Args:
        weights: its safetensors file (``ModelFiles.base`` or ``.full_ft``), its config JSON beside it (same stem).
        lora: True = apply the drop-robust LoRA its config names (standard ``diffusion_model.<layer>.lora_A/lora_B/
            alpha`` keys, loaded by ComfyUI's own ``load_lora_for_models``); False = none; a path = that LoRA file.
        strength: LoRA strength.
    """
    import comfy.sd
    import comfy.utils

    weights = Path(weights)
    config_file = weights.with_suffix(".json")
    if not weights.is_file() or not config_file.is_file():
        raise FileNotFoundError(f"load_trained_model: expected {weights.name} and {config_file.name} in {weights.parent}")
    info = json.loads(config_file.read_text(encoding="utf-8"))
    model = build_model(info["flux_kwargs"])
    sd = comfy.utils.load_torch_file(str(weights), safe_load=True)
    # the host's own key conversion, as core's loader applies it (e.g. RMSNorm ``scale`` -> ``weight`` in 0.30)
    model.model.diffusion_model.load_state_dict(model.model.model_config.process_unet_state_dict(sd), strict=True)
    if lora:
        lora_path = weights.parent / info["lora"] if lora is True else Path(lora)
        if not lora_path.is_file():
            raise FileNotFoundError(f"load_trained_model: no LoRA file at {lora_path}")
        model, _ = comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(str(lora_path), safe_load=True),
                                                 strength, 0)
    return model
