"""The ComfyUI integration: thin reference tokens before the transformer blocks run.

Only official hooks are used, all on a clone of the user's ModelPatcher:
- an object patch on ``diffusion_model.process_img`` (``ReferenceSubsetter``): each reference's tokens
  and their position ids are computed by the model's own code from the FULL latent, then both are
  indexed with the SAME kept indices, so every kept token keeps its original RoPE position;
- a DIFFUSION_MODEL wrapper that hands the subsetter the current forward's kept indices;
- an APPLY_MODEL wrapper that looks up, per forward, what the run keeps (step window, bound selections)
  and passes it to the model as a forward kwarg of index tensors;
- an OUTER_SAMPLE wrapper that gives every sampling run its own ``SparseRun``, shares a single selection
  binding with every conditioning (cond and uncond stay one batch) and plans all references before the
  first step, like core EasyCache does with its holder;
- a PREPARE_SAMPLING wrapper through which ComfyUI's memory estimate counts the kept reference tokens.

Under core's torch.compile wrapper (TorchCompileModel) only the first two run inside the compiled
module, and they do tensor indexing and constant Python only: no graph breaks, and no recompiles for a
new run with the same shapes (a per-run object never reaches the compiled code).
The target tokens, text tokens and the model's output are untouched: ComfyUI keeps only the first
``img_tokens`` outputs, which are the target's.
"""

from __future__ import annotations

import inspect
import logging
import math
import threading
from contextlib import contextmanager

import torch

from .cache_run import CacheForward
from .config import SparseContextConfig
from .families import FAMILIES, ReferenceFamily, cache_refusal, match_family, why_dense
from .neighbors import check_neighbors, dense_reason, unwrap_compiled
from .planning import latent_token_grid, needs_attention
from .reference_cache import JoinBuffer
from .run import ForwardKeep, SparseContextPatch, SparseRun, entry_binding, single_binding
from .selection import BINDING_KEY, SelectionBinding

log = logging.getLogger("SparseContext")

PATCH_KEY = "sparse_context"  # transformer_options key of the per-model ``SparseContextPatch``
RUN_KEY = "sparse_context_run"  # transformer_options key of the per-run ``SparseRun``
KEEP_KEY = "sparse_context_keep"  # forward kwarg: the forward's ``ForwardKeep``
WRAPPER_KEY = "sparse_context"  # key of our wrappers, so they can be found and removed

#: Diffusion-model classes whose references the patch thins (one adapter each, ``families``).
SUPPORTED_CLASSES = {f.class_path: f.name for f in FAMILIES}
_HOOKS = tuple(dict.fromkeys(f.hook for f in FAMILIES))  # the methods a subsetter may be installed on

_UNPLANNED = object()  # KEEP_KEY absent: a direct forward call that did not go through apply_model


def model_family(diffusion_model: torch.nn.Module) -> str | None:
    """A supported family's name, or None (an adapter's class, or a subclass that inherits its hooked method)."""
    match = match_family(diffusion_model)
    return match.family.name if match is not None else None


def _subsetter(diffusion_model) -> ReferenceSubsetter | None:
    """The model's ``ReferenceSubsetter`` (on its family's hook), or None."""
    for hook in _HOOKS:
        found = getattr(diffusion_model, hook, None)
        if isinstance(found, ReferenceSubsetter):
            return found
    return None


class _PerThread(threading.local):
    """The forward in flight, per thread; set in every thread from the start, so torch.compile's guards see the
    same attribute before and after the first forward (no recompile)."""

    def __init__(self):
        self.active: _ActiveForward | None = None


class ReferenceSubsetter:
    """Object patch for the family's hook (``diffusion_model.process_img``): a reference's kept tokens and ids.

    Calls that are not one of the current forward's references (the target image, or any call when
    no forward is active) and references that keep every token pass through unchanged (no copy).
    The forward in flight is per thread: core's MultiGPU runs forwards of one model in several threads.
    """

    def __init__(self, original, patch_size: int, positions: dict[str, int], family: ReferenceFamily):
        self.original = original
        self.patch_size = patch_size
        self.family = family
        self.positions = positions  # the model's ``_forward`` parameter name -> its position
        self._local = _PerThread()
        self.warned = False

    def __deepcopy__(self, memo) -> ReferenceSubsetter:  # per-thread state and the original are shared
        return self

    @property
    def active(self) -> _ActiveForward | None:
        return self._local.active

    @contextmanager
    def activated(self, refs, keep: ForwardKeep):
        """A context in which this thread's calls keep ``keep`` of ``refs`` (the cached run's forwards)."""
        previous = self.activate(refs, keep)
        try:
            yield self.active  # (whether the model patchified anything: another wrapper may skip the forward)
        finally:
            self.restore(previous)

    def activate(self, refs, keep: ForwardKeep) -> _ActiveForward | None:
        """This thread's calls keep ``keep`` of ``refs`` from now; returns what was active before."""
        previous = self.active
        self._local.active = _ActiveForward(list(refs), tuple(keep), self.patch_size, self.family)
        return previous

    def restore(self, previous: _ActiveForward | None) -> None:
        self._local.active = previous

    def argument(self, args: tuple, kwargs: dict, name: str):
        """A ``_forward`` argument by name, whatever its positional order in this ComfyUI version."""
        if name in kwargs:
            return kwargs[name]
        position = self.positions.get(name, len(args))
        return args[position] if position < len(args) else None

    def __call__(self, x, *args, **kwargs):
        out = self.original(x, *args, **kwargs)
        active = self.active
        if active is None:
            return out
        position = active.position_of(x)
        if position is None:
            return out
        idx = active.indices[position]
        if idx is None:
            return out
        model, total = getattr(self.original, "__self__", None), active.totals[position]
        count, expected = self.family.hook_tokens(out, model).shape[1], self.family.hooked_count(total, model)
        if count != expected:
            raise RuntimeError(
                f"SparseContext: reference #{position + 1} became {count} tokens, expected "
                f"{expected}; this ComfyUI version patchifies differently. Disable Apply "
                "Sparse Context and please report the ComfyUI version."
            )
        return self.family.take(out, idx, total, model)


class _ActiveForward:
    """The references of the forward in flight and what each keeps (made inside the traced forward)."""

    def __init__(self, refs: list[torch.Tensor], keep: ForwardKeep, patch_size: int, family: ReferenceFamily):
        self.refs = refs[:len(keep)]
        self.indices = keep
        self.totals = [math.prod(family.token_grid(tuple(r.shape), patch_size)) for r in self.refs]
        self._calls = 0
        self.thinned: set[int] = set()

    def position_of(self, x: torch.Tensor) -> int | None:
        self._calls += 1
        found = None
        for i, ref in enumerate(self.refs):
            if x is ref:
                found = i
                break
        if found is None:
            # Fallback for models that convert references before patchifying (repeated to the batch, time folded
            # into it): call 1 is the target, the calls after it come in reference order; accept only a reference
            # not found yet, of the same spatial size.
            i = self._calls - 2
            if (0 <= i < len(self.refs) and i not in self.thinned
                    and tuple(x.shape[-2:]) == tuple(self.refs[i].shape[-2:])):
                found = i
        if found is not None:
            self.thinned.add(found)
        return found

    @property
    def patchified(self) -> bool:
        """Whether the model patchified anything in this forward (False: another wrapper skipped the model)."""
        return self._calls > 0

    def missed(self) -> list[int]:
        """1-based numbers of the references that did not reach ``process_img`` as expected (none when the forward
        did not patchify anything: another wrapper skipped the model, as EasyCache does on skipped steps)."""
        if self._calls == 0:
            return []
        return [i + 1 for i in range(len(self.refs)) if i not in self.thinned]


def _bind(fn, args: tuple, kwargs: dict) -> dict:
    """Arguments of a wrapped function by name, whatever their positional order in this version. (Signatures are
    not cached in a module dict: a compiled forward would guard on it and recompile when it grows.)"""
    sig = inspect.signature(fn)
    named = dict(sig.bind_partial(*args, **kwargs).arguments)
    for name, param in sig.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            named.update(named.pop(name, {}))
    return named


def _with_argument(fn, args: tuple, kwargs: dict, name: str, value) -> tuple[tuple, dict]:
    """``args`` and ``kwargs`` of a call of ``fn`` with the argument ``name`` replaced, passed as it was passed."""
    if name in kwargs:
        return args, {**kwargs, name: value}
    position = list(inspect.signature(fn).parameters).index(name)
    return (*args[:position], value, *args[position + 1:]), kwargs


def _tokens(tensor: torch.Tensor | None, patch_size: int) -> int:
    return math.prod(latent_token_grid(tuple(tensor.shape), patch_size)) if tensor is not None else 0


def core_reference_cache(transformer_options: dict) -> bool:
    """Whether core's Flux KV Cache node (ComfyUI 0.30+) is active: an ``attn1_patch`` that stores the references'
    keys/values of the first step and appends them in later steps (the references are trimmed from the input)."""
    patches = transformer_options.get("patches", {}).get("attn1_patch", [])
    return any(type(p).__name__ == "KV_Attn_Input" and type(p).__module__.endswith("nodes_flux") for p in patches)


#: ``plan_step``'s answer for a forward that runs through the run's ``CachedRun`` (its steps differ: fill,
#: record, append, measure).
CACHED = "cached"


def plan_step(run: SparseRun | None, patch: SparseContextPatch, options: dict, refs, binding, x: torch.Tensor,
              text_tokens: int) -> ForwardKeep | str | None:
    """What one forward does with its references, the one place that decides it: None (run unchanged), the kept
    indices of each reference (plain dropping), or ``CACHED``."""
    if run is None or not refs or not run.config.enabled:
        return None
    refs = list(refs)
    core_cache = core_reference_cache(options)
    if core_cache and run.sigma_window is not None:
        if not run.warned_window:  # the cache keeps step 1's references: their token count cannot change mid-run
            run.warned_window = True
            log.warning("SparseContext: core's Flux KV Cache reuses the first step's reference keys/values, so the "
                        "references stay sparse in every step (the start/end window is ignored).")
    elif not run.in_window(options):
        return None
    binding = run.binding_for(binding, len(refs))
    if run.needs_forward_planning(binding, len(refs)):
        if core_cache:
            raise ValueError("SparseContext: core's Flux KV Cache and the pack's reference cache / attention rule "
                             "cannot both be active; set Apply Sparse Context's cache to off and its rule to another "
                             "one, or remove the Flux KV Cache node.")
        if options.get("multigpu_thread_device") is not None:
            raise ValueError("SparseContext: the reference cache and the attention rule do not run under core's "
                             "MultiGPU (forwards in several threads); set Apply Sparse Context's cache to off and its "
                             "rule to another one.")
        return CACHED
    keep = run.forward_keep(refs, binding, patch.patch_size, x.device, text_tokens, _tokens(x, patch.patch_size))
    if core_cache and run.report is not None:
        run.report["kv_cache"] = "core FluxKVCache"
    return keep


def sparse_apply_model_wrapper(executor, *args, **kwargs):
    """APPLY_MODEL wrapper (outside any compiled module): what this forward keeps, as a forward kwarg.

    Forwards whose steps differ (the reference cache, attention-guided selection) get no kwarg: the
    DIFFUSION_MODEL wrapper runs them through the run's ``CachedRun``.
    """
    named = _bind(executor.original, args, kwargs)
    options = named.get("transformer_options") or {}
    patch, run = options.get(PATCH_KEY), options.get(RUN_KEY)
    if not isinstance(patch, SparseContextPatch) or not isinstance(run, SparseRun):
        return executor(*args, **kwargs)
    context = named.get("c_crossattn")
    refs = named.get("ref_latents") if _uses_references(patch, named, executor.class_obj) else None
    step = plan_step(run, patch, options, refs, named.get(BINDING_KEY), named["x"],
                     int(context.shape[1]) if context is not None else 0)
    _check_subsetter(executor.class_obj.diffusion_model, run, step)
    if step is CACHED:
        return executor(*args, **kwargs)
    return executor(*args, **kwargs, **{KEEP_KEY: step})


def _uses_references(patch: SparseContextPatch, named: dict, base_model) -> bool:
    """Whether the model will append the references at all (Krea 2 needs a reference method)."""
    family = patch.family
    return family is None or family.uses_references(named, getattr(base_model, "diffusion_model", None))


def _check_subsetter(diffusion_model, run: SparseRun, step) -> None:
    """If the subsetter is no longer on the model's hooked method (another node replaced it after Apply Sparse
    Context), a step that would thin runs dense: the user is told once per run, in the log and the report."""
    if _subsetter(diffusion_model) is not None:
        return
    if step is not None and not run.warned_subsetter:
        run.warned_subsetter = True
        reason = ("another node replaced the model's process_img after Apply Sparse Context, so its references run "
                  "dense; put Apply Sparse Context after that node")
        log.warning("SparseContext: %s.", reason)
        run.report = {**(run.report or {}), "dense_reason": reason}


def _run_keep(executor, subsetter: ReferenceSubsetter, args: tuple, kwargs: dict, refs, keep: ForwardKeep):
    """Run the model with the subsetter keeping ``keep`` of ``refs``; warn once if a reference slipped past."""
    if subsetter.family.packs:  # JoyImage: thinned references reach the model as strips of their kept patches
        args, kwargs = _with_argument(executor.original, args, kwargs, "ref_latents", subsetter.pack(refs, keep))
    previous = subsetter.activate(refs, keep)  # (plain try/finally: this runs inside torch.compile's trace)
    active = subsetter.active
    try:
        out = executor(*args, **kwargs)
    finally:
        subsetter.restore(previous)
    missed = active.missed()
    if missed and not subsetter.warned:
        subsetter.warned = True
        log.warning("SparseContext: reference(s) %s did not reach the model as expected (another patch or this "
                    "ComfyUI version changed them); they ran dense.", missed)
    return out


def sparse_forward_wrapper(executor, *args, **kwargs):
    """DIFFUSION_MODEL wrapper: hand the subsetter this forward's kept indices, then run the model.

    Under torch.compile this is traced: with the kwarg from the APPLY_MODEL wrapper it only moves tensors
    and constants around.
    """
    keep = kwargs.pop(KEEP_KEY, _UNPLANNED)
    subsetter = _subsetter(executor.class_obj)
    if subsetter is None:
        return executor(*args, **kwargs)
    if keep is _UNPLANNED:
        return _planned_forward(executor, subsetter, args, kwargs)
    refs = subsetter.argument(args, kwargs, "ref_latents")
    if keep is None or not refs:
        return executor(*args, **kwargs)
    return _run_keep(executor, subsetter, args, kwargs, refs, keep)


def _planned_forward(executor, subsetter: ReferenceSubsetter, args: tuple, kwargs: dict):
    """A forward planned here: the reference cache and attention-guided selection (their steps differ), and
    forwards outside a sampling run (no ``SparseRun``: each plans afresh in a run of its own, so nothing of one
    call is reused by another)."""
    named = _bind(executor.original, args, kwargs)
    options = named.get("transformer_options")
    patch = (options or {}).get(PATCH_KEY)
    refs = named.get("ref_latents")
    family = subsetter.family
    if not isinstance(patch, SparseContextPatch) or not refs or not family.uses_references(named, executor.class_obj):
        return executor(*args, **kwargs)
    run = options.get(RUN_KEY)
    if not isinstance(run, SparseRun):
        run = patch.new_run()
    x, context = family.target(named), family.context(named)
    step = plan_step(run, patch, options, refs, named.get(BINDING_KEY), x,
                     int(context.shape[1]) if context is not None else 0)
    if step is None:
        return executor(*args, **kwargs)
    if step is not CACHED:
        return _run_keep(executor, subsetter, args, kwargs, refs, step)
    refs = list(refs)
    binding = run.binding_for(named.get(BINDING_KEY), len(refs))
    text = int(context.shape[1]) if context is not None else 0
    _, plans = run.forward_plans(refs, binding, patch.patch_size, text, _tokens(x, patch.patch_size))
    selections = run.selections(binding, len(refs))
    fwd = CacheForward(executor, named, refs, plans, needs_attention(selections, run.config), selections, run.config,
                       subsetter.activated, attention_blocks(executor.class_obj), patch.patch_size,
                       tuple(inspect.signature(executor.original).parameters)[:len(args)])
    out = run.cached_run().forward(fwd)
    run.record_cached(refs)
    return out


def attention_blocks(diffusion_model: torch.nn.Module) -> int:
    """Attention calls per forward: the blocks of the model's block lists (``double_blocks`` and ``single_blocks``
    of Flux, ``transformer_blocks`` of Qwen-Image), each attending once."""
    return sum(len(m) for name, m in diffusion_model.named_children()
               if isinstance(m, torch.nn.ModuleList) and name.endswith("blocks"))


def share_binding(conds: dict, binding: SelectionBinding) -> None:
    """Give every conditioning entry that has references but no binding the run's single ``binding`` (cut to
    its reference count): cond and uncond then carry the same ``model_conds`` keys and ComfyUI batches them
    as it would without the patch. ``conds`` are the guider's per-run lists; entries are replaced, not modified."""
    import comfy.conds

    for entries in conds.values():
        for i, entry in enumerate(entries):
            refs = entry.get("reference_latents") if isinstance(entry, dict) else None
            if refs and entry_binding(entry) is None:
                model_conds = {**entry.get("model_conds", {}),
                               BINDING_KEY: comfy.conds.CONDConstant(binding.truncated(len(refs)))}
                entries[i] = {**entry, "model_conds": model_conds}


def sparse_outer_sample_wrapper(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: a fresh ``SparseRun`` for this sampling run, planned before the first step."""
    import comfy.model_patcher

    guider = executor.class_obj
    original_options = guider.model_options
    patch = original_options.get("transformer_options", {}).get(PATCH_KEY)
    if not isinstance(patch, SparseContextPatch):
        return executor(*args, **kwargs)
    # a pack added after Apply (TeaCache, WaveSpeed) is visible now, before the first step
    check_neighbors(original_options, guider.model_patcher.get_model_object("diffusion_model"), patch.config)
    run = patch.new_run(guider.model_patcher.get_model_object("model_sampling"))
    run.model_key, run.keepalive = model_identity(guider.model_patcher, original_options)
    patch.store.offload_device = guider.model_patcher.offload_device
    conds = getattr(guider, "conds", None) or {}
    run.shared_binding = single_binding(conds)
    if run.shared_binding is not None:
        share_binding(conds, run.shared_binding)
    run.prepare(conds, patch.patch_size, guider.model_patcher.model.process_latent_in)
    try:
        guider.model_options = comfy.model_patcher.create_model_options_clone(original_options)
        guider.model_options["transformer_options"][RUN_KEY] = run
        return executor(*args, **kwargs)
    finally:
        guider.model_options = original_options
        patch.last_report = run.report


def kept_view(latent: torch.Tensor, kept: int, total: int) -> torch.Tensor:
    """A view of ``latent`` (B, C, [T,] H, W) with ``kept / total`` of its spatial cells, shaped
    (B, C, [T,] 1, cells): the area ComfyUI's memory estimate should count for a thinned reference."""
    if kept == total:
        return latent
    flat = latent.flatten(-2)
    return flat[..., :round(flat.shape[-1] * kept / total)].unsqueeze(-2)


def model_identity(patcher, model_options: dict) -> tuple[tuple, tuple]:
    """What shapes the references' keys/values besides the inputs, as a key: the weights and their patches, the
    object patches, block and attention patches, wrappers, rope options and the attention override in force (other
    objects by type and ``id``). Returns (key, the objects named by ``id``: whoever keeps the key keeps them alive,
    so no other object can take their ``id``)."""
    objects: list = []

    def walk(value):
        if isinstance(value, dict):
            return tuple(sorted((str(k), walk(v)) for k, v in value.items()))
        if isinstance(value, (list, tuple)):
            return tuple(walk(v) for v in value)
        if value is None or isinstance(value, (str, int, float, bool)):
            return value
        objects.append(value)
        return (type(value).__qualname__, id(value))

    options = model_options.get("transformer_options", {})
    key = (walk(patcher.model), str(getattr(patcher, "patches_uuid", "")), walk(patcher.object_patches),
           walk(getattr(patcher, "wrappers", {})), walk(model_options.get("model_function_wrapper")),
           walk({name: options.get(name) for name in ("patches", "patches_replace", "wrappers", "rope_options",
                                                      "optimized_attention_override")}))
    return key, tuple(objects)


def attention_width(diffusion_model: torch.nn.Module) -> int:
    """Channels of one token's keys (heads x head size), as the model's adapter reads them; else the widest linear
    layer's input, an upper bound."""
    match = match_family(diffusion_model)
    width = match.family.token_width(diffusion_model) if match is not None else None
    return width or max(m.in_features for m in diffusion_model.modules() if isinstance(m, torch.nn.Linear))


def _text_tokens(entry: dict) -> int:
    cond = entry.get("model_conds", {}).get("c_crossattn")
    context = getattr(cond, "cond", None)
    if context is None:
        context = entry.get("cross_attn")
    return int(context.shape[1]) if isinstance(context, torch.Tensor) and context.ndim >= 2 else 0


def cache_bytes(model, run: SparseRun, conds: dict, noise_shape, patch_size: int) -> int:
    """Memory a cached run holds besides what ComfyUI's estimate counts for the kept tokens: every conditioning
    entry's cached keys/values of every block (one row per latent of the batch) and the join buffer."""
    import comfy.model_management

    dm = model.model.diffusion_model
    dtype = getattr(model.model, "manual_cast_dtype", None) or model.model_dtype()
    unit = attention_width(dm) * comfy.model_management.dtype_size(dtype)
    rows, blocks, entries, widest = int(noise_shape[0]), attention_blocks(dm), 0, 0
    total = 0
    for entry in (e for es in conds.values() for e in es if isinstance(e, dict) and e.get("reference_latents")):
        refs = entry["reference_latents"]
        kept = sum(k for k, _ in run.kept_tokens(refs, patch_size, entry_binding(entry)))
        total += 2 * blocks * rows * kept * unit
        entries += 1
        widest = max(widest, _text_tokens(entry) + kept)
    target = math.prod(latent_token_grid(tuple(noise_shape), patch_size))
    return total + JoinBuffer.nbytes(rows * max(entries, 1), target + widest, unit, 1)


def with_extra_area(model, noise_shape, extra_bytes: int) -> list[int]:
    """``noise_shape`` with more cells, so that ComfyUI's memory estimate for one batch (its minimum) grows by
    ``extra_bytes``: ComfyUI counts memory per latent cell, and this is how extra memory reaches its estimate."""
    shape = list(noise_shape)
    per_cell = model.model.memory_required([1, shape[1]] + [1] * (len(shape) - 2))
    cells = math.ceil(extra_bytes / max(per_cell * shape[0], 1.0))
    return shape[:2] + [1] * (len(shape) - 3) + [math.prod(shape[2:]) + cells]


def sparse_prepare_sampling_wrapper(executor, *args, **kwargs):
    """PREPARE_SAMPLING wrapper: while ComfyUI estimates the run's memory (and loads the model for it), each
    reference latent in the conditionings is a view of its kept size, the originals are put back afterwards; in
    cache modes the estimate also counts the cached keys/values and the join buffer."""
    named = _bind(executor.original, args, kwargs)
    options = (named.get("model_options") or {}).get("transformer_options", {})
    patch, run = options.get(PATCH_KEY), options.get(RUN_KEY)
    conds = named.get("conds")
    if not isinstance(patch, SparseContextPatch) or not isinstance(run, SparseRun) or not conds:
        return executor(*args, **kwargs)
    if run.config.enabled and run.config.cache != "off":
        extra = cache_bytes(named["model"], run, conds, named["noise_shape"], patch.patch_size)
        args, kwargs = _with_argument(executor.original, args, kwargs, "noise_shape",
                                      with_extra_area(named["model"], named["noise_shape"], extra))
        run.cache_estimate = extra
    swapped = []
    try:
        for entries in conds.values():
            for entry in entries:
                refs = entry.get("reference_latents") if isinstance(entry, dict) else None
                if refs:
                    kept = run.kept_tokens(refs, patch.patch_size, entry_binding(entry))
                    swapped.append((entry, refs))
                    entry["reference_latents"] = [kept_view(r, k, n) for r, (k, n) in zip(refs, kept, strict=True)]
        return executor(*args, **kwargs)
    finally:
        for entry, refs in swapped:
            entry["reference_latents"] = refs


def _positions(fn) -> dict[str, int]:
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = [name for name, p in inspect.signature(fn).parameters.items() if p.kind in kinds]
    return {name: i for i, name in enumerate(params)}


def unsupported_reason(model) -> str | None:
    """Why this pack leaves a ModelPatcher's references dense (its diffusion model's class), or None."""
    diffusion_model = unwrap_compiled(model.get_model_object("diffusion_model"))
    if model_family(diffusion_model) is not None:
        return None
    reason, known = dense_reason(diffusion_model, ", ".join(SUPPORTED_CLASSES.values())), why_dense(diffusion_model)
    return f"{reason}; {known}" if known else reason


def apply_sparse_context(model, config: SparseContextConfig):
    """A clone of ``model`` (a ComfyUI ModelPatcher) whose references are sparse; ``model`` is untouched.

    Models this pack does not support run dense, and the user is told once in the log.
    """
    from comfy.patcher_extension import CallbacksMP, WrappersMP

    clone = model.clone()
    # a torch.compile wrapper (a compile node before this one) forwards object patches to the module it compiles
    diffusion_model = unwrap_compiled(clone.get_model_object("diffusion_model"))
    match = match_family(diffusion_model)
    if match is None:
        log.warning("SparseContext: %s; its references run dense.", unsupported_reason(clone))
        return clone
    check_neighbors(clone.model_options, diffusion_model, config)
    family = match.family
    refusal = cache_refusal(match)
    if refusal is not None and config.enabled and (config.cache != "off" or config.rule == "attention"):
        raise ValueError(f"cache: SparseContext cannot run cache={config.cache!r} or rule={config.rule!r} on this "
                         f"model: {refusal}. Set cache to off and the rule to grid, random or detail.")
    hook = f"diffusion_model.{family.hook}"
    original = clone.get_model_object(hook)
    if isinstance(original, ReferenceSubsetter):  # applied twice: replace, do not stack
        original = original.original
    patch_size = family.patch_size(diffusion_model)
    subsetter = ReferenceSubsetter
    if family.packs:
        from .packed import ComponentRopeSubsetter as subsetter
    clone.add_object_patch(hook, subsetter(original, patch_size, _positions(diffusion_model._forward), family))
    patch = clone.model_options["transformer_options"][PATCH_KEY] = SparseContextPatch(config, patch_size, family)
    for kind, wrapper in ((WrappersMP.OUTER_SAMPLE, sparse_outer_sample_wrapper),
                          (WrappersMP.PREPARE_SAMPLING, sparse_prepare_sampling_wrapper),
                          (WrappersMP.APPLY_MODEL, sparse_apply_model_wrapper),
                          (WrappersMP.DIFFUSION_MODEL, sparse_forward_wrapper)):
        clone.remove_wrappers_with_key(kind, WRAPPER_KEY)
        clone.add_wrapper_with_key(kind, WRAPPER_KEY, wrapper)
    # cached reference keys/values live on the model's device: dropped when ComfyUI unloads the model
    detach = CallbacksMP.ON_DETACH
    clone.remove_callbacks_with_key(detach, WRAPPER_KEY)
    clone.add_callback_with_key(detach, WRAPPER_KEY, patch.store.on_detach)
    return clone
