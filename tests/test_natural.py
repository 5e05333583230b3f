"""The natural-image replication (experiments/natural): tasks on real photographs with whole photos held out,
the classical baseline on the patch's own selections, and the whole pipeline (``run.py --smoke``)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def nat():
    from packload import load_experiment

    return load_experiment("natural")


def test_photos_ship_in_wheels_and_whole_photos_are_held_out(nat, monkeypatch):
    from sc_natural import photos, tasks

    assert not set(photos.TRAIN) & set(photos.EVAL)
    for name in photos.TRAIN + photos.EVAL:
        level = photos.pyramid(name)[0]
        assert level.ndim == 3 and level.shape[-1] == 3 and min(level.shape[:2]) >= 64, name
    used: list[tuple[str, ...]] = []
    real_crop = photos.crop
    monkeypatch.setattr(photos, "crop", lambda g, names, size, flip=True: used.append(names) or real_crop(g, names, size))
    for task in tasks.TASKS:
        tasks.eval_items(task, 2, seed=1)
    assert used and all(names == photos.EVAL for names in used)
    used.clear()
    for task in tasks.TASKS:
        tasks.make_batch(task, 2, seed=1)
    assert used and all(names == photos.TRAIN for names in used)


def test_tasks_apply_exact_changes(nat):
    from sc_natural import tasks

    g = torch.Generator().manual_seed(0)
    it = tasks.make_item("edit", g, ("coffee",), change="invert")
    changed = (it.target - it.refs[0]).abs().amax(-1) > 1e-6
    assert changed.any() and bool((changed <= (it.ref_masks[0] > 0.5)).all()), "only the region changes"
    assert torch.allclose(it.target[it.ref_masks[0] > 0.5], 1 - it.refs[0][it.ref_masks[0] > 0.5])
    zoom = tasks.make_item("subject", g, ("coffee",), change="zoom_crop")
    assert zoom.target.shape == (1, 32, 32, 3) and torch.equal(zoom.target, zoom.refs[0][:, 16:48, 16:48])
    shift = tasks.make_item("subject", g, ("coffee",), change="shift_right")
    assert torch.equal(shift.target[:, :, 8:], shift.refs[0][:, :, :-8]) and bool((shift.target[:, :, :8] == 0.5).all())
    comp = tasks.make_item("composition", g, ("coffee", "rocket"), n_refs=3)
    assert comp.target.shape == (1, 64, 64, 3) and len(comp.refs) == 3
    for ref, (dy, dx) in zip(comp.refs, tasks.COMP_OFFSETS, strict=True):  # where the "offset" method lays it out
        assert torch.equal(comp.target[:, dy:dy + 32, dx:dx + 32], ref)
    a, b = tasks.make_batch("subject", 3, seed=5), tasks.make_batch("subject", 3, seed=5)
    assert torch.equal(a.target, b.target) and not torch.equal(a.target, tasks.make_batch("subject", 3, seed=6).target)


def test_baseline_keeps_the_patch_tokens_and_inpaints_the_rest(nat):
    from sc_natural import evaluate, tasks

    item = tasks.eval_items("subject", 8, seed=3)[0]  # a colour grade
    sel = evaluate.selectors()["edge"]
    kept = evaluate.kept_token_masks(item, evaluate.binding(item, sel, 0.25, 0), 0.25)[0]
    assert kept.shape == (16, 16) and int(kept.sum()) == 64
    out = evaluate.baseline(item, evaluate.binding(item, sel, 0.25, 0), 0.25)
    px = kept.repeat_interleave(4, 0).repeat_interleave(4, 1)
    assert torch.allclose(out[0][px], item.target[0][px], atol=1e-5), "kept tokens are exact"
    psnr = evaluate.metrics(out, item.target)["psnr"]
    assert 15 < psnr < evaluate.PSNR_CAP and evaluate.metrics(item.target, item.target)["psnr"] == evaluate.PSNR_CAP


def test_smoke_pipeline(nat):
    """The documented pipeline check as a user runs it (no --out): its files go to the scratch folder and the
    committed ones stay as they are."""
    from sc_harness.repo_files import git_status
    from sc_natural import run

    if Path(sys.path[0]).resolve() == (ROOT / "experiments" / "natural"):
        pytest.fail("the experiment folder must not be on sys.path")
    before = git_status()
    result = run.main(["--smoke"])
    assert git_status() == before, "run.py --smoke changed the repository's files"
    out = ROOT / "out" / "experiments" / "natural_smoke"  # the scratch folder (git-ignored)
    saved = json.loads((out / "natural.json").read_text(encoding="utf-8"))
    assert saved["schema"] == "sparse_context.natural/1" and saved["smoke"] is True
    assert saved["extra"]["measured"] and saved["machine"]["load_average_1_5_15_at_stages"]
    cfg = saved["config"]
    rows = saved["results"]
    sparse = [r for r in cfg["ratios"] if r < 1.0]
    per_task = len(run.MODELS) * (1 + len(cfg["selectors"]) * len(sparse)) + len(cfg["selectors"]) * len(sparse)
    per_task += len(run.MODELS) * (1 + len(run.CACHE_MODES)) * len(sparse)  # attention rule, cache modes
    assert len(rows) == 3 * per_task
    assert {r.get("mode") for r in rows} == {None, *run.CACHE_MODES}
    assert sum(r["selector"] == "attention" for r in rows) == 3 * len(run.MODELS) * len(sparse)
    for r in rows:
        assert math.isfinite(r["psnr"]) and 0.0 <= r["ssim"] <= 1.0
        if r["model"] != "baseline" and r["selector"] in cfg["selectors"] and "mode" not in r:
            kept, total = r["kept_tokens_first_item"], r["tokens_first_item"]
            assert kept == [round(r["keep_ratio"] * n) for n in total], (kept, total)
    targets = saved["summary"]["targets"]
    assert targets and all(isinstance(t["met"], bool) and math.isfinite(t["value"]) for t in targets)
    assert result["summary"] == saved["summary"]
    from sc_miniature import model

    files = model.ModelFiles(out, "natural")
    for path in (out / "natural.png", files.base, files.lora, files.full_ft):
        assert path.stat().st_size > 10_000, path.name
    configs = [json.loads(p.read_text(encoding="utf-8")) for p in (files.config, files.full_ft_config)]
    assert [c["weights"] for c in configs] == [files.base.name, files.full_ft.name], "each config names its own file"
    assert configs[1]["fine_tune_of"] == files.base.name
    assert set(saved["model"]["files"]) == {p.name for p in (files.base, files.lora, files.config, files.full_ft,
                                                               files.full_ft_config)}
