"""How the training clone is loaded: with core's training weight offload where the host has it, else fully.

Core's own trainer offloads base weights since ComfyUI 0.30 (``prepare_sampling(..., force_offload=True)`` and
``load_models_gpu(..., force_full_load=False)``): weights that do not fit stay on the offload device and are cast
to the GPU per layer, in the forward and again in the backward's recompute. The trainer's block checkpointing
recomputes one block at a time and clones what autograd saves, so only one block's cast weights are alive at
once, as with core's per-layer checkpointing. Older hosts have no such support: there the whole base is loaded,
and a base that cannot fit is refused before step 1 with what to do instead.
"""

from __future__ import annotations

import inspect
import logging

log = logging.getLogger("SparseContext.training")
GIB = 2**30


def core_offloads_training() -> bool:
    """Whether this ComfyUI supports training with offloaded weights (feature test, not a version check)."""
    import comfy.sampler_helpers

    return "force_offload" in inspect.signature(comfy.sampler_helpers.prepare_sampling).parameters


def fit_problem(weights: float, activations: float, device_memory: float, offload: bool) -> tuple[str, str] | None:
    """``("error" | "warning", message)`` when ``weights`` bytes of base model plus ``activations`` bytes of
    training memory cannot fit ``device_memory`` without offloading; None when they fit or core offloads."""
    if offload or weights + activations <= device_memory:
        return None
    need = f"{weights / GIB:.1f} GiB of base weights + about {activations / GIB:.1f} GiB for training"
    advice = ("Load the base as fp8 (Load Diffusion Model weight_dtype fp8_e4m3fn; train_lora.py --dtype fp8_e4m3fn: "
              "half the memory, the LoRA is trained against exactly those weights), or update ComfyUI: 0.30 and "
              "later offload base weights while training.")
    if weights > device_memory:
        return "error", (f"model: the base does not fit on the device ({need}, the device has "
                         f"{device_memory / GIB:.1f} GiB) and this ComfyUI cannot offload weights while training. "
                         + advice)
    return "warning", (f"model: training may run out of device memory ({need}, the device has "
                       f"{device_memory / GIB:.1f} GiB; this ComfyUI cannot offload weights while training). " + advice)


def load_for_training(model_patcher, memory_required: float) -> bool:
    """Load the training clone through core's model management; True when weights may stay offloaded.
    Refuses (ValueError) a base that cannot fit on a host without training offload."""
    import comfy.model_management as mm

    device = model_patcher.load_device
    offload = core_offloads_training() and not mm.is_device_cpu(device)
    if not mm.is_device_cpu(device):
        problem = fit_problem(float(model_patcher.model_size()), memory_required, float(mm.get_total_memory(device)),
                              offload)
        if problem is not None and problem[0] == "error":
            raise ValueError(problem[1])
        if problem is not None:
            log.warning("SparseContext: %s", problem[1])
    # core frees what the clone's weights plus ``memory_required`` need on the device, not everything; with
    # offload it keeps as many weights on the device as leave ``memory_required`` free
    mm.load_models_gpu([model_patcher], memory_required=memory_required, force_full_load=not offload)
    return offload
