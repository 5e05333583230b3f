"""Whole sampling runs through ComfyUI's own ``comfy.sample.sample`` on the tiny models."""

from __future__ import annotations

import torch


def sample(model, positive: list, negative: list, latent: torch.Tensor, *, steps: int = 3, cfg: float = 1.0,
           seed: int = 0, sampler: str = "euler", scheduler: str = "simple") -> torch.Tensor:
    """Run ComfyUI's sampler exactly as KSampler does; returns the denoised latent."""
    import comfy.sample

    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                               denoise=1.0, disable_pbar=True, seed=seed)


def with_references(conditioning: list, references: list[torch.Tensor], method: str | None = None) -> list:
    """What chained core ReferenceLatent nodes (and FluxKontextMultiReferenceLatentMethod) produce."""
    import node_helpers

    out = node_helpers.conditioning_set_values(conditioning, {"reference_latents": list(references)}, append=True)
    if method is not None:
        out = node_helpers.conditioning_set_values(out, {"reference_latents_method": method})
    return out


def memory_estimate(model, run) -> tuple[float, float]:
    """Core's memory estimate (memory_required, minimum, in bytes) of the sampling run ``run(model)`` makes, as core
    computes it inside ``prepare_sampling`` before loading the model (a PREPARE_SAMPLING wrapper added here runs
    inside the patch's, so it sees what the patch hands core)."""
    import comfy.patcher_extension
    import comfy.sampler_helpers

    records = []

    def record(executor, patcher, noise_shape, conds, *args, **kwargs):
        records.append(comfy.sampler_helpers.estimate_memory(patcher, noise_shape, conds))
        return executor(patcher, noise_shape, conds, *args, **kwargs)

    m = model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, "test_estimate", record)
    run(m)
    assert len(records) == 1, records
    return records[0]
