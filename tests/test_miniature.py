"""The miniature replication's pipeline (experiments/miniature/run.py --smoke): train from scratch,
drop-robust LoRA with the pack's trainer, evaluation through the pack's model patch, JSON + PNG + model files."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mini():
    """The experiment folder as the package ``sc_miniature`` (importlib, never via sys.path)."""
    if "sc_miniature" in sys.modules:
        return sys.modules["sc_miniature"]
    folder = ROOT / "experiments" / "miniature"
    spec = importlib.util.spec_from_file_location("sc_miniature", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["sc_miniature"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(mini):
    """The documented pipeline check as a user runs it (no --out): it must leave the committed files alone."""
    from sc_harness.repo_files import git_status

    run = importlib.import_module("sc_miniature.run")
    before = git_status()
    result = run.main(["--smoke"])
    assert git_status() == before, "run.py --smoke changed the repository's files"
    out = ROOT / "out" / "experiments" / "miniature_smoke"  # the scratch folder (git-ignored)
    return out, result


def test_encoding_is_invertible_and_model_space_is_pixels(mini):
    from sc_miniature import encoding, tasks

    b = tasks.make_batch("edit", 2, seed=3)
    z = encoding.encode(b.target)
    assert z.shape == (2, 16, 32, 32)
    assert torch.allclose(encoding.decode(z), b.target, atol=1e-5)
    inside = (z - encoding.FLUX_SHIFT) * encoding.FLUX_SCALE  # what comfy.latent_formats.Flux.process_latent_in gives
    assert float(inside.abs().max()) <= 1 + 1e-4, "inside the model a latent is 2 * pixels - 1"


def test_tasks_are_seeded_and_consistent(mini):
    from sc_miniature import tasks

    a, b = tasks.make_batch("subject", 2, seed=7), tasks.make_batch("subject", 2, seed=7)
    assert torch.equal(a.target, b.target) and torch.equal(a.refs[0], b.refs[0])
    c = tasks.make_batch("subject", 2, seed=8)
    assert not torch.equal(a.target, c.target)
    # the object is copied unchanged and in place (token-aligned with the reference), the clutter is gone
    obj = a.ref_masks[0][0] > 0.5
    assert torch.equal(obj, a.target_mask[0] > 0.5) and torch.equal(a.refs[0][0][obj], a.target[0][obj])
    assert bool((a.target[0][~obj] == a.background[0]).all())
    m = tasks.make_batch("multi", 1, seed=1, n_refs=3)
    assert len(m.refs) == 3 and m.refs[0].shape == (1, 32, 32, 3)
    for k, (dy, dx) in enumerate(tasks.MULTI_OFFSETS):  # reference k lands where the "offset" method lays it out
        quadrant = m.target[0, dy:dy + 32, dx:dx + 32]
        obj = m.ref_masks[k][0] > 0.5
        assert torch.equal(quadrant[obj], m.refs[k][0][obj])
    with pytest.raises(ValueError, match="n_refs"):
        tasks.make_batch("multi", 1, seed=1, n_refs=4)
    e = tasks.make_batch("edit", 1, seed=1)
    changed = (e.target - e.refs[0]).abs().amax(-1) > 0
    assert changed.any() and bool((changed <= (e.target_mask > 0.5)).all()), "the edit changes only the masked shapes"
    cells = e.target_mask[0].unfold(0, tasks.CELL, tasks.CELL).unfold(1, tasks.CELL, tasks.CELL)
    assert bool((cells.amax((-1, -2)) == cells.amin((-1, -2))).all()), "shapes are drawn on the 4 px token grid"


def test_smoke_pipeline_trains_finetunes_and_evaluates_through_the_patch(mini, smoke):
    out, result = smoke
    saved = json.loads((out / "miniature.json").read_text(encoding="utf-8"))
    assert saved["schema"] == "sparse_context.miniature/1" and saved["smoke"] is True
    for key in ("config", "model", "lora", "sampling", "selectors", "default_selector", "timing_s", "losses",
                "results", "summary"):
        assert key in saved, key
    assert saved["lora"]["trainer"] == "sparse_context.training.LoraTrainer"
    cfg = saved["config"]
    assert len(saved["losses"]["base"]) == cfg["base_steps"] and len(saved["losses"]["lora"]) == cfg["lora_steps"]
    assert all(math.isfinite(x) for x in saved["losses"]["base"] + saved["losses"]["lora"])

    rows = saved["results"]
    sparse_ratios = [r for r in cfg["ratios"] if r < 1.0]
    assert len(rows) == 3 * 2 * (1 + len(cfg["selectors"]) * len(sparse_ratios))
    for r in rows:
        assert math.isfinite(r["psnr"]) and 0.0 <= r["ssim"] <= 1.0 and r["sec_per_step"] > 0
        assert ("iou" in r) == (r["task"] in ("subject", "multi"))
        if r["selector"] == "dense":
            assert "kept_tokens_first_item" not in r
        else:  # the patch really thinned every reference, to the asked share, and reported it
            kept, total = r["kept_tokens_first_item"], r["tokens_first_item"]
            assert kept == [round(r["keep_ratio"] * n) for n in total], (kept, total)
            assert r["attention_work_ratio_first_item"] < 1.0
    checks = saved["summary"]["checks"]
    assert checks and all(isinstance(v, bool) for v in checks.values())
    assert (out / "miniature.png").stat().st_size > 10_000


def test_resummarize_recomputes_checks_without_training(mini, smoke, tmp_path):
    import shutil

    out, result = smoke
    copy = tmp_path / "again"
    shutil.copytree(out, copy)
    data = json.loads((copy / "miniature.json").read_text(encoding="utf-8"))
    data["summary"] = {"checks": {"stale": True}}
    data["default_selector"] = {"edit": "stale"}
    (copy / "miniature.json").write_text(json.dumps(data), encoding="utf-8")
    run = importlib.import_module("sc_miniature.run")
    again = run.main(["--resummarize", "--out", str(copy)])
    evaluate = importlib.import_module("sc_miniature.evaluate")
    assert again["default_selector"] == evaluate.DEFAULT_SELECTOR
    assert again["summary"]["checks"] == result["summary"]["checks"] and again["results"] == result["results"]
    assert json.loads((copy / "miniature.json").read_text(encoding="utf-8"))["summary"] == again["summary"]


def test_saved_model_and_lora_load_back_as_comfy_models(mini, smoke):
    import comfy.model_patcher
    from sc_miniature import model
    from sparse_context.training import load_lora_file, match_lora

    out, _ = smoke
    files = model.ModelFiles(out, "miniature")
    base = model.load_trained_model(files.base)
    assert isinstance(base, comfy.model_patcher.ModelPatcher)
    fresh = model.build_model(seed=0)  # the init the run started from: training changed the weights
    trained = base.model.diffusion_model.state_dict()
    assert any(not torch.equal(v, trained[k]) for k, v in fresh.model.diffusion_model.state_dict().items())
    sd, meta = load_lora_file(files.lora)
    assert meta.is_sparse_context and match_lora(base, sd).ok
    assert any(k.endswith("lora_up.weight") and v.abs().max() > 0 for k, v in sd.items()), "LoRA never moved"
    with_lora = model.load_trained_model(files.base, lora=True)
    assert with_lora.patches, "the LoRA reached ComfyUI's weight patches"
    info = json.loads(files.config.read_text(encoding="utf-8"))
    assert info["flux_kwargs"] == model.FLUX_KWARGS and info["weights"] == "miniature_flux.safetensors"
    assert files.base.stat().st_size < 5_000_000
    hashes = json.loads((out / "miniature.json").read_text(encoding="utf-8"))["model"]["files"]
    assert hashes[files.base.name] == hashlib.sha256(files.base.read_bytes()).hexdigest()
