"""The results figure of both experiments: PSNR against the reference keep ratio, one line per selector, one panel
per task and model (the default selector bold, dense dashed, the classical baseline dotted where measured)."""

from __future__ import annotations

from pathlib import Path


def psnr_vs_keep(result: dict, path: str | Path, *, tasks: tuple[str, ...], model_titles: dict[str, str],
                 title: str, dpi: int = 100) -> Path:
    """Write the PNG of an experiment's result dict (rows with a ``mode`` other than "drop" are left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["results"] if r.get("mode", "drop") == "drop"]
    task_names = [t for t in tasks if any(r["task"] == t for r in rows)]
    models = [m for m in model_titles if any(r["model"] == m for r in rows)]
    selectors = list(result["selectors"]) + sorted({r["selector"] for r in rows} - set(result["selectors"]) - {"dense"})
    defaults = result["default_selector"]
    cmap = plt.get_cmap("tab20")  # one colour per selector (up to 20)
    fig, axes = plt.subplots(len(models), len(task_names), figsize=(4.6 * len(task_names), 3.5 * len(models)),
                             squeeze=False, sharex=True, sharey="col")
    for j, task in enumerate(task_names):
        for i, model in enumerate(models):
            ax = axes[i][j]
            dense = next(r for r in rows if (r["task"], r["model"], r["selector"]) == (task, model, "dense"))
            ax.axhline(dense["psnr"], color="black", lw=1.2, ls="--", label="dense")
            for k, sel in enumerate(selectors):
                pts = [(r["keep_ratio"], r["psnr"]) for r in rows
                       if (r["task"], r["model"], r["selector"]) == (task, model, sel)]
                if not pts:
                    continue
                xs, ys = zip(*sorted(pts + [(1.0, dense["psnr"])]), strict=True)
                bold = sel == defaults.get(task)
                ax.plot(xs, ys, marker="o", ms=3, lw=2.6 if bold else 1.0, color=cmap(k % 20),
                        label=sel + (" (default)" if bold else ""), zorder=3 if bold else 2)
            base = sorted((r["keep_ratio"], r["psnr"]) for r in rows
                          if (r["task"], r["model"], r["selector"]) == (task, "baseline", defaults.get(task)))
            if base:
                xs, ys = zip(*base, strict=True)
                ax.plot(xs, ys, color="gray", lw=2.0, ls=":", marker="s", ms=3, label="biharmonic baseline")
            ax.set_xscale("log")
            ax.set_xticks([0.1, 0.25, 0.5, 1.0], ["0.1", "0.25", "0.5", "1"])
            ax.grid(alpha=0.3)
            ax.set_title(f"{task} - {model_titles[model]}", fontsize=10)
            if j == 0:
                ax.set_ylabel("PSNR vs ground truth (dB)")
            if i == len(models) - 1:
                ax.set_xlabel("reference keep ratio")
            if i == 0 and j == 0:
                ax.legend(fontsize=6.5, loc="lower right")
    fig.suptitle(f"{title} ({result['model']['parameters'] / 1e6:.2f}M-param Flux, "
                 f"{'SMOKE ' if result['smoke'] else ''}held-out n={rows[0]['n']} per task)", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
