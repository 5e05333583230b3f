"""The README tables of the natural experiment's results (the figure is ``sc_experiment.figure``)."""

from __future__ import annotations

TASK_ORDER = ("subject", "edit", "composition")
MODEL_TITLES = {"base": "base (untuned)", "lora": "drop-robust LoRA", "full_ft": "drop-robust full fine-tune"}


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
