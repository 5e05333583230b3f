"""A real GGUF file of a tiny FLUX model, written by the ``gguf`` package (as ComfyUI-GGUF's convert tool does),
for loading through ComfyUI-GGUF's own loader node.

The model is small but shaped so that the host's model detection reads every size from the file's keys (one
attention head of 128 = the full-size rope axes), since a loader node cannot pass sizes to detection. Weights of
2-D tensors whose rows are a multiple of 32 are stored as Q8_0, the rest as F32 (the convert tool's rule for small
and one-dimensional tensors).
"""

from __future__ import annotations

from pathlib import Path

import torch

#: Sizes per family: one head of 128 (detection divides the hidden size by the sum of the rope axes).
SIZES = {
    "flux1_kontext": dict(image_model="flux", in_channels=16, vec_in_dim=32, context_in_dim=32, hidden_size=128,
                          num_heads=1, depth=1, depth_single_blocks=1, patch_size=2, guidance_embed=True),
    "flux2_klein": dict(image_model="flux2", in_channels=128, context_in_dim=32, hidden_size=128, num_heads=1,
                        depth=1, depth_single_blocks=1, patch_size=1),
}


def float_model(family: str, seed: int):
    """A ModelPatcher of the detectable tiny model with seeded float32 weights (core ops)."""
    import comfy.model_patcher
    from sc_testpack.host_config import checkpoint_keys, host_model_config
    from sc_testpack.tiny_models import init_weights

    sizes = SIZES[family]
    config = host_model_config(checkpoint_keys(sizes["image_model"], sizes), {"num_heads": 1})
    model = config.get_model({}, "")
    init_weights(model.diffusion_model, seed)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def write_q8_0(state_dict: dict[str, torch.Tensor], path: Path, arch: str = "flux") -> None:
    """Write ``state_dict`` as a GGUF file: Q8_0 where the row length allows, else F32."""
    import gguf

    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    for key in sorted(state_dict):
        data = state_dict[key].detach().float().cpu().numpy()
        qtype = (gguf.GGMLQuantizationType.Q8_0 if data.ndim > 1 and data.shape[-1] % 32 == 0
                 else gguf.GGMLQuantizationType.F32)
        packed = gguf.quants.quantize(data, qtype)
        writer.add_tensor(key, packed, raw_dtype=qtype)
    writer.write_header_to_file(path=str(path))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def effective_weights(path: Path) -> dict[str, torch.Tensor]:
    """The file's weights as ComfyUI-GGUF's layers compute with them (its ``dequantize_tensor`` with the loader's
    default dtypes: Q8_0 scales in float16), in float32: the weights of the oracle's core model."""
    from sc_harness import packs

    dequantize = packs.submodule("gguf", "dequant").dequantize_tensor
    state_dict = packs.submodule("gguf", "loader").gguf_sd_loader(str(path))
    return {k: torch.Tensor(dequantize(t, torch.float32)).reshape(tuple(t.tensor_shape)).clone()
            for k, t in state_dict.items()}


def quantized_count(path: Path) -> int:
    """How many tensors of the file are Q8_0."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return sum(t.tensor_type == gguf.GGMLQuantizationType.Q8_0 for t in reader.tensors)


def load_with_gguf_pack(path: Path, family: str) -> tuple:
    """(ModelPatcher, how) of ``path`` loaded by ComfyUI-GGUF: its UnetLoaderGGUF node where this host's detection
    reads every size from the file; else (0.3.75 detection fixes 24 heads) the node's own steps (its
    ``gguf_sd_loader``, its ``GGMLOps`` and ``GGUFModelPatcher``) with the host's config for the file's sizes."""
    import comfy.model_detection
    import comfy.model_patcher
    import folder_paths
    from sc_harness import packs
    from sc_testpack.host_config import host_model_config

    nodes = packs.submodule("gguf", "nodes")
    state_dict = packs.submodule("gguf", "loader").gguf_sd_loader(str(path))
    detected = comfy.model_detection.detect_unet_config(state_dict, "")
    if detected["hidden_size"] % detected["num_heads"] == 0:
        folder_paths.add_model_folder_path("diffusion_models", str(path.parent))
        return nodes.UnetLoaderGGUF().load_unet(path.name)[0], "UnetLoaderGGUF"
    ops = packs.submodule("gguf", "ops").GGMLOps()
    ops.Linear.dequant_dtype = None
    ops.Linear.patch_dtype = None
    config = host_model_config(state_dict, {"num_heads": 1})
    config.custom_operations = ops
    model = config.get_model(state_dict, "")
    model.load_model_weights(state_dict, "")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    return nodes.GGUFModelPatcher.clone(patcher), "UnetLoaderGGUF's steps (gguf_sd_loader, GGMLOps, GGUFModelPatcher)"
