"""The training forward goes through the model's own ``apply_model``, with inputs core builds from a conditioning.

Core's sampler turns a CONDITIONING into model inputs with ``convert_cond`` -> ``encode_model_conds``
(``BaseModel.extra_conds``) -> ``get_area_and_mult`` (``process_cond``) -> ``cond_cat``, then calls
``BaseModel.apply_model``, which scales the input, builds the timestep and casts everything for the model (and
grows with core: ``process_timestep``, ``latent_shapes``, per-model ``_apply_model`` overrides). The trainer does the
same calls, so nothing of that is copied here. ``apply_model`` returns the denoised estimate; the loss needs the
raw prediction (the velocity), which ``OutputCapture``, a DIFFUSION_MODEL wrapper on the training clone, records.
"""

from __future__ import annotations

import torch

from .examples import TrainingExample

CAPTURE_KEY = "sparse_context.train_output"


class OutputCapture:
    """DIFFUSION_MODEL wrapper that records the diffusion model's output of each call (the trainer runs one
    forward at a time and takes it right after)."""

    def __init__(self):
        self.outputs: list[torch.Tensor] = []

    def __call__(self, executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        self.outputs.append(out)
        return out

    def take(self) -> torch.Tensor:
        if len(self.outputs) != 1:
            count = len(self.outputs)
            self.outputs.clear()
            raise RuntimeError(f"model: the diffusion model ran {count} times in one training forward (expected once); "
                               "another node's patch changes how this model is called, train it without that patch")
        return self.outputs.pop()

    def __deepcopy__(self, memo) -> OutputCapture:  # clones share the trainer's capture
        return self


def conditioning(example: TrainingExample, device) -> list:
    """The example as the CONDITIONING a graph would give the sampler (ReferenceLatent, FluxGuidance, ...)."""
    # text encoders always set pooled_output (None where the model has none, as FLUX.2's)
    extra: dict = {"reference_latents": [r.to(device) for r in example.references],
                   "pooled_output": None if example.pooled is None else example.pooled.to(device)}
    if example.guidance is not None:
        extra["guidance"] = example.guidance
    if example.reference_method is not None:
        extra["reference_latents_method"] = example.reference_method
    return [[example.context.to(device), extra]]


def apply_model_inputs(base_model, example: TrainingExample, x_t: torch.Tensor, sigma: torch.Tensor,
                       device) -> tuple[torch.Tensor, dict]:
    """``(input_x, kwargs)`` for ``base_model.apply_model(input_x, sigma, **kwargs)``, built by core's own sampler
    functions from the example's conditioning."""
    import comfy.sampler_helpers
    import comfy.samplers

    conds = comfy.sampler_helpers.convert_cond(conditioning(example, device))
    conds = comfy.samplers.encode_model_conds(base_model.extra_conds, conds, x_t, device, "positive")
    prepared = comfy.samplers.get_area_and_mult(conds[0], x_t, sigma)
    return prepared.input_x, comfy.samplers.cond_cat([prepared.conditioning])
