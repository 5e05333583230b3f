"""One result row per configuration: the mean and standard error of each metric over the held-out items, and
the change against the same model's dense output on the same items and noise (a much tighter paired estimate)."""

from __future__ import annotations


def mean_sem(values: list[float]) -> tuple[float, float]:
    """(mean, standard error of the mean), rounded to 4 places; the error is 0 for a single value."""
    import torch

    v = torch.tensor(values, dtype=torch.float64)
    return round(float(v.mean()), 4), round(float(v.std() / len(v) ** 0.5), 4) if len(v) > 1 else 0.0


def result_row(key: dict, per_item: list[dict], dense_items: list[dict] | None = None,
               paired: tuple[str, ...] = ("psnr", "ssim"), **extra) -> dict:
    """``key`` (task, model, selector, keep ratio, ...) + ``n``, each metric of ``per_item`` as ``<k>`` and ``<k>_sem``
    and, given the dense items, each ``paired`` metric's change as ``<k>_minus_dense`` (+ ``_sem``); then ``extra``."""
    row = {**key, "n": len(per_item)}
    for k in per_item[0]:
        row[k], row[f"{k}_sem"] = mean_sem([r[k] for r in per_item])
    if dense_items is not None:
        for k in paired:
            row[f"{k}_minus_dense"], row[f"{k}_minus_dense_sem"] = mean_sem(
                [a[k] - b[k] for a, b in zip(per_item, dense_items, strict=True)])
    row.update(extra)
    return row


def patch_fields(seconds: list[float], report: dict | None) -> dict:
    """The median seconds per step and, from the patch's report of the first item, what it kept."""
    import statistics

    out: dict = {"sec_per_step": round(statistics.median(seconds), 5)}
    if report is not None:
        out.update(kept_tokens_first_item=[r["kept"] for r in report["references"]],
                   tokens_first_item=[r["tokens"] for r in report["references"]],
                   attention_work_ratio_first_item=round(report["attention_work_ratio"], 4))
    return out
