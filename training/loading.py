"""How the training clone is loaded: fully when the base fits, with core's training weight offload when it does not.

"Fits" means the base weights plus the training memory (``training.memory``) within the memory budget: the
device's total memory, or ``TrainConfig.memory_budget``. When the base does not fit and the host has core's
training offload (ComfyUI 0.30+, ``prepare_sampling(..., force_offload=True)``, what core's own TrainLoraNode
calls), the trainer loads the clone through that same call: core keeps the weights that do not fit on the
offload device and casts them to the device per layer, in the forward and again in the backward's recompute. The
trainer's block checkpointing recomputes one block at a time and clones what autograd saves, so only one block's
cast weights are alive at once, as with core's per-layer checkpointing. Hosts without it (or
``TrainConfig.weight_offload`` off) refuse a base that cannot fit before step 1, with what to do instead.
"""

from __future__ import annotations

import inspect
import logging

log = logging.getLogger("SparseContext.training")
GIB = 2**30
FP8_ADVICE = ("Load the base as fp8 (Load Diffusion Model weight_dtype fp8_e4m3fn; train_lora.py --dtype fp8_e4m3fn: "
              "half the memory, the LoRA is trained against exactly those weights)")


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.2f} MiB"


def core_offloads_training() -> bool:
    """Whether this ComfyUI supports training with offloaded weights (feature test, not a version check)."""
    import comfy.sampler_helpers

    return "force_offload" in inspect.signature(comfy.sampler_helpers.prepare_sampling).parameters


def plan(weights: float, training: float, budget: float | None, offload: bool) -> str:
    """``"full"`` or ``"offload"`` for ``weights`` bytes of base plus ``training`` bytes of training memory within
    ``budget`` bytes (None: no limit); ``offload``: core's training offload can be used. ValueError when it cannot
    fit; a warning when only the weights fit."""
    if budget is None or weights + training <= budget:
        return "full"
    need = f"{_size(weights)} of base weights + about {_size(training)} for training"
    if offload:
        if training > budget:
            raise ValueError(f"model: training needs about {_size(training)} besides the base weights, more than "
                             f"the {_size(budget)} available: train at a lower resolution, keep gradient "
                             "checkpointing on, or lower the LoRA rank.")
        return "offload"
    without = ("weight offload is off (TrainConfig.weight_offload)" if core_offloads_training()
               else "this ComfyUI cannot offload weights while training (0.30 and later can)")
    if weights > budget:
        raise ValueError(f"model: the base does not fit ({need}, {_size(budget)} available) and {without}. "
                         f"{FP8_ADVICE}.")
    log.warning("SparseContext: model: training may run out of device memory (%s, %s available; %s). %s.",
                need, _size(budget), without, FP8_ADVICE)
    return "full"


def load_for_training(model_patcher, memory_required: float, noise_shape: tuple[int, ...],
                      budget: float | None = None, weight_offload: bool = True) -> bool:
    """Load the training clone through core's model management; True when core may keep weights offloaded.
    ``budget``: bytes the device may use (None: its total memory; on the CPU no limit). Refuses (ValueError) a
    base that cannot fit without offloading."""
    import comfy.model_management as mm

    device = model_patcher.load_device
    if budget is None and not mm.is_device_cpu(device):
        budget = float(mm.get_total_memory(device))
    offload = weight_offload and core_offloads_training()
    if plan(float(model_patcher.model_size()), memory_required, budget, offload) == "offload":
        import comfy.patcher_extension as pe
        import comfy.sampler_helpers

        # what a sampling run hands core: the clone's options with its wrappers (PREPARE_SAMPLING ones included)
        options = pe.copy_nested_dicts(model_patcher.model_options)
        wrappers = options.setdefault("transformer_options", {}).setdefault("wrappers", {})
        pe.merge_nested_dicts(wrappers, model_patcher.wrappers, copy_dict1=False)
        comfy.sampler_helpers.prepare_sampling(model_patcher, noise_shape, {}, options, force_full_load=False,
                                               force_offload=True)
        return True
    # core frees what the clone's weights plus ``memory_required`` need on the device, not everything
    mm.load_models_gpu([model_patcher], memory_required=memory_required, force_full_load=True)
    return False


def unload(model_patcher) -> None:
    """Unload exactly ``model_patcher`` through core's ``free_memory`` (every other loaded model is kept)."""
    import comfy.model_management as mm

    others = [m for m in mm.current_loaded_models if m.model is not model_patcher]
    mm.free_memory(1e30, model_patcher.load_device, keep_loaded=others)

