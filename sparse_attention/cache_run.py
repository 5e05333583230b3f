"""One sampling run with the reference cache and/or attention-guided selection (see ``reference_cache``).

``CachedRun.forward`` replaces the plain sparse forward of the DIFFUSION_MODEL wrapper when a cache mode is on
or a reference's tokens are chosen by attention. Its decisions per forward (fill, record, append, select) are
Python planning; the forward itself stays tensor-only (the attention override concatenates cached tensors).

Batch rows belong to conditioning entries: ComfyUI names the entry of every chunk of the batch in
``transformer_options["uuids"]`` (cond and uncond, in order), so cached keys/values are kept per entry and
assembled into the batch of each forward. Forward calls outside a sampler (benchmarks) are one entry.
"""

from __future__ import annotations

import logging
import math

import torch

from ..selectors import normalize_scores
from .reference_cache import CacheAttention, CacheStore, ReferenceKV, fingerprint
from .selection import ReferenceSelection
from .token_math import ReferencePlan, latent_token_grid, plan_references

log = logging.getLogger("SparseContext")
OVERRIDE = "optimized_attention_override"
DIRECT = "direct"  # the entry name of forwards outside a sampler


def _timestep_name(named: dict) -> str:
    return "timestep" if "timestep" in named else "timesteps"


class CachedRun:
    """Per-run state of the cache: entries per conditioning entry, the override, and the selection by attention.

    Args:
        mode: "reference_only", "first_step" or "off" (attention-guided selection without caching).
        store: the cross-run store (``reference_only`` only), or None.
        model_key: identifies the weights (model and its weight patches) for cross-run keys.
    """

    def __init__(self, mode: str, store: CacheStore | None, model_key: tuple, patch_size: int):
        self.mode = mode
        self.patch_size = patch_size
        self.store = store if mode == "reference_only" else None
        self.model_key = model_key
        self.override = CacheAttention()
        self.entries: dict[str, ReferenceKV] = {}
        self.hits = 0
        self.misses = 0
        self.final_plans: dict[tuple, list[ReferencePlan]] = {}
        self._assembled: dict[tuple, dict] = {}
        self._empty: dict[tuple, torch.Tensor] = {}
        self._on_device: dict[tuple, tuple] = {}

    # -- report ---------------------------------------------------------------------------------------------
    def report(self) -> dict:
        mib = sum(e.nbytes for e in {id(e): e for e in self.entries.values()}.values()) / 2**20
        return {"mode": self.mode, "hits": self.hits, "misses": self.misses, "mib": round(mib, 2)}

    # -- one forward ----------------------------------------------------------------------------------------
    def forward(self, executor, args: tuple, kwargs: dict, named: dict, refs: list[torch.Tensor],
                plans: list[ReferencePlan], attention: list[bool], selections: list, config, activate):
        """Run one forward of the model with cached references.

        ``plans`` are the plans before attention selection (references with ``attention[i]`` keep every token
        until their scores are measured); ``activate(refs, plans, indices)`` hands the subsetter the kept
        indices of ``refs`` for the forward run inside it (a context manager).
        """
        options = named.get("transformer_options") or {}
        uuids = list(options.get("uuids") or [DIRECT])
        batch = int(named["x"].shape[0])
        rows = batch // len(uuids)
        key = self.plan_key(refs)
        selected = self.final_plans.get(key)
        if self.mode == "off":
            if selected is not None:
                return self._plain(executor, args, kwargs, selected, refs, activate)
            return self._measure_then_select(executor, args, kwargs, named, refs, plans, attention, selections,
                                             config, activate, key)
        missing = [u for u in dict.fromkeys(uuids) if u not in self.entries]
        if self.mode == "first_step" and missing:
            return self._record_step(executor, args, kwargs, named, refs, selected or plans, attention, selections,
                                     config, activate, uuids, rows, key, measure=selected is None and any(attention))
        if self.mode == "reference_only" and missing:
            fill_plans = selected or plans
            for u in missing:
                self.entries[u] = self._reference_only_entry(executor, named, refs, fill_plans, uuids.index(u) * rows,
                                                             activate)
        measure = self.mode == "reference_only" and selected is None and any(attention)
        out = self._append_step(executor, args, kwargs, named, refs, uuids, rows, activate, measure)
        if measure:
            final = self._select(refs, plans, attention, selections, config, key)
            for u in dict.fromkeys(uuids):  # refill with only the kept tokens attending each other
                self.entries[u] = self._reference_only_entry(executor, named, refs, final, uuids.index(u) * rows,
                                                             activate, count=False)
            self._assembled.clear()
        return out

    # -- the pieces -----------------------------------------------------------------------------------------
    @staticmethod
    def plan_key(refs: list[torch.Tensor]) -> tuple:
        """The key of a reference set's plans (their latent shapes)."""
        return tuple(tuple(r.shape[-2:]) for r in refs)

    def _indices(self, plans: list[ReferencePlan], device) -> list[torch.Tensor]:
        """The plans' kept indices on the model's device, moved once per run and plan."""
        moved = []
        for p in plans:
            key = (id(p), str(device))
            if key not in self._on_device:
                self._on_device[key] = (p, p.indices.to(device))  # the plan is kept alive with its id
            moved.append(self._on_device[key][1])
        return moved

    def _plain(self, executor, args, kwargs, plans, refs, activate):
        with activate(refs, plans, self._indices(plans, refs[0].device)):
            return executor(*args, **kwargs)

    def _measure_then_select(self, executor, args, kwargs, named, refs, plans, attention, selections, config,
                             activate, key):
        """Attention rule without a cache: this forward runs with every token of those references and measures
        their attention; the run's later forwards keep the selected tokens."""
        self._prepare_mass(named, plans)
        options = named["transformer_options"]
        self.override.previous, self.override.mode = options.get(OVERRIDE), None
        options[OVERRIDE] = self.override
        try:
            out = self._plain(executor, args, kwargs, plans, refs, activate)
        finally:
            options[OVERRIDE] = self.override.previous
        self._select(refs, plans, attention, selections, config, key)
        return out

    def _prepare_mass(self, named: dict, plans: list[ReferencePlan]) -> None:
        self.override.target = self._target(named)
        self.override.mass = torch.zeros(sum(p.kept for p in plans), device=named["x"].device)

    def _select(self, refs, plans, attention, selections, config, key) -> list[ReferencePlan]:
        """Final plans from the measured attention: per reference its mass (normalised), mixed with its own scores
        by the selection's attention weight; references without attention keep their plan."""
        mass, self.override.mass = self.override.mass.float().cpu(), None
        chosen, start = [], 0
        for i, plan in enumerate(plans):
            scores = mass[start:start + plan.kept]
            start += plan.kept
            sel = selections[i]
            if not attention[i]:
                chosen.append(sel)
                continue
            measured = torch.zeros(plan.total)
            measured[plan.indices] = scores
            measured = normalize_scores(measured.view(plan.grid))
            if sel is not None and sel.attention < 1.0:
                own = torch.nn.functional.interpolate(sel.scores[None, None], size=plan.grid, mode="area")[0, 0]
                measured = (1 - sel.attention) * normalize_scores(own) + sel.attention * measured
            chosen.append(ReferenceSelection(measured, sel.budget if sel is not None else None, rule="attention",
                                             weight=sel.weight if sel is not None else 1.0))
        final = plan_references([r[0] for r in refs], [p.grid for p in plans], chosen, config)
        # references chosen without attention keep the tokens they already ran with (a shared total budget is not
        # re-split: their keys/values may already be cached)
        final = [f if attention[i] else plans[i] for i, f in enumerate(final)]
        self.final_plans[key] = final
        return final

    def _record_step(self, executor, args, kwargs, named, refs, plans, attention, selections, config, activate,
                     uuids, rows, key, measure):
        """``first_step``: this forward runs the kept tokens (every token of attention-selected references) and
        records their keys/values per conditioning entry."""
        ov = self.override
        options = named["transformer_options"]
        ov.previous, ov.mode, ov.tail, ov.hide_front, ov.recorded = options.get(OVERRIDE), "record", \
            sum(p.kept for p in plans), False, {}
        if measure:
            self._prepare_mass(named, plans)
        options[OVERRIDE] = ov
        try:
            out = self._plain(executor, args, kwargs, plans, refs, activate)
        finally:
            options[OVERRIDE] = ov.previous
            ov.mode = None
        counts = tuple(p.kept for p in plans)
        keep = None
        if measure:
            final = self._select(refs, plans, attention, selections, config, key)
            keep = [torch.searchsorted(p.indices, f.indices) for p, f in zip(plans, final, strict=True)]
        for i, u in enumerate(uuids):
            block_rows = slice(i * rows, (i + 1) * rows)
            entry = ReferenceKV({b: (k[block_rows], v[block_rows]) for b, (k, v) in ov.recorded.items()}, counts)
            self.entries[u] = entry.select(keep) if keep is not None else entry
            self.misses += 1
        ov.recorded = {}
        self._assembled.clear()
        return out

    def _append_step(self, executor, args, kwargs, named, refs, uuids, rows, activate, measure):
        """Every reference gives zero tokens; each block's attention appends the cached keys/values."""
        ov = self.override
        options = named["transformer_options"]
        assembled_key = (tuple(uuids), rows)
        cached = self._assembled.get(assembled_key)
        if cached is None:
            entries = [self.entries[u] for u in uuids]
            if all(e is entries[0] for e in entries):  # one entry for the whole batch: broadcast, no copy
                cached = entries[0].blocks
            else:
                cached = {b: tuple(torch.cat([e.blocks[b][j].expand(rows, -1, -1, -1) for e in entries])
                                   for j in (0, 1)) for b in entries[0].blocks}
            self._assembled[assembled_key] = cached
        empty = [self._empty_index(refs[0].device) for _ in refs]
        plans = [ReferencePlan(latent_token_grid(tuple(r.shape), self.patch_size), e, "cached")
                 for r, e in zip(refs, empty, strict=True)]
        if measure:
            ov.target = self._target(named)
            ov.mass = torch.zeros(sum(self.entries[uuids[0]].counts), device=refs[0].device)
        if ov.cached is not cached:
            ov._buffers = {}
        ov.previous, ov.mode, ov.cached = options.get(OVERRIDE), "append", cached
        options[OVERRIDE] = ov
        try:
            with activate(refs, plans, empty):
                return executor(*args, **kwargs)
        finally:
            options[OVERRIDE] = ov.previous
            ov.mode = None

    def _target(self, named: dict) -> tuple[int, int]:
        x, context = named["x"], named.get("context")
        text = int(context.shape[1]) if context is not None else 0
        return text, text + math.prod(latent_token_grid(tuple(x.shape), self.patch_size))

    def _empty_index(self, device) -> torch.Tensor:
        key = (str(device),)
        if key not in self._empty:
            self._empty[key] = torch.zeros(0, dtype=torch.long, device=device)
        return self._empty[key]

    def _reference_only_entry(self, executor, named: dict, refs: list[torch.Tensor], plans: list[ReferencePlan],
                              row: int, activate, count: bool = True) -> ReferenceKV:
        """The kept tokens of one conditioning entry's references, computed attending only to references at
        t=0: from the cross-run store, or by one small forward (one text token, the smallest target)."""
        inputs = self._fill_inputs(named, refs, row)
        store_key = None
        if self.store is not None:
            tensors = [inputs[n] for n in sorted(inputs) if isinstance(inputs[n], torch.Tensor)]
            plan_key = tuple((p.grid, fingerprint(p.indices)) for p in plans)
            store_key = (self.model_key, fingerprint(*[r[row] for r in refs], *tensors), plan_key,
                         str(named.get("ref_latents_method")), str(named["x"].dtype), str(named["x"].device))
            hit = self.store.get(store_key)
            if hit is not None:
                self.hits += count
                return hit
        self.misses += count
        ov = self.override
        ov.previous, ov.mode, ov.tail, ov.hide_front, ov.recorded = None, "record", sum(p.kept for p in plans), \
            True, {}
        options = dict(named.get("transformer_options") or {})
        options.pop("uuids", None)
        options[OVERRIDE] = ov
        inputs["transformer_options"] = options
        try:
            with activate(inputs["ref_latents"], plans, self._indices(plans, refs[0].device)):
                executor.original(**inputs)
        finally:
            ov.mode, ov.hide_front = None, False
        entry = ReferenceKV(dict(ov.recorded), tuple(p.kept for p in plans))
        ov.recorded = {}
        if store_key is not None:
            self.store.put(store_key, entry)
        return entry

    def _fill_inputs(self, named: dict, refs: list[torch.Tensor], row: int) -> dict:
        """The fill forward's arguments: batch row ``row`` of everything, the references as they are, the
        sampling timestep at 0, one zero text token and the smallest target (the references' positions do not
        depend on the target's size, except with the "uxo" layout)."""
        x = named["x"]
        batch = x.shape[0]
        inputs = {}
        for name, value in named.items():
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
                value = value[row:row + 1]
            inputs[name] = value
        if named.get("ref_latents_method") != "uxo":
            p = self.patch_size
            x = x[..., :p, :p]
        inputs["x"] = torch.zeros_like(x[row:row + 1])
        t = _timestep_name(named)
        inputs[t] = torch.zeros_like(inputs[t])
        context = named.get("context")
        if context is not None:
            inputs["context"] = torch.zeros_like(context[row:row + 1, :1])
        for name in ("attention_mask", "control"):
            if name in inputs:
                inputs[name] = None
        inputs["ref_latents"] = [r[row:row + 1] for r in refs]
        return inputs
