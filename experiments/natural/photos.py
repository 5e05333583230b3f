"""Real photographs that ship inside installed wheels (nothing is downloaded): scikit-image's bundled colour
images and scikit-learn's two sample images. Whole photos are held out for evaluation.

Each photo is kept as a small pyramid (downscaled x1.5 .. x4 with anti-aliasing) so that a 64 px crop shows a
scene at the scale a 1024 px reference shows it to a real model (one 4 px token ~ one 16 px FLUX token of a
1024 px picture, within a factor of a few).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

#: Training photos (skimage.data names; "china" is scikit-learn's). Every one is in the wheel itself.
TRAIN = ("astronaut", "chelsea", "china", "immunohistochemistry", "retina", "hubble_deep_field", "colorwheel")
#: Held out whole: no crop of these is ever trained on.
EVAL = ("coffee", "rocket", "flower")
SCALES = (1.5, 2.0, 3.0, 4.0)


def _load(name: str) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1]."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        img = load_sample_image(f"{name}.jpg")
    else:
        import skimage.data

        img = getattr(skimage.data, name)()
    return np.asarray(img, dtype=np.float32)[..., :3] / 255.0


@lru_cache(maxsize=None)
def pyramid(name: str) -> tuple[torch.Tensor, ...]:
    """The photo downscaled by each of ``SCALES``: (H_s, W_s, 3) tensors."""
    img = torch.from_numpy(_load(name)).permute(2, 0, 1)[None]
    h, w = img.shape[-2:]
    return tuple(torch.nn.functional.interpolate(img, size=(round(h / s), round(w / s)), mode="bilinear",
                                                 antialias=True, align_corners=False)[0].permute(1, 2, 0).clamp(0, 1)
                 for s in SCALES)


def crop(g: torch.Generator, names: tuple[str, ...], size: int, flip: bool = True) -> torch.Tensor:
    """A random (size, size, 3) crop of a random photo of ``names`` at a random pyramid level."""
    name = names[int(torch.randint(len(names), (1,), generator=g))]
    levels = pyramid(name)
    img = levels[int(torch.randint(len(levels), (1,), generator=g))]
    y = int(torch.randint(img.shape[0] - size + 1, (1,), generator=g))
    x = int(torch.randint(img.shape[1] - size + 1, (1,), generator=g))
    out = img[y:y + size, x:x + size]
    if flip and bool(torch.rand(1, generator=g) < 0.5):
        out = out.flip(1)
    return out.clone()
