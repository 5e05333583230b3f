"""Load ComfyUI (CPU), the pack as ``sparse_context``, the miniature as ``sc_miniature`` (reused: encoding,
model builder) and this folder as ``sc_natural``, the package way (never the repo root on sys.path)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

HERE = Path(__file__).resolve().parent


def bootstrap():
    """Everything the experiment imports; returns the ``sc_natural`` package."""
    spec = importlib.util.spec_from_file_location("sc_miniature_bootstrap", HERE.parent / "miniature" / "bootstrap.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.bootstrap()  # ComfyUI on CPU, sparse_context, sc_miniature
    from packload import load_package

    return load_package("sc_natural", HERE)
