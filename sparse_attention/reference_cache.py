"""The reference cache: the kept reference tokens' keys and values, computed once and reused by later steps.

It works at the one level every supported model shares on every ComfyUI host: the attention override
(``transformer_options["optimized_attention_override"]``). Flux (FLUX.1 Kontext, FLUX.2) and Qwen-Image call it
once per block, after RoPE, with q, k, v of shape (B, heads, L, head_dim) and the keys in the joint order
[text, target, references], and name the block in ``transformer_options`` (``block_type``, ``block_index``).
Because the cached keys already carry their RoPE rotation, the reference tokens themselves can leave the
sequence: in a cached step the model patch gives every reference zero tokens and :class:`CacheAttention` appends
the cached keys/values to each block's keys/values. Later steps then run text + target tokens only.

Modes:
- ``reference_only``: before the first step that needs them, one "fill" forward per conditioning entry computes
  the kept reference tokens with the references attending only to references and modulated at t=0 (as FLUX.2
  [klein] 9B-KV was trained). The result does not depend on prompt, seed or step (on FLUX.1 it depends on the
  pooled text vector, which is part of the key), so it is also reused across runs (``CacheStore``). Exact for
  models trained that way; an approximation for others.
- ``first_step``: the first sparse step runs normally (references attend to the noisy target, as core's Flux KV
  Cache does) and records the kept tokens' keys/values, separately for every conditioning entry (cond and
  uncond); every later step reuses them.
Attention-guided selection (rule ``attention``): while keys of all reference tokens are in a block's attention,
a strided sample of the target's queries measures how much attention each reference token receives
(:func:`reference_attention_mass`); the kept tokens are picked from that (plus the coverage floor).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

#: Target queries sampled per block to estimate the attention mass of reference tokens.
MASS_QUERIES = 64

BlockKey = tuple  # (block_type, block_index) as the model names the attention call


@dataclass
class ReferenceKV:
    """Keys and values of one conditioning entry's kept reference tokens, per attention block.

    ``blocks[key] = (k, v)``, each (rows, heads, K, head_dim), K = ``sum(counts)`` tokens in reference order.
    """

    blocks: dict = field(default_factory=dict)
    counts: tuple[int, ...] = ()

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.blocks.values())

    def select(self, keep: list[torch.Tensor]) -> ReferenceKV:
        """The entries of the tokens ``keep[i]`` (indices into reference i's cached tokens), per reference."""
        starts = [sum(self.counts[:i]) for i in range(len(self.counts))]
        device = next(iter(self.blocks.values()))[0].device if self.blocks else "cpu"
        index = torch.cat([s + idx.to(device) for s, idx in zip(starts, keep, strict=True)])
        blocks = {b: (k.index_select(2, index), v.index_select(2, index)) for b, (k, v) in self.blocks.items()}
        return ReferenceKV(blocks, tuple(int(i.numel()) for i in keep))


class CacheStore:
    """Least-recently-used store of ``ReferenceKV`` across sampling runs, bounded in entries and bytes.

    Shared by every clone of the patched model (``copy.deepcopy`` returns the same store: ComfyUI deep-copies
    model options when it clones a model, and the cached tensors must not be copied with them); keys include the
    model's weight patches, so clones with another LoRA never hit each other's entries.
    """

    def __init__(self, max_entries: int = 8, max_mib: float = 4096.0):
        self.max_entries = max_entries
        self.max_bytes = int(max_mib * 2**20)
        self._items: OrderedDict[tuple, ReferenceKV] = OrderedDict()

    def __deepcopy__(self, memo) -> CacheStore:
        return self

    def get(self, key: tuple) -> ReferenceKV | None:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: tuple, item: ReferenceKV) -> None:
        if item.nbytes > self.max_bytes:
            return  # larger than the whole store: used for this run only
        self._items[key] = item
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries or self.nbytes > self.max_bytes:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()

    def on_detach(self, _patcher, unpatch_all: bool = True, *_args) -> None:
        """ComfyUI ``ON_DETACH`` callback: drop everything when the model is unloaded for good (``unpatch_all``);
        ComfyUI also detaches a loaded clone, keeping its weights, whenever another clone of the model loads."""
        if unpatch_all:
            self.clear()

    @property
    def nbytes(self) -> int:
        return sum(item.nbytes for item in self._items.values())

    def __len__(self) -> int:
        return len(self._items)


def fingerprint(*tensors: torch.Tensor | None) -> str:
    """A content key of tensors (shape, dtype and every value), for cache keys that must change with the input."""
    digest = hashlib.sha256()
    for t in tensors:
        if t is None:
            digest.update(b"none")
            continue
        t = t.detach()
        digest.update(f"{tuple(t.shape)}{t.dtype}".encode())
        digest.update(t.to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class CacheAttention:
    """The attention override of a cached run; what it does in a forward is set before that forward.

    - ``mode="record"``: store the last ``tail`` keys/values of each block (the reference tokens) in
      ``recorded``; with ``hide_front`` every other key is masked out, so the references attend only to
      references (the fill forward of ``reference_only``).
    - ``mode="append"``: append ``cached[block]`` to each block's keys/values (in a buffer per block and shape).
    - ``mass`` (a per-token tensor or None): accumulate the attention that a sample of the target's queries
      (positions ``target`` = (start, stop) of the queries) gives each of the last ``mass.numel()`` keys.
    - ``mode=None``: pass through.
    Another override that was set before this one (``previous``) still runs, on the extended keys/values.
    """

    def __init__(self, previous=None):
        self.previous = previous
        self.mode: str | None = None
        self.tail = 0
        self.hide_front = False
        self.recorded: dict = {}
        self.cached: dict = {}
        self.mass: torch.Tensor | None = None
        self.target: tuple[int, int] = (0, 0)
        self._buffers: dict = {}

    def __call__(self, func, *args, **kwargs):
        q, k, v, heads = args[:4]
        rest = list(args[4:])
        mask = rest.pop(0) if rest else kwargs.pop("mask", None)
        if not kwargs.get("skip_reshape", False):
            raise RuntimeError("SparseContext: this ComfyUI calls attention in a layout the reference cache does not "
                               "know (expected (batch, heads, tokens, dim)); set the cache to off.")
        options = kwargs.get("transformer_options") or {}
        block = (options.get("block_type"), options.get("block_index"))
        if self.mode == "record":
            self.recorded[block] = (k[:, :, -self.tail:].clone(), v[:, :, -self.tail:].clone())
            if self.hide_front:
                front = torch.zeros(k.shape[2], dtype=q.dtype, device=q.device)
                front[: k.shape[2] - self.tail] = float("-inf")
                mask = _add_masks(mask, front.view(1, 1, 1, -1))
        elif self.mode == "append":
            ck, cv = self.cached[block]
            n = ck.shape[2]
            k, v = self._buffered(block, k, v, ck, cv)
            mask = _extend_mask(mask, n)
        if self.mass is not None:
            self.mass += reference_attention_mass(q, k, self.target, self.mass.numel(), mask)
        call = self.previous if self.previous is not None else func
        if self.previous is not None:
            return call(func, q, k, v, heads, mask=mask, **kwargs)
        return call(q, k, v, heads, mask=mask, **kwargs)

    def _buffered(self, block, k, v, ck, cv):
        """Keys/values written into per-block buffers that already hold the cached part: per step only the text
        and target rows are copied. Concatenating the cache into new tensors instead is slower (a fresh allocation in
        every block of every step; ``benchmarks/bench_cache_layout.py``)."""
        key = (block, tuple(k.shape))
        buf = self._buffers.get(key)
        if buf is None:
            n = ck.shape[2]
            shape = (k.shape[0], k.shape[1], k.shape[2] + n, k.shape[3])
            buf = (k.new_empty(shape), v.new_empty(shape))
            buf[0][:, :, k.shape[2]:] = ck  # (1 or B rows) broadcast over the batch
            buf[1][:, :, k.shape[2]:] = cv
            self._buffers[key] = buf
        buf[0][:, :, :k.shape[2]].copy_(k)
        buf[1][:, :, :k.shape[2]].copy_(v)
        return buf

    # ComfyUI may move patch objects with the model
    def to(self, device):
        return self


def reference_attention_mass(q: torch.Tensor, k: torch.Tensor, target: tuple[int, int], n_refs: int,
                             mask: torch.Tensor | None = None, queries: int = MASS_QUERIES) -> torch.Tensor:
    """Attention that a strided sample of target queries gives each of the last ``n_refs`` keys, summed over the
    sampled queries, heads and batch rows.

    Args:
        q: (B, H, Lq, D) queries (after RoPE); ``target`` = (start, stop) of the target's queries in Lq.
        k: (B, H, Lk, D) keys; the last ``n_refs`` are the reference tokens.
        mask: the block's additive (or boolean) attention mask, broadcastable to (B, H, Lq, Lk), or None.
    Returns:
        (n_refs,) float32.
    """
    start, stop = target
    step = max(1, (stop - start) // queries)
    rows = torch.arange(start, stop, step, device=q.device)[:queries]
    logits = (q.index_select(2, rows).float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        m = mask if mask.shape[-2] == 1 else mask.index_select(-2, rows)
        logits = logits.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else logits + m.float()
    return logits.softmax(dim=-1)[..., -n_refs:].sum(dim=(0, 1, 2))


def _add_masks(mask: torch.Tensor | None, add: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return add
    if mask.dtype == torch.bool:
        return torch.zeros_like(add).masked_fill(~mask, float("-inf")) + add
    return mask + add.to(mask.dtype)


def _extend_mask(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """A key mask for ``n`` more (visible) keys at the end."""
    if mask is None:
        return None
    return torch.nn.functional.pad(mask, (0, n), value=True if mask.dtype == torch.bool else 0.0)
