"""Render docs/selectors.png: which tokens each selector keeps on one photograph at the same budget.

Usage: python -P benchmarks/make_selector_figure.py [--out docs/selectors.png] [--ratio 0.25]

Kept tokens are shown at full brightness, dropped ones dimmed to 25 %. The pack is imported as
``sparse_context`` from its folder (never via the repo root on sys.path).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))  # for packload only
from packload import load_pack  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    root = pathlib.Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, default=root / "docs" / "selectors.png")
    ap.add_argument("--ratio", type=float, default=0.25)
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch
    from skimage import data

    load_pack()
    from sparse_context.selectors import DEFAULT_COVERAGE, Budget, default_coverage, reference_scores, select

    a = data.astronaut()  # 512 x 512 -> 32 x 32 tokens of 16 px
    img = torch.from_numpy(a).float().div(255)[None]
    h, w = a.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    face = ((yy - 130) / 110) ** 2 + ((xx - 215) / 85) ** 2 <= 1  # the astronaut's face and helmet
    mask = torch.from_numpy(face.astype(np.float32))
    grid = (h // 16, w // 16)

    def panel(title: str, name: str, coverage: float | None = None, **options):
        """(title, scores, budget) of a selector by name; its default coverage floor unless ``coverage``."""
        cov = default_coverage(name) if coverage is None else coverage
        return title, reference_scores(name, img, mask, grid=grid, **options), Budget(ratio=args.ratio, coverage=cov)

    panels = [
        panel("random (training rule)", "random"),
        panel("grid (stratified dither)", "grid"),
        panel("edge, no coverage floor", "edge", 0.0),
        panel(f"edge + {DEFAULT_COVERAGE['edge']:.0%} coverage floor", "edge"),
        panel("saliency (spectral residual)", "saliency"),
        panel("mask (face), dilate 1", "mask", dilate_tokens=1),
        panel("mask outside (keep surroundings)", "mask", 0.0, inside=0.0, outside=1.0),
        panel("edge + saliency (mix)", "edge+saliency"),
    ]
    fig, axes = plt.subplots(3, 3, figsize=(12, 12.6))
    axes = axes.flatten()
    axes[0].imshow(a)
    axes[0].contour(face, levels=[0.5], colors="yellow", linewidths=1)
    axes[0].set_title("astronaut 512x512 (mask outlined)")
    for ax, (title, scores, budget) in zip(axes[1:], panels, strict=True):
        idx = select(scores, budget)[0]
        keep = np.zeros(grid[0] * grid[1], bool)
        keep[idx.numpy()] = True
        keep_px = np.kron(keep.reshape(grid), np.ones((16, 16), bool))[:h, :w]
        shown = a.astype(np.float32) / 255 * np.where(keep_px, 1.0, 0.25)[..., None]
        ax.imshow(shown)
        ax.set_title(f"{title}\n{idx.numel()}/{keep.size} tokens")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"Reference tokens kept at ratio {args.ratio} (bright = kept, dim = dropped; 16 px tokens)")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
