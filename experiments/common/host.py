"""ComfyUI on the CPU with PyTorch attention, the harness and the pack, for an experiment's process."""

from __future__ import annotations

import sys


def prepare() -> None:
    """Import ComfyUI for the CPU and the pack as ``sparse_context`` (once; later calls do nothing new)."""
    from packload import load_harness, load_pack

    load_harness()
    from sc_harness.host import comfyui_path, import_comfy_on_cpu

    if "comfy.model_management" not in sys.modules:
        # Same as main.py's --use-pytorch-cross-attention (set before comfy.model_management loads): on the CPU
        # ComfyUI otherwise picks sub-quadratic attention, which is slower at these sizes.
        path = str(comfyui_path())
        if path not in sys.path:
            sys.path.insert(0, path)
        import comfy.cli_args

        comfy.cli_args.args.use_pytorch_cross_attention = True
    import_comfy_on_cpu()
    load_pack()
