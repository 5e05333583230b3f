"""Small LoRA files for a tiny test model, in core's key format (``<module>.lora_up/lora_down.weight``, ``.alpha``),
with or without Sparse Context metadata, and deliberately broken variants for the bad-input tests."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_lora(model_patcher, rank: int = 2, modules: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """A LoRA for the first ``modules`` linear layers core's key map knows in ``model_patcher``'s model."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(model_patcher.model, {})
    state = model_patcher.model.state_dict()
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for module, target in sorted(key_map.items()):
        weight = state.get(target) if isinstance(target, str) else None
        if not module.startswith("diffusion_model.") or weight is None or weight.ndim != 2:
            continue
        out_dim, in_dim = weight.shape
        sd[f"{module}.lora_up.weight"] = 0.01 * torch.randn((out_dim, rank), generator=gen)
        sd[f"{module}.lora_down.weight"] = 0.01 * torch.randn((rank, in_dim), generator=gen)
        sd[f"{module}.alpha"] = torch.tensor(float(rank))
        if len(sd) == 3 * modules:
            break
    return sd


def write_lora(path: Path, sd: dict[str, torch.Tensor], header: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=header)
    return path


def sparse_header(family: str = "flux1", keep: str = "0.25") -> dict[str, str]:
    """Sparse Context metadata as the trainer writes it (see ``training.lora_file``), keep ratio as given."""
    return {"sparse_context.format": "1", "sparse_context.family": family, "sparse_context.rank": "2",
            "sparse_context.recommended_keep_ratio": keep}


def lora_files(folder: Path, model_patcher) -> dict[str, str | None]:
    """Write one good and several bad LoRAs into ``folder``; returns file name -> the input the loader must
    blame (None = loads)."""
    sd = tiny_lora(model_patcher)
    nan = dict(sd)
    bad_key = sorted(k for k in sd if k.endswith(".lora_down.weight"))[0]
    nan[bad_key] = nan[bad_key].clone()
    nan[bad_key][0, 0] = float("nan")
    write_lora(folder / "good.safetensors", sd, sparse_header())
    write_lora(folder / "good.sft", sd, sparse_header(keep="0.5"))
    write_lora(folder / "generic.safetensors", sd)
    write_lora(folder / "nan_weights.safetensors", nan, sparse_header())
    write_lora(folder / "keep_5.safetensors", sd, sparse_header(keep="5.0"))
    write_lora(folder / "keep_nan.safetensors", sd, sparse_header(keep="nan"))
    (folder / "truncated.safetensors").write_bytes((folder / "good.safetensors").read_bytes()[:100])
    (folder / "pickled.pt").write_bytes(b"\x80\x04K\x01.")  # a pickle of the int 1; never unpickled
    return {"good.safetensors": None, "good.sft": None, "generic.safetensors": None,
            "nan_weights.safetensors": "lora_name", "keep_5.safetensors": "lora_name",
            "keep_nan.safetensors": "lora_name", "truncated.safetensors": "lora_name", "pickled.pt": "lora_name"}
