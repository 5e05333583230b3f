"""Load ComfyUI (CPU), the pack as ``sparse_context`` and this folder as ``sc_miniature``, the package
way (importlib with submodule_search_locations), never by putting the repo root on sys.path: the
pack's ``selectors/`` would shadow the standard library module of that name."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # for packload only (the repo root never goes on sys.path)
from packload import load_harness, load_pack, load_package  # noqa: E402


def bootstrap():
    """Everything the experiment imports; returns the ``sc_miniature`` package."""
    load_harness()
    from sc_harness.host import comfyui_path, import_comfy_on_cpu

    if "comfy.model_management" not in sys.modules:
        # Same as main.py's --use-pytorch-cross-attention (must be set before comfy.model_management loads):
        # on CPU ComfyUI otherwise picks sub-quadratic attention, which is slower at these sizes.
        path = str(comfyui_path())
        if path not in sys.path:
            sys.path.insert(0, path)
        import comfy.cli_args

        comfy.cli_args.args.use_pytorch_cross_attention = True
    import_comfy_on_cpu()
    load_pack()
    return load_package("sc_miniature", HERE)
