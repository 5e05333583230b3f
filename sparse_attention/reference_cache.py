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

from .errors import SparseContextBypassed

#: Target queries sampled per block to estimate the attention mass of reference tokens.
MASS_QUERIES = 64

BlockKey = tuple  # (block_type, block_index) as the model names the attention call


@dataclass
class ReferenceKV:
    """Keys and values of one conditioning entry's kept reference tokens, per attention block.

    ``blocks[key] = (k, v)``, each (rows, heads, K, head_dim), K = ``sum(counts)`` tokens in reference order;
    ``rows`` are the batch rows of the entry (one per latent of the batch).
    """

    blocks: dict = field(default_factory=dict)
    counts: tuple[int, ...] = ()

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.blocks.values())

    def to(self, device) -> ReferenceKV:
        """A copy on ``device`` (the same object if it is there already)."""
        if all(k.device == torch.device(device) for k, _ in self.blocks.values()):
            return self
        return ReferenceKV({b: (k.to(device), v.to(device)) for b, (k, v) in self.blocks.items()}, self.counts)

    def select(self, keep: list[torch.Tensor]) -> ReferenceKV:
        """The entries of the tokens ``keep[i]`` (indices into reference i's cached tokens), per reference."""
        starts = [sum(self.counts[:i]) for i in range(len(self.counts))]
        device = next(iter(self.blocks.values()))[0].device if self.blocks else "cpu"
        index = torch.cat([s + idx.to(device) for s, idx in zip(starts, keep, strict=True)])
        blocks = {b: (k.index_select(2, index), v.index_select(2, index)) for b, (k, v) in self.blocks.items()}
        return ReferenceKV(blocks, tuple(int(i.numel()) for i in keep))


class CacheStore:
    """Least-recently-used store of ``ReferenceKV`` across sampling runs, bounded in entries and bytes.

    Entries live on the model's offload device (system memory for a GPU model): a hit copies them to the model's
    device for one run, so between runs the store holds no accelerator memory. Shared by every clone of the
    patched model (``copy.deepcopy`` returns the same store: ComfyUI deep-copies model options when it clones a
    model); keys name everything that shapes the references' keys/values (weights, patches, wrappers, attention
    override), so a clone with another patch never hits this one's entries. Each entry keeps the objects its key
    names alive, so their ``id`` cannot be reused by another object while the entry exists.
    """

    def __init__(self, max_entries: int = 8, max_mib: float = 1024.0, offload_device: str | torch.device = "cpu"):
        self.max_entries = max_entries
        self.max_bytes = int(max_mib * 2**20)
        self.offload_device = offload_device
        self._items: OrderedDict[tuple, tuple[ReferenceKV, tuple]] = OrderedDict()

    def __deepcopy__(self, memo) -> CacheStore:
        return self

    def get(self, key: tuple, device) -> ReferenceKV | None:
        """The entry of ``key`` on ``device``, or None."""
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0].to(device)

    def put(self, key: tuple, entry: ReferenceKV, keepalive: tuple = ()) -> None:
        if entry.nbytes > self.max_bytes:
            return  # larger than the whole store: used for this run only
        self._items[key] = (entry.to(self.offload_device), keepalive)
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries or self.nbytes > self.max_bytes:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()

    def entries(self) -> list[ReferenceKV]:
        """The stored entries, least recently used first."""
        return [entry for entry, _ in self._items.values()]

    def on_detach(self, _patcher, unpatch_all: bool = True, *_args, **_kwargs) -> None:
        """ComfyUI ``ON_DETACH`` callback: drop everything when the model is unloaded for good (``unpatch_all``);
        ComfyUI also detaches a loaded clone, keeping its weights, whenever another clone of the model loads."""
        if unpatch_all:
            self.clear()

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry, _ in self._items.values())

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


class JoinBuffer:
    """One key and one value buffer that every block of a run reuses to hold its keys/values followed by the
    cached ones: the memory of one block's joint keys/values, instead of one buffer per block kept alive between
    steps (or a fresh allocation per block)."""

    def __init__(self):
        self._buffers: list[torch.Tensor | None] = [None, None]

    def join(self, which: int, front: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
        """``cat((front, cached), dim=2)`` in buffer ``which`` (0 keys, 1 values); ``cached`` (1 or B rows)
        broadcasts over the batch."""
        n = front.shape[2]
        shape = (front.shape[0], front.shape[1], n + cached.shape[2], front.shape[3])
        buf = self._buffers[which]
        if buf is None or tuple(buf.shape) != shape or buf.dtype != front.dtype or buf.device != front.device:
            self._buffers[which] = None  # freed before the new one is allocated
            buf = self._buffers[which] = front.new_empty(shape)
        buf[:, :, :n].copy_(front)
        buf[:, :, n:].copy_(cached)
        return buf

    @staticmethod
    def nbytes(batch: int, tokens: int, hidden: int, element_size: int) -> int:
        """Bytes of both buffers for ``batch`` rows of ``tokens`` joint tokens of width ``hidden``."""
        return 2 * batch * tokens * hidden * element_size


class CacheAttention:
    """The attention override of ONE forward of a cached run (made per forward: no state shared between forwards
    or threads), counting the blocks it sees so the run can tell when blocks were called without it.

    - ``mode="record"``: store the last ``tail`` keys/values of each block (the reference tokens) in
      ``recorded``; with ``hide_front`` every other key is masked out, so the references attend only to
      references (the fill forward of ``reference_only``).
    - ``mode="append"``: append ``cached[block]`` to each block's keys/values (through ``join``).
    - ``mass`` (a per-token tensor or None): accumulate the attention that a sample of the target's queries
      (positions ``target`` = (start, stop) of the queries) gives each of the last ``mass.numel()`` keys.
    - ``mode=None``: pass through (measuring only, if ``mass`` is set).
    Another override that was set before this one (``previous``) still runs, on the extended keys/values.
    """

    def __init__(self, mode: str | None = None, *, tail: int = 0, hide_front: bool = False, cached: dict | None = None,
                 join: JoinBuffer | None = None, mass: torch.Tensor | None = None, target: tuple[int, int] = (0, 0)):
        self.previous = None
        self.mode = mode
        self.tail = tail
        self.hide_front = hide_front
        self.cached = cached or {}
        self.join = join
        self.mass = mass
        self.target = target
        self.recorded: dict = {}
        self.appended: set = set()
        self.measured: set = set()

    def __call__(self, func, q, k, v, heads, *rest, **kwargs):
        rest = list(rest)
        mask = rest.pop(0) if rest else kwargs.pop("mask", None)
        # (mask, attn_precision, skip_reshape, ...) is the attention functions' positional order
        skip_reshape = kwargs.get("skip_reshape", rest[1] if len(rest) > 1 else False)
        if not skip_reshape:
            raise RuntimeError("SparseContext: this ComfyUI calls attention in a layout the reference cache does not "
                               "know (expected (batch, heads, tokens, dim)); set Apply Sparse Context's cache to off.")
        options = kwargs.get("transformer_options") or {}
        block = (options.get("block_type"), options.get("block_index"))
        if self.mode == "record":
            start = k.shape[2] - self.tail
            self.recorded[block] = (k[:, :, start:].clone(), v[:, :, start:].clone())
            if self.hide_front:
                front = torch.zeros(k.shape[2], dtype=q.dtype, device=q.device)
                front[:start] = float("-inf")
                mask = _add_masks(mask, front.view(1, 1, 1, -1))
        elif self.mode == "append":
            if block not in self.cached:
                raise SparseContextBypassed(f"attention block {block} was not seen when the references' keys/values "
                                            "were recorded")
            ck, cv = self.cached[block]
            k, v = self.join.join(0, k, ck), self.join.join(1, v, cv)
            mask = _extend_mask(mask, ck.shape[2])
            self.appended.add(block)
        if self.mass is not None:
            self.mass += reference_attention_mass(q, k, self.target, self.mass.numel(), mask)
            self.measured.add(block)
        if self.previous is not None:
            return self.previous(func, q, k, v, heads, mask, *rest, **kwargs)
        return func(q, k, v, heads, mask, *rest, **kwargs)


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
        if mask.ndim == 3:  # (B, Lq, Lk), as Qwen-Image passes it: one mask for every head
            mask = mask.unsqueeze(1)
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
