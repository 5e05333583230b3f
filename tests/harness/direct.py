"""Forward calls outside a sampling loop with a ModelPatcher's patches active: for benchmarks, experiments and tests
(kept out of the shipped pack: a node graph always samples through ComfyUI's own sampler)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def patched_diffusion_model(model) -> Iterator[tuple[torch.nn.Module, dict]]:
    """Yield ``(diffusion_model, transformer_options)`` with ``model``'s object and weight patches
    applied and its wrappers in the options, as ComfyUI's sampler sets them up; unpatch afterwards.

    Pass a fresh ``dict(transformer_options)`` to every forward call (the model writes into it).
    """
    import comfy.patcher_extension

    model.patch_model()
    try:
        options = comfy.patcher_extension.copy_nested_dicts(model.model_options.get("transformer_options", {}))
        options["wrappers"] = comfy.patcher_extension.copy_nested_dicts(model.wrappers)
        yield model.model.diffusion_model, options
    finally:
        model.unpatch_model()
