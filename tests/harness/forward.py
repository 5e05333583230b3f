"""Direct forward calls of the tiny models (one denoising step's model call) with patches active."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def forward_inputs(family: str, seed: int, target: tuple[int, int], refs: list[tuple[int, int]], batch: int = 1,
                   text_tokens: int = 8) -> dict:
    """Seeded keyword arguments for ``diffusion_model.forward`` of a tiny ``family`` model."""
    import sc_testpack

    spec = sc_testpack.SPECS[family]
    gen = torch.Generator().manual_seed(seed)
    x = sc_testpack.make_latent(family, seed + 1, target[0], target[1], batch)
    references = [sc_testpack.make_latent(family, seed + 2 + i, w, h, batch) for i, (w, h) in enumerate(refs)]
    kwargs = {spec.target_arg: x, spec.timestep_arg: torch.full((batch,), 0.6),
              "context": torch.randn((batch, text_tokens, spec.context_dim), generator=gen),
              "ref_latents": references or None}
    if spec.num_tokens:
        kwargs["num_tokens"] = text_tokens
    if spec.flux_conds:
        kwargs["y"] = torch.randn((batch, spec.pooled_dim), generator=gen) if spec.pooled_dim else None
        kwargs["guidance"] = torch.full((batch,), 3.5) if family == "flux1_kontext" else None
    return kwargs


@dataclass
class Forward:
    out: torch.Tensor
    ids: list  # position ids the model embedded (with ids_probe)
    plans: list | None  # the patch's plans for this forward, if the model is patched


def run_forward(model, inputs: dict, *, probe=None, ids_probe: bool = False, options: dict | None = None,
                **extra) -> Forward:
    """One forward of a ModelPatcher's diffusion model with its patches and wrappers active (``options``: extra
    transformer_options entries, e.g. the ``rope_options`` a model's ``apply_model`` would set)."""
    import sc_harness.direct as direct
    from sc_harness.oracle import IdsProbe
    from sparse_context.sparse_attention import PATCH_KEY, RUN_KEY

    m = model.clone()  # ComfyUI deep-copies model_options here: the clone has its own patch holder
    ids = None
    if ids_probe:
        ids = IdsProbe(m.get_model_object("diffusion_model.pe_embedder"))
        m.add_object_patch("diffusion_model.pe_embedder", ids)
    patch = m.model_options["transformer_options"].get(PATCH_KEY)
    run = patch.new_run() if patch is not None else None  # the forward's own run, made explicitly
    options_extra = options
    with direct.patched_diffusion_model(m) as (dm, options), torch.no_grad():
        options = {**options, **(options_extra or {})}
        if run is not None:
            options[RUN_KEY] = run
        if probe is not None:
            options["optimized_attention_override"] = probe
        out = dm(**inputs, transformer_options=options, **extra)
    return Forward(out, ids.ids if ids else [], run.last_plans if run is not None else None)
