"""Reference-conditioned tasks on real photographs, shaped like the real ones (seeded, pure torch).

* ``subject``: the target is the reference's content under a global change the condition names: a colour
  grade (warm, cool, grayscale, sepia, contrast), a shift (the picture moved right or down by 8 px, the
  uncovered border mid-gray) or a zoom crop (the centre 32 px of the reference: the output latent is half the
  size, as a user picks a smaller output). Reference mask = the part of the reference that reaches the target.
* ``edit`` (spatially aligned editing): the condition names a region (the bright or the dark tokens: mean luma
  of the 4 px token above 0.55 / below 0.35) and a change (grayscale, invert, red tint, blue tint); inside the
  region the change, everything else copied. Reference mask = the region (what a user would paint).
* ``composition``: 2-3 references of 32 px, arranged in the 64 px target where ComfyUI's "offset" method lays
  out their tokens (reference 1 top left, 2 bottom left, 3 top right), the rest filled with the background
  colour the condition names. A fourth 32 px reference would be laid out below the target's grid.

Every change is exact and applied by ``Item.apply(refs)``: the classical baseline applies it to inpainted
references. Moves are constant token offsets (what RoPE attention can express); a position-dependent move
(a real 2x zoom) is out of reach of a model this size trained in minutes (the miniature's first tasks: IoU 0.1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import photos

SIZE = 64
TASKS = ("subject", "edit", "composition")
CELL = 4  # px per token (the miniature's encoding)
SUBJECT_CHANGES = ("warm", "cool", "gray", "sepia", "contrast", "shift_right", "shift_down", "zoom_crop")
EDIT_REGIONS = ("bright", "dark")
EDIT_CHANGES = ("gray", "invert", "tint_red", "tint_blue")
COMP_REF, COMP_OFFSETS = 32, ((0, 0), (32, 0), (0, 32))
BACKGROUNDS = torch.tensor([[0.92, 0.92, 0.88], [0.20, 0.20, 0.24], [0.72, 0.82, 0.95], [0.95, 0.84, 0.72],
                            [0.78, 0.93, 0.78], [0.50, 0.50, 0.50]])
SHIFT_PX, ZOOM_PX = 8, 32
TEXT_TOKENS, TEXT_DIM, CODE_DIM = 4, 16, 8
POOLED_DIM = 3 * CODE_DIM
_LUMA = torch.tensor([0.299, 0.587, 0.114])


@dataclass
class Item:
    """One example: references (1, H, W, 3), the exact change, and what the selectors and metrics need."""

    task: str
    change: str
    refs: list[torch.Tensor]
    apply: Callable[[list[torch.Tensor]], torch.Tensor] = field(repr=False)  # refs (1,H,W,3) -> target (1,h,w,3)
    context: torch.Tensor  # (1, TEXT_TOKENS, TEXT_DIM)
    pooled: torch.Tensor  # (1, POOLED_DIM)
    ref_masks: list[torch.Tensor]  # per reference (1, H, W) in {0, 1}

    @property
    def target(self) -> torch.Tensor:
        return self.apply(self.refs)


@dataclass
class Batch:
    """A training batch of one task and one target size."""

    refs: list[torch.Tensor]  # per reference (B, H, W, 3)
    target: torch.Tensor  # (B, h, w, 3)
    context: torch.Tensor
    pooled: torch.Tensor


def _luma(x: torch.Tensor) -> torch.Tensor:
    return (x * _LUMA).sum(-1, keepdim=True)


def grade(x: torch.Tensor, name: str) -> torch.Tensor:
    """A per-pixel colour change (..., 3) -> (..., 3) in [0, 1]."""
    if name == "warm":
        y = x * torch.tensor([1.12, 1.0, 0.8]) + torch.tensor([0.04, 0.02, 0.0])
    elif name == "cool":
        y = x * torch.tensor([0.82, 1.0, 1.12]) + torch.tensor([0.0, 0.02, 0.05])
    elif name == "gray":
        y = _luma(x).expand_as(x)
    elif name == "sepia":
        y = x @ torch.tensor([[0.393, 0.349, 0.272], [0.769, 0.686, 0.534], [0.189, 0.168, 0.131]])
    elif name == "contrast":
        y = 0.5 + 1.6 * (x - 0.5)
    elif name == "invert":
        y = 1 - x
    elif name == "tint_red":
        y = x * torch.tensor([0.7, 0.45, 0.45]) + torch.tensor([0.3, 0.0, 0.0])
    elif name == "tint_blue":
        y = x * torch.tensor([0.45, 0.5, 0.7]) + torch.tensor([0.0, 0.05, 0.3])
    else:
        raise ValueError(f"unknown colour change {name!r}")
    return y.clamp(0, 1)


def subject_change(x: torch.Tensor, name: str) -> torch.Tensor:
    """(B, 64, 64, 3) -> the subject target (B, 64, 64, 3), or (B, 32, 32, 3) for the zoom crop."""
    if name == "shift_right":
        out = torch.full_like(x, 0.5)
        out[:, :, SHIFT_PX:] = x[:, :, :-SHIFT_PX]
        return out
    if name == "shift_down":
        out = torch.full_like(x, 0.5)
        out[:, SHIFT_PX:] = x[:, :-SHIFT_PX]
        return out
    if name == "zoom_crop":
        lo = (SIZE - ZOOM_PX) // 2
        return x[:, lo:lo + ZOOM_PX, lo:lo + ZOOM_PX].clone()
    return grade(x, name)


def region_mask(x: torch.Tensor, region: str) -> torch.Tensor:
    """(B, H, W, 3) -> (B, H, W) {0, 1}: the tokens whose mean luma is bright (> 0.55) or dark (< 0.35)."""
    b, h, w, _ = x.shape
    luma = _luma(x)[..., 0].reshape(b, h // CELL, CELL, w // CELL, CELL).mean((2, 4))
    tok = luma > 0.55 if region == "bright" else luma < 0.35
    return tok.float().repeat_interleave(CELL, 1).repeat_interleave(CELL, 2)


def edit_change(x: torch.Tensor, region: str, change: str) -> torch.Tensor:
    m = region_mask(x, region).unsqueeze(-1)
    return m * grade(x, change) + (1 - m) * x


def compose(refs: list[torch.Tensor], background: torch.Tensor) -> torch.Tensor:
    """References (B, 32, 32, 3) -> (B, 64, 64, 3) in the "offset" layout on ``background`` (B, 3)."""
    out = background.view(-1, 1, 1, 3).repeat(1, SIZE, SIZE, 1)
    for ref, (dy, dx) in zip(refs, COMP_OFFSETS, strict=False):
        out[:, dy:dy + COMP_REF, dx:dx + COMP_REF] = ref
    return out


def _one_hot(value: int, dim: int) -> torch.Tensor:
    v = torch.zeros(dim)
    v[value] = 1.0
    return v


def conditioning(task: str, fields: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Text tokens (1, TEXT_TOKENS, TEXT_DIM): the task, then one one-hot token per field; pooled (1, POOLED_DIM):
    the same codes, so every block's adaLN modulation sees them (as in the miniature)."""
    tokens = [_one_hot(TASKS.index(task), TEXT_DIM)] + [_one_hot(f, TEXT_DIM) for f in fields]
    tokens += [torch.zeros(TEXT_DIM)] * (TEXT_TOKENS - len(tokens))
    codes = [_one_hot(TASKS.index(task), CODE_DIM)] + [_one_hot(f, CODE_DIM) for f in fields[:2]]
    codes += [torch.zeros(CODE_DIM)] * (3 - len(codes))
    return torch.stack(tokens)[None], torch.cat(codes)[None]


def _int(g: torch.Generator, n: int) -> int:
    return int(torch.randint(n, (1,), generator=g))


def make_item(task: str, g: torch.Generator, names: tuple[str, ...], change: str | None = None,
              n_refs: int | None = None) -> Item:
    """One item of ``task`` from crops of the photos ``names``; ``change`` / ``n_refs`` fixed or drawn."""
    if task == "subject":
        change = change or SUBJECT_CHANGES[_int(g, len(SUBJECT_CHANGES))]
        ref = photos.crop(g, names, SIZE)[None]
        mask = torch.ones(1, SIZE, SIZE)
        if change == "zoom_crop":
            mask.zero_()
            lo = (SIZE - ZOOM_PX) // 2
            mask[:, lo:lo + ZOOM_PX, lo:lo + ZOOM_PX] = 1
        elif change == "shift_right":
            mask[:, :, SIZE - SHIFT_PX:] = 0
        elif change == "shift_down":
            mask[:, SIZE - SHIFT_PX:] = 0
        context, pooled = conditioning(task, [SUBJECT_CHANGES.index(change)])
        return Item(task, change, [ref], lambda refs, c=change: subject_change(refs[0], c), context, pooled, [mask])
    if task == "edit":
        region = EDIT_REGIONS[_int(g, len(EDIT_REGIONS))]
        change = change or EDIT_CHANGES[_int(g, len(EDIT_CHANGES))]
        for _ in range(30):  # a region of 10-60 % of the picture (what a user would edit)
            ref = photos.crop(g, names, SIZE)[None]
            mask = region_mask(ref, region)
            if 0.1 <= float(mask.mean()) <= 0.6:
                break
        context, pooled = conditioning(task, [EDIT_REGIONS.index(region), EDIT_CHANGES.index(change)])
        return Item(task, f"{region}:{change}", [ref], lambda refs, r=region, c=change: edit_change(refs[0], r, c),
                    context, pooled, [mask])
    if task == "composition":
        n = n_refs or 2 + _int(g, 2)
        refs = [photos.crop(g, names, COMP_REF)[None] for _ in range(n)]
        bg = _int(g, len(BACKGROUNDS))
        context, pooled = conditioning(task, [n, bg])
        return Item(task, f"{n}_refs", refs, lambda rs, b=bg: compose(rs, BACKGROUNDS[b][None]), context, pooled,
                    [torch.ones(1, COMP_REF, COMP_REF) for _ in refs])
    raise ValueError(f"task: expected one of {TASKS}, got {task!r}")


def make_batch(task: str, batch: int, seed: int, names: tuple[str, ...] = photos.TRAIN) -> Batch:
    """A seeded training batch: one target size and reference count per batch (zoom crops and the number of
    composed references are drawn once per batch)."""
    g = torch.Generator().manual_seed(seed)
    fixed_change = fixed_refs = None
    if task == "subject":
        zoom = _int(g, len(SUBJECT_CHANGES)) == len(SUBJECT_CHANGES) - 1
        changes = SUBJECT_CHANGES[-1:] if zoom else SUBJECT_CHANGES[:-1]
    elif task == "composition":
        fixed_refs = 2 + _int(g, 2)
    items = []
    for _ in range(batch):
        if task == "subject":
            fixed_change = changes[_int(g, len(changes))]
        items.append(make_item(task, g, names, change=fixed_change, n_refs=fixed_refs))
    return Batch([torch.cat([it.refs[k] for it in items]) for k in range(len(items[0].refs))],
                 torch.cat([it.target for it in items]), torch.cat([it.context for it in items]),
                 torch.cat([it.pooled for it in items]))


def eval_items(task: str, n: int, seed: int) -> list[Item]:
    """Held-out items: crops of the ``photos.EVAL`` photos only; changes and reference counts cycle evenly."""
    g = torch.Generator().manual_seed(seed + 7919 * TASKS.index(task))
    out = []
    for i in range(n):
        if task == "subject":
            out.append(make_item(task, g, photos.EVAL, change=SUBJECT_CHANGES[i % len(SUBJECT_CHANGES)]))
        elif task == "edit":
            out.append(make_item(task, g, photos.EVAL, change=EDIT_CHANGES[i % len(EDIT_CHANGES)]))
        else:
            out.append(make_item(task, g, photos.EVAL, n_refs=2 + i % 2))
    return out
