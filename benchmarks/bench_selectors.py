"""Time each reference-token selector (score map + pick at ratio 0.25) on a 1024x1024 photograph.

Usage: python -P benchmarks/bench_selectors.py [--device cpu|cuda] [--runs 15] [--size 1024] [--json PATH]

The pack is imported as the package ``sparse_context`` straight from its folder; the repo root is
never put on sys.path (its ``selectors/`` would shadow the stdlib module; ``python -P`` keeps the
script's own folder off it as well).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))  # for packload only
from packload import load_pack  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--json", type=pathlib.Path, default=None)
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from skimage import data

    load_pack()
    from sparse_context.selectors import Budget, default_coverage, reference_scores, select, token_grid_shape

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("cuda requested but not available", file=sys.stderr)
        return 2
    n = args.size
    img = torch.from_numpy(data.astronaut()).float().div(255).permute(2, 0, 1)[None]
    img = F.interpolate(img, size=(n, n), mode="bicubic", align_corners=False).clamp(0, 1)
    img = img.permute(0, 2, 3, 1).contiguous().to(dev)
    mask = torch.zeros(1, n, n, device=dev)
    mask[:, n // 8 : n // 2, n // 4 : 3 * n // 4] = 1.0  # roughly the face and helmet
    grid = token_grid_shape(n, n)

    def case(name: str, budget: Budget | None = None, **options):
        """(scoring call, budget) of a selector by name, at ratio 0.25 with its default coverage floor."""
        budget = budget or Budget(mode="ratio", ratio=0.25, coverage=default_coverage(name))
        return lambda: reference_scores(name, img, mask, grid=grid, **options), budget

    cases = {
        "random": case("random", Budget(mode="ratio", ratio=0.25)),
        "grid": case("grid", Budget(mode="ratio", ratio=0.25)),
        "edge": case("edge"),
        "edge full-res canny": case("edge", px_per_token=None),
        "saliency": case("saliency"),
        "mask (dilate 1, feather 2)": case("mask", dilate_tokens=1, feather_tokens=2),
        "edge+saliency mix": case("edge+saliency"),
        "edge, adaptive budget": case("edge", Budget(mode="adaptive", coverage=0.25)),
    }

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    rows = []
    for name, (score, budget) in cases.items():

        def run(score=score, budget=budget):
            s = score()
            picks = select(s, budget)
            sync()
            return s, picks

        run()  # warm-up (kernels, caches)
        score_ms, total_ms = [], []
        for _ in range(args.runs):
            sync()
            t0 = time.perf_counter()
            s = score()
            sync()
            t1 = time.perf_counter()
            picks = select(s, budget)
            sync()
            t2 = time.perf_counter()
            score_ms.append((t1 - t0) * 1e3)
            total_ms.append((t2 - t0) * 1e3)
        rows.append(
            {
                "selector": name,
                "score_ms": statistics.median(score_ms),
                "pick_ms": statistics.median(total_ms) - statistics.median(score_ms),
                "total_ms": statistics.median(total_ms),
                "kept": int(picks[0].numel()),
                "tokens": grid[0] * grid[1],
            }
        )

    dev_name = (
        torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else f"{platform.processor() or 'cpu'} x{torch.get_num_threads()} threads"
    )
    print(f"selectors at {n}x{n} ({grid[0]}x{grid[1]} tokens), device {dev_name}, median of {args.runs} runs")
    print(f"{'selector':<28} {'score ms':>9} {'pick ms':>8} {'total ms':>9} {'kept':>11}")
    for r in rows:
        kept = f"{r['kept']:5d}/{r['tokens']}"
        print(f"{r['selector']:<28} {r['score_ms']:9.2f} {r['pick_ms']:8.2f} {r['total_ms']:9.2f} {kept:>11}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "size": n,
                    "grid": list(grid),
                    "device": dev_name,
                    "runs": args.runs,
                    "torch": torch.__version__,
                    "rows": rows,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
