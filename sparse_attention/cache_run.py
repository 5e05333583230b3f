"""One sampling run with the reference cache and/or attention-guided selection (see ``reference_cache``).

``CachedRun.forward`` replaces the plain sparse forward of the DIFFUSION_MODEL wrapper when a cache mode is on
or a reference's tokens are chosen by attention. Its decisions per forward (fill, record, append, select) are
Python planning; the forward itself stays tensor-only (the attention override concatenates cached tensors).

Batch rows belong to conditioning entries: ComfyUI names the entry of every chunk of the batch in
``transformer_options["uuids"]`` (cond and uncond, in order), so cached keys/values are kept per entry, one row
per latent of the batch, and assembled into the batch of each forward. A forward outside a sampler is one entry.

Every step that records, appends or measures checks that its attention override saw every attention block of
the model: when another pack calls the blocks without ``transformer_options`` the override never runs and the
image would be silently wrong, so the run stops with ``SparseContextBypassed`` instead.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..selectors import normalize_scores
from .errors import SparseContextBypassed
from .planning import ReferencePlan, latent_token_grid, plan_references
from .reference_cache import CacheAttention, CacheStore, JoinBuffer, ReferenceKV, fingerprint
from .selection import ReferenceSelection

OVERRIDE = "optimized_attention_override"
DIRECT = "direct"  # the entry name of forwards outside a sampler
#: transformer_options lists with one item per batch chunk (sliced with the rows of a chunk).
PER_CHUNK = ("uuids", "cond_or_uncond")


@contextmanager
def override_installed(options: dict, override: CacheAttention | None):
    """Run with ``override`` as the attention override of ``options`` (the one in force runs inside it); the
    options are restored as they were, without the key if there was none."""
    if override is None:
        yield
        return
    had = OVERRIDE in options
    override.previous = options.get(OVERRIDE)
    options[OVERRIDE] = override
    try:
        yield
    finally:
        if had:
            options[OVERRIDE] = override.previous
        else:
            options.pop(OVERRIDE, None)


def batch_rows(named: dict, rows: list[int]) -> dict:
    """``named`` (a forward's arguments by name) for the batch rows ``rows`` only: every tensor or list of tensors
    with the batch's leading size is indexed, the per-chunk lists of ``transformer_options`` too. ``rows`` are
    Python ints (planning, outside the traced forward): the index tensor is made once per device."""
    batch = int(named["x"].shape[0])
    options = dict(named.get("transformer_options") or {})
    chunks = len(options.get("uuids") or [DIRECT])
    per_chunk = sorted({r // (batch // chunks) for r in rows})
    for name in PER_CHUNK:
        if isinstance(options.get(name), list) and len(options[name]) == chunks:
            options[name] = [options[name][c] for c in per_chunk]
    index: dict[torch.device, torch.Tensor] = {}

    def take(t: torch.Tensor) -> torch.Tensor:
        if t.device not in index:
            index[t.device] = torch.tensor(rows, dtype=torch.long, device=t.device)
        return t.index_select(0, index[t.device])

    if isinstance(options.get("sigmas"), torch.Tensor) and options["sigmas"].shape[:1] == (batch,):
        options["sigmas"] = take(options["sigmas"])
    out = {}
    for name, value in named.items():
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
            value = take(value)
        elif isinstance(value, list) and value and all(isinstance(t, torch.Tensor) and t.shape[0] == batch
                                                        for t in value):
            value = [take(t) for t in value]
        out[name] = value
    out["transformer_options"] = options
    return out


@dataclass
class CacheForward:
    """One forward of the model in a cached run: the DIFFUSION_MODEL wrapper's call, its arguments by name, and what
    the run planned for its references."""

    executor: Any
    named: dict  # every argument by name, ``transformer_options`` included
    refs: list[torch.Tensor]  # the forward's reference latents, as the model receives them
    plans: list[ReferencePlan]  # before attention selection (attention-selected references keep every token)
    attention: list[bool]  # per reference: its tokens are chosen by the model's attention
    selections: list  # per reference: its ReferenceSelection or None
    config: Any  # SparseContextConfig
    activate: Callable  # activate(refs, indices): a context in which the subsetter keeps ``indices`` of ``refs``
    blocks: int  # attention blocks the model runs per forward
    patch_size: int
    positional: tuple[str, ...] = ()  # the arguments the wrapper received positionally (wrappers inside may read
    # them by position, as core EasyCache's reads x), passed on the same way
    model_ran: bool = True  # False after ``run`` when a wrapper inside ours returned without running the model

    @property
    def options(self) -> dict:
        return self.named["transformer_options"]

    @property
    def uuids(self) -> list:
        return list(self.options.get("uuids") or [DIRECT])

    @property
    def rows(self) -> int:
        """Batch rows per conditioning entry."""
        return int(self.named["x"].shape[0]) // len(self.uuids)

    @property
    def device(self) -> torch.device:
        return self.named["x"].device

    def target(self) -> tuple[int, int]:
        """(start, stop) of the target's tokens in the joint sequence [text, target, references]."""
        context = self.named.get("context")
        text = int(context.shape[1]) if context is not None else 0
        return text, text + math.prod(latent_token_grid(tuple(self.named["x"].shape), self.patch_size))

    def run(self, override: CacheAttention | None, indices: list[torch.Tensor]) -> torch.Tensor:
        """The model's forward with ``override`` installed and the subsetter keeping ``indices`` of the references."""
        with override_installed(self.options, override), self.activate(self.refs, indices) as active:
            args = [self.named[n] for n in self.positional]
            out = self.executor(*args, **{k: v for k, v in self.named.items() if k not in self.positional})
        self.model_ran = active is None or active.patchified
        return out

    def for_rows(self, rows: list[int]) -> CacheForward:
        named = batch_rows(self.named, rows)
        return replace(self, named=named, refs=list(named["ref_latents"]))


def _check_blocks(seen: int, expected: int, what: str) -> None:
    if seen != expected:
        raise SparseContextBypassed(f"{what} in {seen} of the model's {expected} attention blocks")


class CachedRun:
    """Per-run state of the cache: entries per conditioning entry, and the selection by attention.

    Args:
        mode: "reference_only", "first_step" or "off" (attention-guided selection without caching).
        store: the cross-run store (``reference_only`` only), or None.
        model_key: names everything that shapes the references' keys/values besides the inputs (the weights and
            their patches, object patches, block patches, wrappers, the attention override in force).
        keepalive: the objects ``model_key`` names by identity (kept alive with stored entries).
    """

    def __init__(self, mode: str, store: CacheStore | None, model_key: tuple, keepalive: tuple = ()):
        self.mode = mode
        self.store = store if mode == "reference_only" else None
        self.model_key = model_key
        self.keepalive = keepalive
        self.entries: dict[str, ReferenceKV] = {}
        self.hits = 0
        self.misses = 0
        self.final_plans: dict[tuple, list[ReferencePlan]] = {}
        self.join = JoinBuffer()
        self._assembled: dict[tuple, dict] = {}
        self._on_device: dict[tuple, tuple] = {}
        self._thread: int | None = None

    def report(self) -> dict:
        mib = sum(e.nbytes for e in {id(e): e for e in self.entries.values()}.values()) / 2**20
        return {"mode": self.mode, "hits": self.hits, "misses": self.misses, "mib": round(mib, 2)}

    @staticmethod
    def plan_key(refs: list[torch.Tensor]) -> tuple:
        """The key of a reference set's plans (their latent shapes)."""
        return tuple(tuple(r.shape[-2:]) for r in refs)

    def forward(self, fwd: CacheForward) -> torch.Tensor:
        """Run one forward of the model with cached references (or measuring attention, for mode "off")."""
        self._check_thread()
        key = self.plan_key(fwd.refs)
        selected = self.final_plans.get(key)
        if self.mode == "off":
            if selected is not None:
                return fwd.run(None, self._indices(selected, fwd.device))
            return self._measure_then_select(fwd, key)
        uuids = list(dict.fromkeys(fwd.uuids))
        missing = [u for u in uuids if u not in self.entries]
        if self.mode == "first_step" and missing:
            if len(missing) < len(uuids):  # an entry that joins mid-run: record it alone, the others stay cached
                return self._split(fwd, missing)
            return self._record_step(fwd, selected or fwd.plans, key, measure=selected is None and any(fwd.attention))
        final = selected is not None or not any(fwd.attention)
        for u in missing:  # reference_only
            self.entries[u] = self._fill(fwd, u, selected or fwd.plans, store=final)
        measure = self.mode == "reference_only" and not final
        mass = torch.zeros(sum(self.entries[uuids[0]].counts), device=fwd.device) if measure else None
        out = self._append_step(fwd, mass)
        if measure:
            plans = self._select(fwd, mass, key)
            for u in uuids:  # refill with only the kept tokens attending each other
                self.entries[u] = self._fill(fwd, u, plans, count=False)
            self._assembled.clear()
        return out

    # -- the steps ------------------------------------------------------------------------------------------
    def _measure_then_select(self, fwd: CacheForward, key: tuple) -> torch.Tensor:
        """Attention rule without a cache: this forward runs with every token of those references and measures
        their attention; the run's later forwards keep the selected tokens."""
        ov = CacheAttention(mass=self._mass(fwd.plans, fwd.device), target=fwd.target())
        out = fwd.run(ov, self._indices(fwd.plans, fwd.device))
        self._select(fwd, self._measured(ov, fwd), key)
        return out

    def _record_step(self, fwd: CacheForward, plans: list[ReferencePlan], key: tuple, measure: bool) -> torch.Tensor:
        """``first_step``: this forward runs the kept tokens (every token of attention-selected references) and
        records their keys/values per conditioning entry."""
        ov = CacheAttention("record", tail=sum(p.kept for p in plans),
                            mass=self._mass(plans, fwd.device) if measure else None, target=fwd.target())
        out = fwd.run(ov, self._indices(plans, fwd.device))
        _check_blocks(len(ov.recorded), fwd.blocks, "the first step recorded the references' keys/values")
        keep = None
        if measure:
            final = self._select(fwd, self._measured(ov, fwd), key)
            keep = [torch.searchsorted(p.indices, f.indices) for p, f in zip(plans, final, strict=True)]
        counts = tuple(p.kept for p in plans)
        rows = fwd.rows
        for i, u in enumerate(fwd.uuids):
            part = slice(i * rows, (i + 1) * rows)
            entry = ReferenceKV({b: (k[part], v[part]) for b, (k, v) in ov.recorded.items()}, counts)
            self.entries[u] = entry.select(keep) if keep is not None else entry
            self.misses += 1
        self._assembled.clear()
        return out

    def _split(self, fwd: CacheForward, missing: list) -> torch.Tensor:
        """A forward whose conditioning entries are partly recorded: the new entries' rows run a record step,
        the others their cached step; the outputs are put back in batch order."""
        if fwd.named.get("control") is not None:
            raise ValueError("SparseContext: cache=first_step cannot add a conditioning that starts mid-run to a "
                             "batch with a ControlNet; use cache=reference_only or off.")
        rows = fwd.rows
        new = [i * rows + r for i, u in enumerate(fwd.uuids) if u in missing for r in range(rows)]
        old = [i * rows + r for i, u in enumerate(fwd.uuids) if u not in missing for r in range(rows)]
        out_new, out_old = self.forward(fwd.for_rows(new)), self.forward(fwd.for_rows(old))
        order = torch.tensor(new + old, device=out_new.device).argsort()  # batch order of the concatenated rows
        return torch.cat((out_new, out_old)).index_select(0, order)

    def _append_step(self, fwd: CacheForward, mass: torch.Tensor | None) -> torch.Tensor:
        """Every reference gives zero tokens; each block's attention appends the cached keys/values."""
        assembled_key = (tuple(fwd.uuids), fwd.rows)
        cached = self._assembled.get(assembled_key)
        if cached is None:
            entries = [self.entries[u] for u in fwd.uuids]
            if all(e is entries[0] for e in entries):  # one entry for the whole batch: broadcast, no copy
                cached = entries[0].blocks
            else:
                cached = {b: tuple(torch.cat([e.blocks[b][j] for e in entries]) for j in (0, 1))
                          for b in entries[0].blocks}
            self._assembled = {assembled_key: cached}  # one batch layout at a time: no second copy kept
        ov = CacheAttention("append", cached=cached, join=self.join, mass=mass, target=fwd.target())
        empty = torch.zeros(0, dtype=torch.long, device=fwd.device)
        out = fwd.run(ov, [empty] * len(fwd.refs))
        if fwd.model_ran:  # a step another wrapper skipped (core EasyCache, LazyCache) ran no block at all
            _check_blocks(len(ov.appended), len(cached), "a cached step appended the references' keys/values")
        if mass is not None:
            self._measured(ov, fwd)
        return out

    def _fill(self, fwd: CacheForward, uuid: str, plans: list[ReferencePlan], count: bool = True,
              store: bool = True) -> ReferenceKV:
        """The kept tokens of one conditioning entry's references (every row of it), computed attending only to
        references at t=0: from the cross-run store, or by one small forward (one text token, the smallest
        target). Entries of plans that still keep every token for attention measuring are never stored."""
        chunk = fwd.uuids.index(uuid)
        inputs = self._fill_inputs(fwd, list(range(chunk * fwd.rows, (chunk + 1) * fwd.rows)))
        store_key = None
        if self.store is not None and store:
            tensors = [inputs[n] for n in sorted(inputs) if isinstance(inputs[n], torch.Tensor)]
            store_key = (self.model_key, fingerprint(*inputs["ref_latents"], *tensors),
                         tuple((p.grid, fingerprint(p.indices)) for p in plans),
                         str(fwd.named.get("ref_latents_method")), str(fwd.named["x"].dtype), str(fwd.device))
            hit = self.store.get(store_key, fwd.device)
            if hit is not None:
                self.hits += count
                return hit
        self.misses += count
        ov = CacheAttention("record", tail=sum(p.kept for p in plans), hide_front=True)
        with override_installed(inputs["transformer_options"], ov), \
                fwd.activate(inputs["ref_latents"], self._indices(plans, fwd.device)):
            fwd.executor.original(**inputs)  # a side computation: not through the other wrappers of the step
        _check_blocks(len(ov.recorded), fwd.blocks, "the references' keys/values were computed (reference_only)")
        entry = ReferenceKV(ov.recorded, tuple(p.kept for p in plans))
        if store_key is not None:
            self.store.put(store_key, entry, self.keepalive)
        return entry

    def _fill_inputs(self, fwd: CacheForward, rows: list[int]) -> dict:
        """The fill forward's arguments: the entry's batch rows of everything, the references as they are, the
        sampling timestep at 0, one zero text token and the smallest target (the references' positions do not
        depend on the target's size, except with the "uxo" layout)."""
        inputs = batch_rows(fwd.named, rows)
        options = inputs["transformer_options"]
        for name in PER_CHUNK:
            options.pop(name, None)
        x = inputs["x"]
        if fwd.named.get("ref_latents_method") != "uxo":
            x = x[..., :fwd.patch_size, :fwd.patch_size]
        inputs["x"] = torch.zeros_like(x)
        t = "timestep" if "timestep" in inputs else "timesteps"
        inputs[t] = torch.zeros_like(inputs[t])
        if inputs.get("context") is not None:
            inputs["context"] = torch.zeros_like(inputs["context"][:, :1])
        for name in ("attention_mask", "control"):
            if name in inputs:
                inputs[name] = None
        return inputs

    # -- helpers --------------------------------------------------------------------------------------------
    def _check_thread(self) -> None:
        """Entries and the join buffer belong to one sampling thread (core's MultiGPU runs forwards in several)."""
        me = threading.get_ident()
        if self._thread is None:
            self._thread = me
        elif self._thread != me:
            raise ValueError("SparseContext: the reference cache and the attention rule run forwards of one sampling "
                             "run in one thread only, and this run's forwards come from several (core's MultiGPU); "
                             "set Apply Sparse Context's cache to off and its rule to another one.")

    def _indices(self, plans: list[ReferencePlan], device) -> list[torch.Tensor]:
        """The plans' kept indices on the model's device, moved once per run and plan."""
        moved = []
        for p in plans:
            key = (id(p), str(device))
            if key not in self._on_device:
                self._on_device[key] = (p, p.indices.to(device))  # the plan is kept alive with its id
            moved.append(self._on_device[key][1])
        return moved

    @staticmethod
    def _mass(plans: list[ReferencePlan], device) -> torch.Tensor:
        return torch.zeros(sum(p.kept for p in plans), device=device)

    @staticmethod
    def _measured(ov: CacheAttention, fwd: CacheForward) -> torch.Tensor:
        _check_blocks(len(ov.measured), fwd.blocks, "the attention rule measured the references' attention")
        return ov.mass

    def _select(self, fwd: CacheForward, mass: torch.Tensor, key: tuple) -> list[ReferencePlan]:
        """Final plans from the measured attention: per reference its mass (normalised), mixed with its own scores
        by the selection's attention weight; references without attention keep their plan."""
        mass = mass.float().cpu()
        chosen, start = [], 0
        for plan, attention, sel in zip(fwd.plans, fwd.attention, fwd.selections, strict=True):
            scores = mass[start:start + plan.kept]
            start += plan.kept
            if not attention:
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
        final = plan_references([r[0] for r in fwd.refs], [p.grid for p in fwd.plans], chosen, fwd.config)
        # references chosen without attention keep the tokens they already ran with (a shared total budget is not
        # re-split: their keys/values may already be cached)
        final = [f if a else p for f, a, p in zip(final, fwd.attention, fwd.plans, strict=True)]
        self.final_plans[key] = final
        return final

