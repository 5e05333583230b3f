"""The results figure (PSNR against keep ratio per selector, per task and model) and the README table."""

from __future__ import annotations

from pathlib import Path


def make_figure(result: dict, path: str | Path) -> Path:
    """Write a PNG from the experiment's result dict (see ``run.py``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    task_names = sorted({r["task"] for r in rows}, key=["edit", "subject", "multi"].index)
    models = ["base", "lora"]
    selectors = [s for s in result["selectors"] if any(r["selector"] == s for r in rows)]
    defaults = result["default_selector"]
    cmap = plt.get_cmap("tab20")  # one colour per selector (up to 20)
    fig, axes = plt.subplots(len(models), len(task_names), figsize=(4.6 * len(task_names), 3.6 * len(models)),
                             squeeze=False, sharex=True)
    for j, task in enumerate(task_names):
        for i, model in enumerate(models):
            ax = axes[i][j]
            dense = next(r for r in rows if (r["task"], r["model"], r["selector"]) == (task, model, "dense"))
            ax.axhline(dense["psnr"], color="black", lw=1.2, ls="--", label="dense")
            ax.axhspan(dense["psnr"] - 0.5, dense["psnr"], color="black", alpha=0.06)
            for k, sel in enumerate(selectors):
                pts = sorted((r["keep_ratio"], r["psnr"]) for r in rows
                             if (r["task"], r["model"], r["selector"]) == (task, model, sel))
                if not pts:
                    continue
                pts.append((1.0, dense["psnr"]))
                xs, ys = zip(*sorted(pts), strict=True)
                bold = sel == defaults.get(task)
                ax.plot(xs, ys, marker="o", ms=3, lw=2.6 if bold else 1.0, color=cmap(k % 20),
                        label=sel + (" (default)" if bold else ""), zorder=3 if bold else 2)
            ax.set_xscale("log")
            ax.set_xticks([0.1, 0.25, 0.5, 1.0], ["0.1", "0.25", "0.5", "1"])
            ax.grid(alpha=0.3)
            ax.set_title(f"{task} - {'base' if model == 'base' else 'base + drop-robust LoRA'}", fontsize=10)
            if j == 0:
                ax.set_ylabel("PSNR (dB)")
            if i == len(models) - 1:
                ax.set_xlabel("reference keep ratio")
            ax.legend(fontsize=6.5, loc="lower right")
    fig.suptitle(f"Miniature replication ({result['model']['parameters'] / 1e6:.2f}M-param Flux, "
                 f"{'SMOKE ' if result['smoke'] else ''}held-out n={rows[0]['n']} per task)", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_table(result: dict) -> str:
    """The README table: per task and model, dense PSNR and the change (dB, paired with dense) at each
    keep ratio for the default selector, random, and the best selector at that ratio."""
    rows, defaults = result["results"], result["default_selector"]
    ratios = [r for r in result["config"]["ratios"] if r < 1.0]

    def cell(task: str, model: str, sel: str, ratio: float) -> float | None:
        row = next((r for r in rows if (r["task"], r["model"], r["selector"], r["keep_ratio"]) == (task, model, sel, ratio)), None)
        return None if row is None else row["psnr_minus_dense"]

    def deltas(task: str, model: str, sel: str) -> str:
        return " / ".join("-" if (d := cell(task, model, sel, k)) is None else f"{d:+.1f}" for k in ratios)

    keep = " / ".join(str(k) for k in ratios)
    out = [f"| task | model | dense | default selector, change at keep {keep} | random | best selector per keep ratio |",
           "|---|---|---|---|---|---|"]
    for task in ("edit", "subject", "multi"):
        for model in ("base", "lora"):
            dense = next((r for r in rows if (r["task"], r["model"], r["selector"]) == (task, model, "dense")), None)
            if dense is None:
                continue
            best = []
            for k in ratios:
                cands = [r for r in rows if (r["task"], r["model"], r["keep_ratio"]) == (task, model, k)]
                top = max(cands, key=lambda r: r["psnr"])
                best.append(f"{top['selector']} {top['psnr_minus_dense']:+.1f}")
            iou = f", IoU {dense['iou']:.2f}" if "iou" in dense else ""
            out.append(f"| {task} | {'base + LoRA' if model == 'lora' else 'base'} | {dense['psnr']:.1f} dB{iou} | "
                       f"{defaults[task]} {deltas(task, model, defaults[task])} | {deltas(task, model, 'random')} | "
                       f"{' / '.join(best)} |")
    return "\n".join(out)
