"""The shipped demo (scripts/demo.py) end to end on the trained miniature model, and the test-pack nodes it
uses (the miniature's task generator and pixel "VAE")."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys

import pytest
import sc_testpack.demo_nodes as demo_nodes
import torch
from sc_harness.host import REPO

MINIATURE = REPO / "experiments" / "miniature" / "results"
NATURAL = REPO / "experiments" / "natural" / "results_long"  # the demo's model: the natural experiment's long run
NATURAL_SHORT = REPO / "experiments" / "natural" / "results"


def test_miniature_nodes_encode_decode_and_task():
    refs, target, cond, count = demo_nodes.MiniatureTask.execute("multi", 3, 3).args
    assert count == 3 and refs.shape == (3, 32, 32, 3) and target.shape == (1, 64, 64, 3)
    context, extra = cond[0]
    assert context.shape == (1, 4, 16) and extra["pooled_output"].shape == (1, 24)
    assert "reference_latents" not in extra  # the graph adds them with Sparse Reference Latent
    latent = demo_nodes.MiniatureEncode.execute(refs).args[0]["samples"]
    assert latent.shape == (3, 16, 16, 16)
    back = demo_nodes.MiniatureDecode.execute({"samples": latent}).args[0]
    assert torch.allclose(back, refs, atol=1e-5)  # the pixel "VAE" is exactly invertible
    empty = demo_nodes.MiniatureEmptyLatent.execute(64, 64, 1).args[0]["samples"]
    assert empty.shape == (1, 16, 32, 32) and not empty.any()
    with pytest.raises(ValueError, match="SCTest_MiniatureEncode: image"):
        demo_nodes.MiniatureEncode.execute(torch.zeros(1, 33, 32, 3))


def test_natural_task_node_gives_held_out_examples():
    refs, target, cond, count, change, width, height = demo_nodes.NaturalTask.execute("composition", 1).args
    assert count == 3 and refs.shape == (3, 32, 32, 3) and target.shape == (1, 64, 64, 3) and (width, height) == (64, 64)
    assert change == "3_refs" and cond[0][0].shape == (1, 4, 16) and "reference_latents" not in cond[0][1]
    refs, target, _, count, change, width, height = demo_nodes.NaturalTask.execute("subject", 7).args
    assert change == "zoom_crop" and target.shape == (1, 32, 32, 3) and (width, height) == (32, 32)
    assert torch.equal(target, refs[:, 16:48, 16:48])


@pytest.mark.server
@pytest.mark.skipif(not (MINIATURE / "miniature_flux.safetensors").is_file(), reason="no trained miniature model")
def test_demo_runs_the_trained_miniature_dense_and_sparse(tmp_path):
    out = tmp_path / "demo"
    res = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo.py"), "--out", str(out), "--model", "miniature", "--task", "multi",
         "--refs", "3", "--repeats", "1"],
        capture_output=True, text=True, cwd="/", timeout=170,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    text = res.stdout
    assert re.search(r"speed-up \d+\.\dx \(one run\)", text), text
    for name in ("dense", "sparse", "target", "comparison", "reference_1", "keepmap_1", "keepmap_3"):
        assert (out / f"{name}.png").is_file(), name
    # The patch's own report: every reference kept fewer tokens than it has (dense keeps them all).
    report = re.search(r"patch report: kept reference tokens (.*?); joint attention work (\d+)%", text)
    assert report, text
    kept = [(int(k), int(n)) for k, n in re.findall(r"#\d+ (\d+)/(\d+)", report.group(1))]
    assert len(kept) == 3 and all(0 < k < n for k, n in kept), report.group(0)
    assert int(report.group(2)) < 100
    summary = json.loads((out / "timings.json").read_text(encoding="utf-8"))
    assert summary["mode"] == "miniature" and summary["lora"] is True
    psnr = summary["psnr_vs_target_db"]
    assert all(math.isfinite(psnr[tag]) and psnr[tag] > 0 for tag in ("dense", "sparse")), psnr
    assert f"PSNR dense {psnr['dense']:.2f} dB, sparse {psnr['sparse']:.2f} dB" in text
    assert len(summary["dense"]["step_s"]) == summary["steps"] == len(summary["sparse"]["step_s"])
    from PIL import Image

    with Image.open(out / "comparison.png") as sheet:  # 3 references, 3 keep maps, dense, sparse, target
        assert sheet.width >= 9 * 256 and sheet.height >= 256, sheet.size


@pytest.mark.server
@pytest.mark.skipif(not (NATURAL / "natural_flux_full_ft.safetensors").is_file(), reason="no trained natural model")
def test_demo_runs_the_natural_model_with_the_experiment_settings(tmp_path):
    out = tmp_path / "demo"
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py"), "--out", str(out), "--task", "subject",
                          "--example", "7", "--repeats", "2"], capture_output=True, text=True, cwd="/", timeout=170)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((out / "timings.json").read_text(encoding="utf-8"))
    assert summary["experiment"] == "natural" and summary["variant"] == "full_ft" and summary["task"] == "subject"
    info = json.loads((NATURAL / "natural.json").read_text(encoding="utf-8"))
    measured = [r for r in info["results"] if (r["task"], r["model"], r["keep_ratio"]) == ("subject", "full_ft", 0.5)
                and r["selector"] in ("edge", "saliency", "grid", "random") and "mode" not in r]
    assert summary["selector"] == max(measured, key=lambda r: r["psnr"])["selector"]  # the experiment's best
    from PIL import Image

    assert Image.open(out / "target.png").size == (32, 32)  # a zoom crop: the empty latent follows the target
    assert len(summary["dense"]["runs_step_s"]) == 2 and "median" in res.stdout
    gain = summary["speedup_median_step"]
    assert gain["runs"] == 2 and gain["low"] <= gain["median"] <= gain["high"]
    assert f"speed-up {gain['median']:.1f}x ({gain['low']:.1f}-{gain['high']:.1f})" in res.stdout, res.stdout


def test_committed_models_are_the_ones_their_results_record():
    import demo

    for results, experiment in ((NATURAL, "natural"), (NATURAL_SHORT, "natural"), (MINIATURE, "miniature")):
        recorded = json.loads((results / f"{experiment}.json").read_text(encoding="utf-8"))["model"]["files"]
        assert recorded and demo.model_files_problem(results, experiment, [results / n for n in recorded]) is None


def test_demo_refuses_an_overwritten_model_with_a_clear_message(tmp_path):
    copy = tmp_path / "results"
    shutil.copytree(NATURAL, copy)
    weights = copy / "natural_flux_full_ft.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight: what a retraining or smoke run into the folder does on a large scale
    weights.write_bytes(bytes(data))
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py"), "--results", str(copy), "--out",
                          str(tmp_path / "demo")], capture_output=True, text=True, cwd="/", timeout=60)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "natural_flux_full_ft.safetensors in" in res.stderr and "not the model natural.json records" in res.stderr
    assert "git checkout" in res.stderr and not (tmp_path / "demo").exists()
