"""The shipped demo (scripts/demo.py) end to end on the trained miniature model, and the test-pack nodes it
uses (the miniature's task generator and pixel "VAE")."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import sc_testpack.demo_nodes as demo_nodes
import torch
from sc_harness.host import REPO

MINIATURE = REPO / "experiments" / "miniature" / "results"


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


@pytest.mark.server
@pytest.mark.skipif(not (MINIATURE / "miniature_flux.safetensors").is_file(), reason="no trained miniature model")
def test_demo_runs_the_trained_miniature_dense_and_sparse(tmp_path):
    out = tmp_path / "demo"
    res = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo.py"), "--out", str(out), "--task", "multi", "--refs", "3",
         "--repeats", "1"],
        capture_output=True, text=True, cwd="/", timeout=170,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    text = res.stdout
    assert re.search(r"speed-up \d+\.\d+x", text), text
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
