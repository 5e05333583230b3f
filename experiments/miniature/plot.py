"""The README table of the miniature's results (the figure is ``sc_experiment.figure``)."""

from __future__ import annotations

MODEL_TITLES = {"base": "base", "lora": "base + drop-robust LoRA"}


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
