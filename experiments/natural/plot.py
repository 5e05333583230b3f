"""The results figure (PSNR against keep ratio per selector, task and model, with the classical baseline) and
the README tables."""

from __future__ import annotations

from pathlib import Path

TASK_ORDER = ("subject", "edit", "composition")
MODEL_TITLES = {"base": "base (untuned)", "lora": "drop-robust LoRA", "full_ft": "drop-robust full fine-tune"}


def make_figure(result: dict, path: str | Path) -> Path:
    """Write a PNG from the experiment's result dict (see ``run.py``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["results"] if r.get("mode", "drop") == "drop"]
    task_names = [t for t in TASK_ORDER if any(r["task"] == t for r in rows)]
    models = [m for m in MODEL_TITLES if any(r["model"] == m for r in rows)]
    selectors = list(result["selectors"]) + [s for s in ("attention",) if any(r["selector"] == s for r in rows)]
    defaults = result["default_selector"]
    cmap = plt.get_cmap("tab10")
    fig, axes = plt.subplots(len(models), len(task_names), figsize=(4.6 * len(task_names), 3.5 * len(models)),
                             squeeze=False, sharex=True, sharey="col")
    for j, task in enumerate(task_names):
        for i, model in enumerate(models):
            ax = axes[i][j]
            dense = next(r for r in rows if (r["task"], r["model"], r["selector"]) == (task, model, "dense"))
            ax.axhline(dense["psnr"], color="black", lw=1.2, ls="--", label="dense")
            for k, sel in enumerate(selectors):
                pts = sorted((r["keep_ratio"], r["psnr"]) for r in rows
                             if (r["task"], r["model"], r["selector"]) == (task, model, sel))
                if not pts:
                    continue
                xs, ys = zip(*sorted(pts + [(1.0, dense["psnr"])]), strict=True)
                bold = sel == defaults.get(task)
                ax.plot(xs, ys, marker="o", ms=3, lw=2.6 if bold else 1.0, color=cmap(k % 10),
                        label=sel + (" (default)" if bold else ""), zorder=3 if bold else 2)
            base = sorted((r["keep_ratio"], r["psnr"]) for r in rows
                          if (r["task"], r["model"], r["selector"]) == (task, "baseline", defaults.get(task)))
            if base:
                xs, ys = zip(*base, strict=True)
                ax.plot(xs, ys, color="gray", lw=2.0, ls=":", marker="s", ms=3, label="biharmonic baseline")
            ax.set_xscale("log")
            ax.set_xticks([0.1, 0.25, 0.5, 1.0], ["0.1", "0.25", "0.5", "1"])
            ax.grid(alpha=0.3)
            ax.set_title(f"{task} - {MODEL_TITLES[model]}", fontsize=10)
            if j == 0:
                ax.set_ylabel("PSNR vs ground truth (dB)")
            if i == len(models) - 1:
                ax.set_xlabel("reference keep ratio")
            if i == 0 and j == 0:
                ax.legend(fontsize=6.5, loc="lower right")
    n = rows[0]["n"]
    fig.suptitle(f"Natural-image replication ({result['model']['parameters'] / 1e6:.2f}M-param Flux, "
                 f"{'SMOKE ' if result['smoke'] else ''}held-out photos, n={n} per task)", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _cell(rows, task, model, sel, ratio, mode="drop"):
    return next((r for r in rows if (r["task"], r["model"], r["selector"], r["keep_ratio"], r.get("mode", "drop"))
                 == (task, model, sel, ratio, mode)), None)


def markdown_table(result: dict) -> str:
    """Absolute PSNR (dB, +- s.e.m.) per task and model at each keep ratio: the default selector, random, the
    best selector, and the baseline on the default selector's tokens."""
    rows, defaults = result["results"], result["default_selector"]
    ratios = [r for r in result["config"]["ratios"] if r < 1.0]
    keep = " / ".join(str(k) for k in ratios)
    out = [f"| task | model | dense | default selector at keep {keep} | random | best selector |",
           "|---|---|---|---|---|---|"]
    for task in TASK_ORDER:
        sel = defaults.get(task)
        for model in ("baseline", *MODEL_TITLES):
            def fmt(s, m=model, t=task):
                cells = [_cell(rows, t, m, s, k) for k in ratios]
                return " / ".join("-" if c is None else f"{c['psnr']:.1f}" for c in cells)

            dense = _cell(rows, task, model, "dense", 1.0)
            if dense is None and model != "baseline":
                continue
            best = []
            for k in ratios:
                cands = [r for r in rows if (r["task"], r["model"], r["keep_ratio"]) == (task, model, k)
                         and r.get("mode", "drop") == "drop"]
                if cands:
                    top = max(cands, key=lambda r: r["psnr"])
                    best.append(f"{top['selector']} {top['psnr']:.1f}")
            name = "biharmonic baseline" if model == "baseline" else MODEL_TITLES[model]
            d = "exact" if dense is None else f"{dense['psnr']:.1f} +- {dense['psnr_sem']:.1f}"
            out.append(f"| {task} | {name} | {d} | {sel} {fmt(sel)} | {fmt('random')} | {' / '.join(best)} |")
    return "\n".join(out)


def extra_table(result: dict) -> str:
    """The attention rule and the reference-cache modes (default selector), PSNR change vs dense per keep ratio."""
    rows, defaults = result["results"], result["default_selector"]
    ratios = [r for r in result["config"]["ratios"] if r < 1.0]
    out = [f"| task | model | {' | '.join(['default selector'] + [n for n in ('attention', 'reference_only', 'first_step')])} |",
           "|---|---|---|---|---|---|"]
    for task in TASK_ORDER:
        for model in MODEL_TITLES:
            variants = [(defaults.get(task), "drop"), ("attention", "drop"), (defaults.get(task), "reference_only"),
                        (defaults.get(task), "first_step")]
            cells = []
            for sel, mode in variants:
                vals = [_cell(rows, task, model, sel, k, mode) for k in ratios]
                cells.append(" / ".join("-" if v is None else f"{v['psnr_minus_dense']:+.1f}" for v in vals))
            if any(c.strip("-/ ") for c in cells[1:]):
                out.append(f"| {task} | {MODEL_TITLES[model]} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def targets_table(result: dict) -> str:
    out = ["| target | task | model | value | met | detail |", "|---|---|---|---|---|---|"]
    for t in result["summary"]["targets"]:
        out.append(f"| {t['target']} | {t['task']} | {t['model']} | {t['value']:+.2f} | "
                   f"{'**met**' if t['met'] else 'missed'} | {t['detail']} |")
    return "\n".join(out)
