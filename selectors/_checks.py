"""Input validation shared by the selectors.

Every check raises ``ValueError`` whose message starts with the argument's name and says what was
expected, so a node can prefix its own name and show it to the user unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

_RANGE_TOL = 1e-3  # ComfyUI ops (resizers, blends) can overshoot [0, 1] by rounding; tolerate that


def describe(x: object) -> str:
    """Short description of a value for error messages (shape for tensors)."""
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)}"
    return f"{type(x).__name__} {x!r}"


def check_tensor(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {describe(x)}")
    if x.numel() == 0:
        raise ValueError(f"{name}: is empty ({describe(x)}); expected at least one element")
    if x.is_complex():
        raise ValueError(f"{name}: expected a real tensor, got dtype {x.dtype}")
    return x


def check_finite(x: torch.Tensor, name: str) -> None:
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: contains NaN or infinite values; expected finite numbers")


def check_stride(stride: object) -> int:
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 2 or stride % 2:
        raise ValueError(f"stride: expected an even int >= 2 (pixels per token, 16 for Flux/Qwen), got {stride!r}")
    return stride


def check_grid(grid: object, name: str = "grid") -> tuple[int, int]:
    """Validate a token grid ``(h_tok, w_tok)`` of two positive ints."""
    if (
        not isinstance(grid, Sequence)
        or len(grid) != 2
        or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grid)
    ):
        raise ValueError(f"{name}: expected (h_tok, w_tok), two ints >= 1, got {grid!r}")
    return int(grid[0]), int(grid[1])


def check_unit(value: object, name: str, *, low_open: bool = False, high_open: bool = False) -> float:
    """A float in [0, 1] (open ends as asked)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
    if not ok:
        lo, hi = "(0" if low_open else "[0", "1)" if high_open else "1]"
        raise ValueError(f"{name}: expected a number in {lo}, {hi}, got {value!r}")
    return float(value)


def check_nonneg(value: object, name: str, *, integer: bool = False) -> float:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: expected a finite {'int' if integer else 'number'} >= 0, got {value!r}")
    return value


def as_image(image: object, name: str = "image") -> torch.Tensor:
    """Validate a ComfyUI IMAGE and return it as float (B, H, W, C) clamped to [0, 1].

    C may be 1, 3 or 4 (alpha is dropped by the callers that convert to grey). Values slightly
    outside [0, 1] (rounding in upstream ops) are clamped; NaN/inf raise.
    """
    x = check_tensor(image, name)
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{name}: expected a ComfyUI IMAGE of shape (B, H, W, C) with C in 1/3/4, got {describe(x)}")
    x = x.float()
    check_finite(x, name)
    return x.clamp(0.0, 1.0)


def as_mask(mask: object, name: str = "mask") -> torch.Tensor:
    """Validate a ComfyUI MASK ((B, H, W) or (H, W)) and return float (B, H, W) in [0, 1].

    Raises on NaN/inf and on values outside [0, 1] by more than a rounding tolerance (a 0..255
    mask is a mistake worth reporting, not silently clamping).
    """
    x = check_tensor(mask, name)
    if x.ndim == 2:
        x = x.unsqueeze(0)
    if x.ndim != 3:
        raise ValueError(f"{name}: expected a MASK of shape (B, H, W) or (H, W), got {describe(x)}")
    x = x.float()
    check_finite(x, name)
    lo, hi = float(x.min()), float(x.max())
    if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
        raise ValueError(f"{name}: values must lie in [0, 1], got min {lo:.4g} and max {hi:.4g}")
    return x.clamp(0.0, 1.0)


def as_scores(scores: object, name: str = "scores", *, ranks: tuple[int, ...] = (2, 3)) -> torch.Tensor:
    """Validate a score map of the given ranks ((h, w) and/or (B, h, w)); finite, returned as float."""
    x = check_tensor(scores, name)
    if x.ndim not in ranks:
        want = " or ".join({2: "(h, w)", 3: "(B, h, w)"}[r] for r in ranks)
        raise ValueError(f"{name}: expected a score map of shape {want}, got {describe(x)}")
    if not x.is_floating_point():
        x = x.float()
    check_finite(x, name)
    return x
