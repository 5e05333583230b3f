"""The three generated tasks (seeded, pure torch): what the miniature model is trained and judged on.

Every batch is a ``TaskBatch``: reference IMAGEs (B, H, W, 3) in [0, 1], the target IMAGE
(B, 64, 64, 3), the "text" conditioning (a few one-hot tokens (B, 4, 16) and a pooled vector
(B, 24): the codes again) and masks for the mask selector and the metrics.

* ``edit`` (spatially aligned editing): 3-5 flat shapes on a shaded background; the condition names a
  source and a destination colour; the target is the reference with every source-coloured shape
  recoloured. Reference mask = the shapes to recolour (what a user would paint).
* ``subject`` (subject-driven generation): a patterned 24 px object somewhere on a cluttered, shaded
  reference; the target shows the same object, pixel for pixel and where it was, on a new plain background
  of the condition's colour (the clutter must go). Reference mask = the object.
* ``multi`` (multi-reference composition): 2-3 references of 32 px, each with a 20 px object on clutter;
  the target composes every object, unchanged, on a plain background of the condition's colour, in the
  quadrant where ComfyUI's "offset" method lays that reference's tokens out (reference 1 top left,
  2 bottom left, 3 top right). A 4th 32 px reference would be laid out below the 64 px target's grid.

Every task is spatially aligned with its references' token positions: a target token copies (or
recolours) the reference token with its own spatial id. A model of this size learns that in minutes on
a CPU; moving content to a place the condition names (relative attention offsets) it did not learn in
the 30-minute budget (first version of this file: object IoU 0.1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SIZE = 64
TASKS = ("edit", "subject", "multi")
PALETTE = torch.tensor([
    [0.90, 0.10, 0.10], [0.10, 0.75, 0.15], [0.10, 0.25, 0.90], [0.95, 0.85, 0.10],
    [0.85, 0.15, 0.80], [0.10, 0.80, 0.85], [0.95, 0.50, 0.05], [0.45, 0.15, 0.60],
])
BACKGROUNDS = torch.tensor([
    [0.92, 0.92, 0.88], [0.20, 0.20, 0.24], [0.72, 0.82, 0.95], [0.95, 0.84, 0.72],
    [0.78, 0.93, 0.78], [0.50, 0.50, 0.50],
])
#: Shapes and objects are drawn on the model's 4 px token grid (``encoding.PX_PER_TOKEN``), so a shape's
#: token is one colour and its edit is one decision per token. With pixel-precise outlines the recolouring
#: had to be decided per pixel inside a token: 20.6 dB after 1800 edit-only steps, far from this budget's reach.
CELL = 4
SUBJECT_SPRITE = 24
MULTI_REF, MULTI_SPRITE, MULTI_MAX_REFS = 32, 20, 3
#: pixel offset of reference k's tokens under ComfyUI's "offset" method (Flux._forward: each next
#: reference goes below or to the right, whichever keeps the layout squarer)
MULTI_OFFSETS = ((0, 0), (MULTI_REF, 0), (0, MULTI_REF))
TEXT_TOKENS, TEXT_DIM, CODE_DIM = 4, 16, 8
POOLED_DIM = 3 * CODE_DIM  # task, field 1, field 2 (one-hot each)


@dataclass
class TaskBatch:
    task: str
    refs: list[torch.Tensor]  # per reference (B, H, W, 3) in [0, 1]
    target: torch.Tensor  # (B, 64, 64, 3)
    context: torch.Tensor  # (B, TEXT_TOKENS, TEXT_DIM)
    pooled: torch.Tensor  # (B, POOLED_DIM)
    ref_masks: list[torch.Tensor]  # per reference (B, H, W) in {0, 1}
    target_mask: torch.Tensor  # (B, 64, 64): recoloured region (edit) or where the objects belong
    background: torch.Tensor  # (B, 3) plain target background (subject / multi), zeros for edit

    def item(self, i: int) -> TaskBatch:
        """Batch item ``i`` as a batch of one."""
        s = slice(i, i + 1)
        return TaskBatch(self.task, [r[s] for r in self.refs], self.target[s], self.context[s], self.pooled[s],
                         [m[s] for m in self.ref_masks], self.target_mask[s], self.background[s])


def _rand(g: torch.Generator, *shape) -> torch.Tensor:
    return torch.rand(shape, generator=g)


def _int(g: torch.Generator, lo: int, hi: int) -> int:
    """Uniform int in [lo, hi)."""
    return int(torch.randint(lo, hi, (1,), generator=g))


def _shape_mask(g: torch.Generator, size: int, y0: float, x0: float, h: float, w: float, kind: int) -> torch.Tensor:
    """(size, size) bool: a rectangle (0), ellipse (1) or triangle (2) in the box (y0, x0, h, w)."""
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    v, u = (yy - y0) / h, (xx - x0) / w  # box coordinates in [0, 1]
    inside = (v >= 0) & (v < 1) & (u >= 0) & (u < 1)
    if kind == 1:
        return (v - 0.5) ** 2 + (u - 0.5) ** 2 < 0.25
    if kind == 2:
        return inside & ((u - 0.5).abs() <= 0.5 * v)
    return inside


def _on_grid(x: torch.Tensor) -> torch.Tensor:
    """(h, w, ...) on the token grid -> (CELL h, CELL w, ...) pixels (nearest)."""
    return x.repeat_interleave(CELL, 0).repeat_interleave(CELL, 1)


def _background(g: torch.Generator, size: int, colour: torch.Tensor, clutter: int) -> torch.Tensor:
    """(size, size, 3): a colour with a soft linear shade and ``clutter`` faint rectangles."""
    yy, xx = torch.meshgrid(torch.linspace(-0.5, 0.5, size), torch.linspace(-0.5, 0.5, size), indexing="ij")
    angle = float(_rand(g, 1)) * 6.2832
    ramp = 0.15 * (yy * torch.sin(torch.tensor(angle)) + xx * torch.cos(torch.tensor(angle)))
    img = (colour.view(1, 1, 3) + ramp.unsqueeze(-1)).clone()
    for _ in range(clutter):
        h, w = _int(g, 4, size // 2), _int(g, 4, size // 2)
        m = _shape_mask(g, size, _int(g, 0, size - h), _int(g, 0, size - w), h, w, 0)
        img[m] = img[m] + (_rand(g, 3) - 0.5) * 0.25
    return img.clamp(0, 1)


def _sprite(g: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A patterned object on the token grid: (size, size, 3) colours and its (size, size) bool silhouette."""
    n = size // CELL
    sil = torch.zeros(n, n, dtype=torch.bool)
    for _ in range(_int(g, 2, 4)):
        h, w = _int(g, n // 2, n + 1), _int(g, n // 2, n + 1)
        sil |= _shape_mask(g, n, _int(g, 0, n - h + 1), _int(g, 0, n - w + 1), h, w, _int(g, 0, 2))
    c1, c2 = PALETTE[torch.randperm(len(PALETTE), generator=g)[:2]]
    yy, xx = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    period = _int(g, 1, 3)
    kind = _int(g, 0, 3)
    pattern = [(yy // period) % 2, (xx // period) % 2, ((yy // period) + (xx // period)) % 2][kind].bool()
    colours = torch.where(pattern.unsqueeze(-1), c1, c2)
    return _on_grid(colours), _on_grid(sil)


def _one_hot(value: int, dim: int = TEXT_DIM) -> torch.Tensor:
    v = torch.zeros(dim)
    v[value] = 1.0
    return v


def _conditioning(task: str, fields: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Text tokens (TEXT_TOKENS, TEXT_DIM): the task, then one one-hot token per field; pooled (POOLED_DIM,):
    the task and the first two fields again, so the adaLN modulation of every block sees them too (the
    edit's colours through attention to two text tokens alone were learned too slowly)."""
    t = TASKS.index(task)
    tokens = [_one_hot(t)] + [_one_hot(f) for f in fields]
    tokens += [torch.zeros(TEXT_DIM)] * (TEXT_TOKENS - len(tokens))
    codes = [_one_hot(t, CODE_DIM)] + [_one_hot(f, CODE_DIM) for f in fields[:2]]
    codes += [torch.zeros(CODE_DIM)] * (3 - len(codes))
    return torch.stack(tokens), torch.cat(codes)


def _edit_item(g: torch.Generator):
    ref = _background(g, SIZE, BACKGROUNDS[_int(g, 0, len(BACKGROUNDS))], clutter=0)
    n = SIZE // CELL
    labels = torch.full((n, n), -1)
    for _ in range(_int(g, 3, 6)):
        h, w = _int(g, 3, 7), _int(g, 3, 7)
        m = _shape_mask(g, n, _int(g, 0, n - h + 1), _int(g, 0, n - w + 1), h, w, _int(g, 0, 3))
        labels[m] = _int(g, 0, len(PALETTE))
    labels = _on_grid(labels)
    present = labels[labels >= 0].unique()
    src = int(present[_int(g, 0, len(present))])
    dst = (src + _int(g, 1, len(PALETTE))) % len(PALETTE)
    ref[labels >= 0] = PALETTE[labels[labels >= 0]]
    target = ref.clone()
    edit = labels == src
    target[edit] = PALETTE[dst]
    context, pooled = _conditioning("edit", [src, dst])
    return [ref], target, context, pooled, [edit.float()], edit.float(), torch.zeros(3)


def _placed(canvas: torch.Tensor, mask: torch.Tensor, sprite: tuple, y: int, x: int) -> None:
    colours, sil = sprite
    s = sil.shape[0]
    canvas[y:y + s, x:x + s][sil] = colours[sil]
    mask[y:y + s, x:x + s][sil] = 1.0


def _subject_like(g: torch.Generator, task: str, n_refs: int):
    ref_size, sprite_size = (SIZE, SUBJECT_SPRITE) if task == "subject" else (MULTI_REF, MULTI_SPRITE)
    bg_id = _int(g, 0, len(BACKGROUNDS))
    target = BACKGROUNDS[bg_id].view(1, 1, 3).repeat(SIZE, SIZE, 1)
    target_mask = torch.zeros(SIZE, SIZE)
    refs, ref_masks = [], []
    for k in range(n_refs):
        sprite = _sprite(g, sprite_size)
        ref = _background(g, ref_size, BACKGROUNDS[_int(g, 0, len(BACKGROUNDS))], clutter=ref_size // 8)
        ref_mask = torch.zeros(ref_size, ref_size)
        y, x = (CELL * _int(g, 0, (ref_size - sprite_size) // CELL + 1) for _ in range(2))
        _placed(ref, ref_mask, sprite, y, x)
        refs.append(ref)
        ref_masks.append(ref_mask)
        dy, dx = MULTI_OFFSETS[k] if task == "multi" else (0, 0)
        _placed(target, target_mask, sprite, y + dy, x + dx)
    fields = [bg_id] + ([n_refs] if task == "multi" else [])
    context, pooled = _conditioning(task, fields)
    return refs, target, context, pooled, ref_masks, target_mask, BACKGROUNDS[bg_id]


def make_batch(task: str, batch: int, seed: int, n_refs: int | None = None) -> TaskBatch:
    """A seeded batch of ``task``; ``multi`` uses ``n_refs`` references (default: drawn in 2..3)."""
    if task not in TASKS:
        raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
    if task == "multi" and n_refs is not None and not 2 <= n_refs <= MULTI_MAX_REFS:
        raise ValueError(f"n_refs: the multi task has 2 to {MULTI_MAX_REFS} references, got {n_refs}")
    g = torch.Generator().manual_seed(seed)
    if task == "multi" and n_refs is None:
        n_refs = _int(g, 2, MULTI_MAX_REFS + 1)
    items = []
    for _ in range(batch):
        if task == "edit":
            items.append(_edit_item(g))
        else:
            items.append(_subject_like(g, task, 1 if task == "subject" else n_refs))
    refs = [torch.stack([it[0][k] for it in items]) for k in range(len(items[0][0]))]
    masks = [torch.stack([it[4][k] for it in items]) for k in range(len(items[0][4]))]
    return TaskBatch(task, refs, torch.stack([it[1] for it in items]), torch.stack([it[2] for it in items]),
                     torch.stack([it[3] for it in items]), masks, torch.stack([it[5] for it in items]),
                     torch.stack([it[6] for it in items]))
