"""The patch's state (no ComfyUI import): one ``SparseRun`` per sampling run, one ``SparseContextPatch``
per patched model.

A run plans every reference set once (before the first step when the run's conditionings are known,
else at its first forward) and keeps the kept indices on the model's device; the model's forward only
receives those index tensors, so nothing here is traced by torch.compile.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .cache_run import CachedRun
from .config import SparseContextConfig
from .planning import (
    ReferencePlan,
    attention_work_ratio,
    keep_all,
    latent_token_grid,
    needs_attention,
    plan_references,
)
from .reference_cache import CacheStore
from .selection import BINDING_KEY, SelectionBinding

log = logging.getLogger("SparseContext")

#: Per forward, per reference: its kept indices (k,) on the model's device, or None = every token kept
#: (passed through uncopied). None for the whole forward = nothing to thin.
ForwardKeep = tuple[torch.Tensor | None, ...]


def entry_binding(entry: dict) -> SelectionBinding | None:
    """The ``SelectionBinding`` a conditioning entry carries in its ``model_conds``, if any."""
    cond = entry.get("model_conds", {}).get(BINDING_KEY) if isinstance(entry, dict) else None
    binding = getattr(cond, "cond", None)
    return binding if isinstance(binding, SelectionBinding) else None


def single_binding(conds: dict | None) -> SelectionBinding | None:
    """The binding of a sampling run's conditionings if there is exactly one distinct binding."""
    found = {b for entries in (conds or {}).values() for b in map(entry_binding, entries) if b is not None}
    return found.pop() if len(found) == 1 else None


class SparseRun:
    """State of ONE sampling run: plans per reference set, their kept indices per device, the report."""

    def __init__(self, config: SparseContextConfig, sigma_window: tuple[float, float] | None = None):
        self.config = config
        self.sigma_window = sigma_window  # (start_sigma, end_sigma), sparse while end <= sigma <= start
        # The one binding found in the run's conditionings, used by forwards that carry none (e.g. the
        # negative prompt of a graph that bound selections on the positive only), so cond and uncond
        # keep the same tokens of the same reference.
        self.shared_binding: SelectionBinding | None = None
        self._plans: dict[tuple, list[ReferencePlan]] = {}
        self._keep: dict[tuple, ForwardKeep] = {}
        self._reported: set[tuple] = set()
        self.report: dict[str, Any] | None = None
        self.warned_window = False
        self.store: CacheStore | None = None  # the patch's cross-run store of reference keys/values
        # what shapes reference keys/values besides the inputs (``patch.model_identity``), set per sampling run;
        # a run without it (outside a sampler) never uses the cross-run store
        self.model_key: tuple | None = None
        self.keepalive: tuple = ()
        self.cached: CachedRun | None = None
        self.cache_estimate = 0  # bytes of cached keys/values counted in ComfyUI's memory estimate
        self.warned_subsetter = False
        self.last_plans: list[ReferencePlan] | None = None  # the plans of the latest forward that thinned
        self.log_kept = True  # one INFO line per run; training makes a run per forward and turns it off

    def binding_for(self, binding: Any, n_refs: int) -> SelectionBinding | None:
        """The binding of a forward with ``n_refs`` references: its own, else the run's shared one cut to
        ``n_refs`` (a negative with fewer references still uses the positive's selections for its own)."""
        if isinstance(binding, SelectionBinding):
            return binding
        return self.shared_binding.truncated(n_refs) if self.shared_binding is not None else None

    def in_window(self, transformer_options: dict) -> bool:
        if self.sigma_window is None:
            return True
        sigmas = transformer_options.get("sigmas")
        if sigmas is None:
            return True
        sigma = float(sigmas.flatten()[0])
        start, end = self.sigma_window
        return end <= sigma <= start

    def plans(self, refs: list[torch.Tensor], patch_size: int, binding: SelectionBinding | None
              ) -> tuple[tuple, list[ReferencePlan]]:
        """(key, plans) of references shaped (B, C, [T,] H, W), planned once per run and key."""
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
            selections = self.selections(binding, len(refs))
            plans = plan_references([r[0] for r in refs], grids, selections, self.config)
            # references chosen by the model's attention keep every token until it has been measured
            plans = [keep_all(p) if a else p for p, a in zip(plans, needs_attention(selections, self.config),
                                                               strict=True)]
            self._plans[key] = plans
        return key, plans

    @staticmethod
    def selections(binding: SelectionBinding | None, n_refs: int) -> list:
        return [binding.get(i) if binding is not None else None for i in range(n_refs)]

    def needs_forward_planning(self, binding: SelectionBinding | None, n_refs: int) -> bool:
        """Whether the forward itself decides per step (the reference cache, attention-guided selection)."""
        return self.config.cache != "off" or any(needs_attention(self.selections(binding, n_refs), self.config))

    def cached_run(self) -> CachedRun:
        """The run's cache state (made on first use)."""
        if self.cached is None:
            store = self.store if self.model_key is not None else None
            self.cached = CachedRun(self.config.cache, store, self.model_key, self.keepalive)
        return self.cached

    def forward_plans(self, refs: list[torch.Tensor], binding: SelectionBinding | None, patch_size: int,
                      text_tokens: int, target_tokens: int) -> tuple[tuple, list[ReferencePlan]]:
        """``plans`` of a forward that runs them; the run's report names the first forward's."""
        key, plans = self.plans(refs, patch_size, binding)
        self.last_plans = plans
        if key not in self._reported:
            self._reported.add(key)
            self._record(plans, text_tokens, target_tokens)
        return key, plans

    def prepare(self, conds: dict, patch_size: int, process_latent_in=None) -> None:
        """Plan every conditioning entry's references before sampling starts (``conds``: ComfyUI's
        ``{name: [entry, ...]}`` with ``reference_latents``); ``process_latent_in`` maps a latent to what
        the model sees (the ``detail`` rule reads its values)."""
        if not self.config.enabled:
            return
        for entries in conds.values():
            for entry in entries:
                refs = entry.get("reference_latents") if isinstance(entry, dict) else None
                if refs:
                    latents = [process_latent_in(r) for r in refs] if process_latent_in is not None else list(refs)
                    self.plans(latents, patch_size, self.binding_for(entry_binding(entry), len(refs)))

    def forward_keep(self, refs: list[torch.Tensor], binding: SelectionBinding | None, patch_size: int,
                     device: torch.device, text_tokens: int, target_tokens: int) -> ForwardKeep | None:
        """What one forward keeps of each reference (see ``ForwardKeep``); None = run it unchanged."""
        key, plans = self.forward_plans(list(refs), binding, patch_size, text_tokens, target_tokens)
        keep = self._keep.get((key, device))
        if keep is None:
            keep = tuple(None if p.kept == p.total else p.indices.to(device) for p in plans)
            self._keep[(key, device)] = keep
        return keep if any(k is not None for k in keep) else None

    def kept_tokens(self, refs: list[torch.Tensor], patch_size: int, binding: Any) -> list[tuple[int, int]]:
        """(kept, total) tokens per reference at the run's sparsest; dense when any step runs dense."""
        if not self.config.enabled or self.sigma_window is not None:
            grids = [latent_token_grid(tuple(r.shape), patch_size) for r in refs]
            return [(h * w, h * w) for h, w in grids]
        _, plans = self.plans(list(refs), patch_size, self.binding_for(binding, len(refs)))
        return [(p.kept, p.total) for p in plans]

    def record_cached(self, refs: list[torch.Tensor]) -> None:
        """After a forward of ``cached``: the report names the attention-selected plans (once measured) and the
        cache's hits, misses and size."""
        if self.report is None or self.cached is None:
            return
        final = self.cached.final_plans.get(self.cached.plan_key(refs))
        if final is not None and self.report.get("selected") is None:
            self._record(final, self.report["text_tokens"], self.report["target_tokens"])
            self.report["selected"] = "attention"
        self.report["cache"] = {**self.cached.report(), "estimate_mib": round(self.cache_estimate / 2**20, 2)}

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


class SparseContextPatch:
    """Held in the patched clone's transformer_options; makes one ``SparseRun`` per sampling run."""

    def __init__(self, config: SparseContextConfig, patch_size: int = 1, family=None):
        self.config = config
        self.patch_size = patch_size  # the diffusion model's patchify size (token grids of latents)
        self.family = family  # the model's ``families.ReferenceFamily`` (None: appends every reference)
        self.last_report: dict[str, Any] | None = None  # the latest sampling run's report (None: nothing thinned)
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
