"""A loss curve as a ComfyUI IMAGE (PIL, which ComfyUI ships; no plotting library)."""

from __future__ import annotations

import torch


def loss_curve_image(losses: list[float], width: int = 640, height: int = 320) -> torch.Tensor:
    """(1, height, width, 3) float image in [0, 1]: raw loss (light) and its running mean (dark), with
    the first/last smoothed values written in the corner."""
    import numpy as np
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    margin = 30
    values = [float(v) for v in losses if v == v]  # drop NaNs
    if len(values) >= 2:
        smooth, ema = [], values[0]
        for v in values:
            ema = 0.9 * ema + 0.1 * v
            smooth.append(ema)
        lo, hi = min(values), max(values)
        span = (hi - lo) or 1.0

        def xy(i: int, v: float) -> tuple[int, int]:
            x = margin + int(i / (len(values) - 1) * (width - 2 * margin))
            y = height - margin - int((v - lo) / span * (height - 2 * margin))
            return x, y

        draw.line([xy(i, v) for i, v in enumerate(values)], fill=(170, 190, 235), width=1)
        draw.line([xy(i, v) for i, v in enumerate(smooth)], fill=(20, 60, 170), width=2)
        draw.text((margin, 5), f"loss {smooth[0]:.4f} -> {smooth[-1]:.4f} ({len(values)} steps; "
                               f"min {lo:.4f}, max {hi:.4f})", fill="black")
    else:
        draw.text((margin, 5), f"{len(values)} step(s): nothing to plot", fill="black")
    draw.line([(margin, margin), (margin, height - margin), (width - margin, height - margin)], fill="black")
    array = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(array)[None]
