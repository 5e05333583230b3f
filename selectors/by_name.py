"""A selector by its name: the one place that wires a name ("edge", "mask", "edge+mask", ...) to its scoring call
and its default coverage floor, shared by the selector nodes, the experiments and the benchmarks."""

from __future__ import annotations

import torch

from .combine import combine_scores
from .coverage import grid_scores, random_scores
from .edges import edge_scores
from .masks import mask_scores
from .saliency import saliency_scores
from .tokens import token_grid_shape

SELECTOR_NAMES = ("random", "grid", "edge", "saliency", "mask")


def reference_scores(name: str, image: torch.Tensor | None = None, mask: torch.Tensor | None = None, *,
                     stride: int = 16, seed: int = 0, grid: tuple[int, int] | None = None,
                     by_part: dict[str, dict] | None = None, **options) -> torch.Tensor:
    """Score map (1, h, w) of one reference by the selector ``name``.

    ``image``: IMAGE (1, H, W, C) (edge, saliency; random and grid take only its token grid, or ``grid``);
    ``mask``: MASK (1, H, W) or (H, W) for "mask" (``image``, if given, sets its grid). ``options`` go to the
    scoring function (e.g. ``low_threshold`` for edge, ``blur_tokens`` for saliency, ``dilate_tokens`` for mask).
    A name joined with "+" (e.g. "edge+mask") is the mean of its parts' maps (``combine_scores``); ``by_part`` gives
    a part's options by its name (``{"mask": {"dilate_tokens": 1}}``), for a mix or a single name alike.
    """
    by_part = by_part or {}
    parts = name.split("+")
    if len(parts) > 1:
        if options:
            raise ValueError(f"selector {name!r}: pass a mix's options by part (by_part), got {sorted(options)}")
        return combine_scores([reference_scores(p, image, mask, stride=stride, seed=seed, grid=grid, by_part=by_part)
                               for p in parts])
    options = {**by_part.get(name, {}), **options}
    if name not in SELECTOR_NAMES:
        raise ValueError(f"selector: unknown name {name!r}; expected one of {SELECTOR_NAMES} or a '+' mix of them")
    if name == "mask":
        if mask is None:
            raise ValueError("selector 'mask': needs a mask")
        return mask_scores(mask, grid if image is None else None, image=image, stride=stride, **options)
    if name in ("edge", "saliency"):
        if image is None:
            raise ValueError(f"selector {name!r}: needs an image")
        return (edge_scores if name == "edge" else saliency_scores)(image, stride, **options)
    if grid is None:
        if image is None:
            raise ValueError(f"selector {name!r}: needs an image or a token grid")
        grid = token_grid_shape(int(image.shape[-3]), int(image.shape[-2]), stride)
    device = None if image is None else image.device
    if name == "random":
        return random_scores(1, grid, seed, device=device, **options)
    return grid_scores(grid, device=device, **options)


def default_coverage(name: str) -> float:
    """The recommended ``Budget.coverage`` of a selector (of a mix: the largest of its parts')."""
    from . import DEFAULT_COVERAGE

    return max(DEFAULT_COVERAGE.get(p, 0.0) for p in name.split("+"))
