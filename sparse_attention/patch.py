"""The ComfyUI integration: thin reference tokens before the transformer blocks run.

Only official hooks are used, all on a clone of the user's ModelPatcher:
- an object patch on ``diffusion_model.process_img`` (``ReferenceSubsetter``): each reference's tokens
  and their position ids are computed by the model's own code from the FULL latent, then both are
  indexed with the SAME kept indices, so every kept token keeps its original RoPE position;
- a DIFFUSION_MODEL wrapper that finds the references of each forward (arguments bound by name, so
  positional changes between ComfyUI versions do not matter) and hands the subsetter that forward's plan;
- an OUTER_SAMPLE wrapper that gives every sampling run its own ``SparseRun`` (plans are computed once
  per run and reference, not per step), like core EasyCache does with its holder.
The target tokens, text tokens and the model's output are untouched: ComfyUI keeps only the first
``img_tokens`` outputs, which are the target's.
"""

from __future__ import annotations

import inspect
import logging
import math
from contextlib import contextmanager
from typing import Any

import torch

from .cache_run import CachedRun
from .config import SparseContextConfig
from .reference_cache import CacheStore
from .selection import BINDING_KEY, SelectionBinding
from .token_math import (
    ReferencePlan,
    attention_work_ratio,
    keep_all,
    latent_token_grid,
    needs_attention,
    plan_references,
)

log = logging.getLogger("SparseContext")

PATCH_KEY = "sparse_context"  # transformer_options key of the per-model ``SparseContextPatch``
RUN_KEY = "sparse_context_run"  # transformer_options key of the per-run ``SparseRun``
WRAPPER_KEY = "sparse_context"  # key of our wrappers, so they can be found and removed

#: Diffusion-model classes whose references are appended after the target through ``process_img``.
SUPPORTED_CLASSES = {
    "comfy.ldm.flux.model.Flux": "Flux (FLUX.1 Kontext, FLUX.2 dev/klein)",
    "comfy.ldm.qwen_image.model.QwenImageTransformer2DModel": "Qwen-Image(-Edit)",
}


def model_family(diffusion_model: torch.nn.Module) -> str | None:
    """A supported family's name, or None (exact class match: subclasses may order tokens differently)."""
    cls = type(diffusion_model)
    return SUPPORTED_CLASSES.get(f"{cls.__module__}.{cls.__qualname__}")


class SparseRun:
    """State of ONE sampling run: plans per reference (computed once) and what was kept, for the report."""

    def __init__(self, config: SparseContextConfig, sigma_window: tuple[float, float] | None = None):
        self.config = config
        self.sigma_window = sigma_window  # (start_sigma, end_sigma), sparse while end <= sigma <= start
        # The one binding found in the run's conditionings, used by forwards that carry none (e.g. the
        # negative prompt of a graph that bound selections on the positive only), so cond and uncond
        # keep the same tokens of the same reference.
        self.shared_binding: SelectionBinding | None = None
        self._plans: dict[tuple, list[ReferencePlan]] = {}
        self._on_device: dict[tuple[int, torch.device], torch.Tensor] = {}
        self.report: dict[str, Any] | None = None
        self.warned_missed = False
        self.warned_window = False
        self.store: CacheStore | None = None  # the patch's cross-run store of reference keys/values
        self.model_key: tuple = ("direct",)  # the weights' identity (model + weight patches), set per sampling run
        self.cached: CachedRun | None = None
        self.log_kept = True  # one INFO line per run; training makes a run per forward and turns it off

    def indices_on(self, plan: ReferencePlan, device: torch.device) -> torch.Tensor:
        """A plan's kept indices on the model's device, moved once per run (plans live as long as the run)."""
        key = (id(plan), device)
        if key not in self._on_device:
            self._on_device[key] = plan.indices.to(device)
        return self._on_device[key]

    def in_window(self, transformer_options: dict) -> bool:
        if self.sigma_window is None:
            return True
        sigmas = transformer_options.get("sigmas")
        if sigmas is None:
            return True
        sigma = float(sigmas.flatten()[0])
        start, end = self.sigma_window
        return end <= sigma <= start

    def plans(self, refs: list[torch.Tensor], patch_size: int, binding: SelectionBinding | None,
              text_tokens: int, target_tokens: int) -> list[ReferencePlan]:
        grids = [latent_token_grid(tuple(r.shape), patch_size) for r in refs]
        key = (tuple(grids), binding.key() if binding is not None else None)
        plans = self._plans.get(key)
        if plans is None:
            if binding is not None and len(binding.selections) > len(refs):
                raise ValueError(
                    f"SparseContext: a selection is bound to reference #{len(binding.selections)}, but the "
                    f"conditioning has only {len(refs)} reference(s). Check the Sparse Reference Latent / "
                    "Bind Selections nodes."
                )
            selections = [binding.get(i) if binding is not None else None for i in range(len(refs))]
            plans = plan_references([r[0] for r in refs], grids, selections, self.config)
            # references chosen by the model's attention keep every token until it has been measured
            plans = [keep_all(p) if a else p for p, a in zip(plans, needs_attention(selections, self.config),
                                                               strict=True)]
            self._plans[key] = plans
            self._record(plans, text_tokens, target_tokens)
        return plans

    def cached_run(self, patch_size: int) -> CachedRun:
        """The run's cache state (made on first use)."""
        if self.cached is None:
            self.cached = CachedRun(self.config.cache, self.store, self.model_key, patch_size)
        return self.cached

    def _record(self, plans: list[ReferencePlan], text_tokens: int, target_tokens: int) -> None:
        dense = [p.total for p in plans]
        kept = [p.kept for p in plans]
        self.report = {
            "references": [{"grid": list(p.grid), "tokens": p.total, "kept": p.kept, "rule": p.rule} for p in plans],
            "text_tokens": text_tokens,
            "target_tokens": target_tokens,
            "attention_work_ratio": attention_work_ratio(text_tokens, target_tokens, dense, kept),
        }
        if not self.log_kept:
            return
        refs = ", ".join(f"#{i + 1} {p.kept}/{p.total} ({p.rule})" for i, p in enumerate(plans))
        log.info("SparseContext: kept reference tokens %s; joint attention work %.0f%% of dense",
                 refs, 100 * self.report["attention_work_ratio"])


class ReferenceSubsetter:
    """Object patch for ``diffusion_model.process_img``: returns a reference's kept tokens and ids.

    Calls that are not one of the current forward's references (the target image, or any call when
    no plan is active) pass through unchanged.
    """

    def __init__(self, original):
        self.original = original
        self.active: _ActiveForward | None = None

    def __call__(self, x, *args, **kwargs):
        out = self.original(x, *args, **kwargs)
        active = self.active
        if active is None:
            return out
        position = active.position_of(x)
        if position is None:
            return out
        tokens, ids = out[0], out[1]
        idx = active.indices[position]
        if tokens.shape[1] != active.plans[position].total:
            raise RuntimeError(
                f"SparseContext: reference #{position + 1} became {tokens.shape[1]} tokens, expected "
                f"{active.plans[position].total}; this ComfyUI version patchifies differently. Disable Apply "
                "Sparse Context and please report the ComfyUI version."
            )
        # Tokens and their position ids are always taken with the same index.
        return (tokens.index_select(1, idx), ids.index_select(1, idx.to(ids.device)), *out[2:])

    def to(self, device):  # ModelPatcher may move object patches with the model
        return self


class _ActiveForward:
    """The references of the forward in flight and their kept indices (on the model's device)."""

    def __init__(self, refs: list[torch.Tensor], plans: list[ReferencePlan], indices: list[torch.Tensor]):
        self.refs = refs
        self.plans = plans
        self.indices = indices
        self._calls = 0
        self.thinned: set[int] = set()

    def position_of(self, x: torch.Tensor) -> int | None:
        self._calls += 1
        found = next((i for i, ref in enumerate(self.refs) if x is ref), None)
        if found is None:
            # Fallback for versions that convert references before patchifying: call 1 is the target,
            # the calls after it come in reference order; accept only when the shape matches.
            i = self._calls - 2
            if 0 <= i < len(self.refs) and tuple(x.shape) == tuple(self.refs[i].shape):
                found = i
        if found is not None:
            self.thinned.add(found)
        return found


def core_reference_cache(transformer_options: dict) -> bool:
    """Whether core's Flux KV Cache node (ComfyUI 0.30+) is active: an ``attn1_patch`` that stores the references'
    keys/values of the first step and appends them in later steps (the references are trimmed from the input)."""
    patches = transformer_options.get("patches", {}).get("attn1_patch", [])
    return any(type(p).__name__ == "KV_Attn_Input" and type(p).__module__.endswith("nodes_flux") for p in patches)


_SIGNATURES: dict[Any, inspect.Signature] = {}


def _bind(fn, args: tuple, kwargs: dict) -> dict:
    """Arguments of a wrapped ``_forward`` by name, whatever their positional order in this version."""
    key = getattr(fn, "__func__", fn)
    sig = _SIGNATURES.get(key)
    if sig is None:
        sig = _SIGNATURES[key] = inspect.signature(fn)
    bound = sig.bind_partial(*args, **kwargs)
    named = dict(bound.arguments)
    for name, param in sig.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            named.update(named.pop(name, {}))
    return named


def sparse_forward_wrapper(executor, *args, **kwargs):
    """DIFFUSION_MODEL wrapper: give this forward's references their plan, then run the model."""
    named = _bind(executor.original, args, kwargs)
    refs = named.get("ref_latents")
    options = named.get("transformer_options") or {}
    run: SparseRun | None = options.get(RUN_KEY)
    if run is None:
        patch = options.get(PATCH_KEY)
        run = patch.direct_run() if isinstance(patch, SparseContextPatch) else None
    subsetter = getattr(executor.class_obj, "process_img", None)
    if not refs or run is None or not run.config.enabled or not isinstance(subsetter, ReferenceSubsetter):
        return executor(*args, **kwargs)
    core_cache = core_reference_cache(options)
    if core_cache and run.sigma_window is not None:
        if not run.warned_window:  # the cache keeps step 1's references: their token count cannot change mid-run
            run.warned_window = True
            log.warning("SparseContext: core's Flux KV Cache reuses the first step's reference keys/values, so the "
                        "references stay sparse in every step (the start/end window is ignored).")
    elif not run.in_window(options):
        return executor(*args, **kwargs)
    refs = list(refs)
    binding = named.get(BINDING_KEY)
    if not isinstance(binding, SelectionBinding):
        shared = run.shared_binding
        binding = shared if shared is not None and len(shared.selections) <= len(refs) else None
    x = named.get("x")
    patch_size = int(getattr(executor.class_obj, "patch_size", 1))
    context = named.get("context")
    plans = run.plans(refs, patch_size, binding,
                      int(context.shape[1]) if context is not None else 0,
                      math.prod(latent_token_grid(tuple(x.shape), patch_size)) if x is not None else 0)
    if core_cache and run.report is not None:
        run.report["kv_cache"] = "core FluxKVCache"
    selections = [binding.get(i) if binding is not None else None for i in range(len(refs))]
    attention = needs_attention(selections, run.config)
    if run.config.cache != "off" or any(attention):
        if core_cache:
            raise ValueError("SparseContext: core's Flux KV Cache and the pack's reference cache / attention rule "
                             "cannot both be active; set Apply Sparse Context's cache to off and its rule to another "
                             "one, or remove the Flux KV Cache node.")
        cached = run.cached_run(patch_size)
        out = cached.forward(executor, args, kwargs, named, refs, plans, attention, selections, run.config,
                             _activator(subsetter))
        final = cached.final_plans.get(cached._plan_key(refs))
        if final is not None and run.report is not None and run.report.get("selected") is None:
            run._record(final, run.report["text_tokens"], run.report["target_tokens"])
            run.report["selected"] = "attention"
        if run.report is not None:
            run.report["cache"] = cached.report()
        return out
    indices = [run.indices_on(plan, refs[0].device) for plan in plans]
    active = subsetter.active = _ActiveForward(refs, plans, indices)
    try:
        out = executor(*args, **kwargs)
    finally:
        subsetter.active = None
    missed = [i + 1 for i in range(len(refs)) if i not in active.thinned]
    if missed and not run.warned_missed:
        run.warned_missed = True
        log.warning("SparseContext: reference(s) %s did not reach the model as expected (another patch or this "
                    "ComfyUI version changed them); they ran dense.", missed)
    return out


def _activator(subsetter: ReferenceSubsetter):
    """``activate(refs, plans, indices)``: a context in which the subsetter keeps ``indices`` of ``refs``."""

    @contextmanager
    def activate(refs, plans, indices):
        subsetter.active = _ActiveForward(list(refs), plans, indices)
        try:
            yield
        finally:
            subsetter.active = None

    return activate


def sparse_outer_sample_wrapper(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: a fresh ``SparseRun`` for this sampling run, dropped afterwards."""
    import comfy.model_patcher

    guider = executor.class_obj
    original_options = guider.model_options
    patch = original_options.get("transformer_options", {}).get(PATCH_KEY)
    if not isinstance(patch, SparseContextPatch):
        return executor(*args, **kwargs)
    try:
        guider.model_options = comfy.model_patcher.create_model_options_clone(original_options)
        sampling = guider.model_patcher.get_model_object("model_sampling")
        run = patch.new_run(sampling)
        run.shared_binding = _single_binding(getattr(guider, "original_conds", None))
        patcher = guider.model_patcher
        run.model_key = (id(patcher.model), str(getattr(patcher, "patches_uuid", "")))
        guider.model_options["transformer_options"][RUN_KEY] = run
        out = executor(*args, **kwargs)
        patch.last_report = run.report
        return out
    finally:
        guider.model_options = original_options


def _single_binding(conds: dict | None) -> SelectionBinding | None:
    """The binding of a sampling run's conditionings if there is exactly one distinct binding."""
    found = set()
    for entries in (conds or {}).values():
        for entry in entries:
            cond = entry.get("model_conds", {}).get(BINDING_KEY) if isinstance(entry, dict) else None
            if isinstance(getattr(cond, "cond", None), SelectionBinding):
                found.add(cond.cond)
    return found.pop() if len(found) == 1 else None


class SparseContextPatch:
    """Held in the patched clone's transformer_options; makes one ``SparseRun`` per sampling run."""

    def __init__(self, config: SparseContextConfig):
        self.config = config
        self.last_report: dict[str, Any] | None = None
        self._direct: SparseRun | None = None
        self.store = CacheStore(max_mib=config.cache_mib)  # reference_only keys/values, across runs

    def new_run(self, model_sampling=None) -> SparseRun:
        window = None
        c = self.config
        if model_sampling is not None and (c.start_percent > 0.0 or c.end_percent < 1.0):
            window = (float(model_sampling.percent_to_sigma(c.start_percent)),
                      float(model_sampling.percent_to_sigma(c.end_percent)))
        run = SparseRun(c, window)
        run.store = self.store
        return run

    def direct_run(self) -> SparseRun:
        """The run used by forwards outside a sampling loop (benchmarks, training): persistent until
        ``reset_direct_run``; callers that want fresh plans per call put their own ``new_run()`` under
        ``transformer_options[RUN_KEY]``."""
        if self._direct is None:
            self._direct = self.new_run()
        return self._direct

    def reset_direct_run(self) -> None:
        self._direct = None

    # ModelPatcher treats transformer_options entries with these as patch objects.
    def to(self, device):
        return self

    def models(self) -> list:
        return []


def apply_sparse_context(model, config: SparseContextConfig):
    """A clone of ``model`` (a ComfyUI ModelPatcher) whose references are sparse; ``model`` is untouched.

    Models this pack does not support run dense, and the user is told once in the log.
    """
    import comfy.patcher_extension

    clone = model.clone()
    diffusion_model = clone.get_model_object("diffusion_model")
    family = model_family(diffusion_model)
    if family is None:
        cls = type(diffusion_model)
        log.warning("SparseContext: %s.%s is not a supported model (supported: %s); its references run dense.",
                    cls.__module__, cls.__qualname__, ", ".join(SUPPORTED_CLASSES.values()))
        return clone
    original = clone.get_model_object("diffusion_model.process_img")
    if isinstance(original, ReferenceSubsetter):  # applied twice: replace, do not stack
        original = original.original
    clone.add_object_patch("diffusion_model.process_img", ReferenceSubsetter(original))
    patch = clone.model_options["transformer_options"][PATCH_KEY] = SparseContextPatch(config)
    clone.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY)
    clone.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY)
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, sparse_forward_wrapper)
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, sparse_outer_sample_wrapper)
    # cached reference keys/values live on the model's device: dropped when ComfyUI unloads the model
    detach = comfy.patcher_extension.CallbacksMP.ON_DETACH
    clone.remove_callbacks_with_key(detach, WRAPPER_KEY)
    clone.add_callback_with_key(detach, WRAPPER_KEY, patch.store.on_detach)
    return clone
