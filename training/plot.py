"""Training curves as an image (PIL, which ComfyUI ships; no plotting library).

Top panel: the training loss per step (light) and its running mean (dark). Bottom panel, when validation
ran: PSNR of the one-step x0 estimate on the validation examples, dense (dark) and at the recommended keep
ratio (orange), per validation step.
"""

from __future__ import annotations

import math

import torch

LOSS_RAW, LOSS_MEAN = (170, 190, 235), (20, 60, 170)
DENSE, SPARSE = (40, 40, 40), (230, 120, 20)


def _panel(draw, box: tuple[int, int, int, int], series: list[tuple[list[float], list[float], tuple, int]],
           title: str, x_max: float) -> None:
    """Lines (xs, ys, colour, width) in ``box`` = (left, top, right, bottom), y range from the data."""
    left, top, right, bottom = box
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    draw.text((left, top - 14), title, fill="black")
    values = [y for _, ys, _, _ in series for y in ys if math.isfinite(y)]
    if not values:
        return
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    draw.text((right + 4, top - 5), f"{hi:.4g}", fill="black")
    draw.text((right + 4, bottom - 10), f"{lo:.4g}", fill="black")
    draw.text((right - 40, bottom + 3), f"step {x_max:g}", fill="black")

    def xy(x: float, y: float) -> tuple[int, int]:
        return (left + int(x / (x_max or 1.0) * (right - left)), bottom - int((y - lo) / span * (bottom - top)))

    for xs, ys, colour, width in series:
        points = [xy(x, y) for x, y in zip(xs, ys, strict=True) if math.isfinite(y)]
        if len(points) >= 2:
            draw.line(points, fill=colour, width=width)
        for p in points if len(points) < 8 else []:
            draw.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=colour)


def curves_image(losses: list[float], validation: list[dict] | None = None, width: int = 640):
    """A PIL image of the loss curve and, if given, the validation PSNR curves (records with ``step``,
    ``keep``, ``dense_psnr``, ``sparse_psnr`` as ``LoraTrainer.validate`` makes them)."""
    from PIL import Image, ImageDraw

    validation = validation or []
    panel, margin, gap = 170, 30, 50
    height = margin + panel + (gap + panel if validation else 0) + margin
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    right = width - 60
    steps = list(range(1, len(losses) + 1))
    smooth, ema = [], None
    for v in losses:
        ema = v if ema is None or not math.isfinite(ema) else 0.9 * ema + 0.1 * v
        smooth.append(ema)
    x_max = float(max([len(losses)] + [r["step"] for r in validation]))
    title = (f"training loss: {smooth[0]:.4f} -> {smooth[-1]:.4f} (running mean, {len(losses)} steps)" if losses
             else "training loss: no steps yet")
    _panel(draw, (margin, margin, right, margin + panel),
           [(steps, losses, LOSS_RAW, 1), (steps, smooth, LOSS_MEAN, 2)], title, x_max)
    if validation:
        top = margin + panel + gap
        xs = [float(r["step"]) for r in validation]
        last = validation[-1]
        title = (f"validation PSNR of the one-step x0 estimate (dB): dense {last['dense_psnr']:.2f}, "
                 f"keep {last['keep']:g} {last['sparse_psnr']:.2f}")
        _panel(draw, (margin, top, right, top + panel),
               [(xs, [r["dense_psnr"] for r in validation], DENSE, 2),
                (xs, [r["sparse_psnr"] for r in validation], SPARSE, 2)], title, x_max)
    return img


def image_tensor(img) -> torch.Tensor:
    """A PIL RGB image as a ComfyUI IMAGE: (1, H, W, 3) float in [0, 1]."""
    import numpy as np

    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)[None]
