"""Sparse Context Calibrate on tiny real models: the keep it recommends stays within the threshold (checked
again by an independent run through Apply Sparse Context and core's sampler), a stricter threshold never gives
a lower keep, a model already patched keeps its settings, and bad input is named."""

from __future__ import annotations

import math

import pytest
import sc_testpack
import torch
from sc_harness.sampling import sample, with_references
from sc_harness.skips import family_param
from sparse_context.nodes.apply_node import SparseContextApply
from sparse_context.nodes.calibrate_node import SparseContextCalibrate
from sparse_context.nodes.calibration import KeepResult, parse_keeps, quality, recommend
from sparse_context.nodes.common import SparseContextInputError
from sparse_context.sparse_attention import PATCH_KEY

KEEPS = "0.1, 0.25, 0.5, 0.75"


def _setup(family: str = "flux1_kontext", refs: int = 2):
    model = sc_testpack.build_model_patcher(family, seed=1)
    references = [sc_testpack.make_latent(family, 10 + i, 128, 128) for i in range(refs)]
    method = "index" if family == "krea2" else None  # Krea 2 appends references only with a method
    positive = with_references(sc_testpack.make_conditioning(family, 3), references, method)
    latent = {"samples": torch.zeros_like(sc_testpack.make_latent(family, 5, 64, 64))}
    return model, positive, latent


def _calibrate(model, positive, latent, min_psnr, min_ssim=0.0, seed=7, keeps=KEEPS):
    out = SparseContextCalibrate.execute(model, positive, latent, seed, min_psnr, min_ssim=min_ssim, keep_ratios=keeps,
                                         steps=2)
    return out.result


def _psnrs(report: str) -> dict[float, float]:
    rows = [line for line in report.splitlines() if line.startswith("keep ")]
    return {float(r.split()[1].rstrip(":")): float(r.split("PSNR ")[1].split()[0]) for r in rows}


@pytest.mark.parametrize("family", ["flux1_kontext", "flux2_klein", "qwen_image_edit",
                                    *map(family_param, ["mage_flow", "krea2", "longcat_image_edit", "z_image_omni",
                                                     "z_image_pixel", "joyimage_edit"])])
def test_recommended_keep_stays_within_the_threshold(family):
    model, positive, latent = _setup(family)
    _, _, report = _calibrate(model, positive, latent, 0.0)
    measured = _psnrs(report)
    assert sorted(measured) == parse_keeps(KEEPS) and all(math.isfinite(v) for v in measured.values())
    assert len(set(measured.values())) > 1, "keep ratios must change the result"
    threshold = sorted(measured.values())[1]  # between the worst and the best candidate
    keep, plot, report = _calibrate(model, positive, latent, threshold)
    assert keep in measured and all(v >= threshold for k, v in _psnrs(report).items() if k >= keep)
    assert plot.shape == (1, 400, 640, 3) and float(plot.std()) > 0.05

    # independent check: Apply Sparse Context at that keep, core's sampler, same seed, against dense
    sparse = SparseContextApply.execute(model, keep, "grid", 0, 64, 0.0, 1.0, 0, True).result[0]
    a = sample(sparse, positive, positive, latent["samples"], steps=2, seed=7)
    b = sample(model, positive, positive, latent["samples"], steps=2, seed=7)
    assert quality(a, b)[0] >= threshold - 1e-3


def test_a_stricter_threshold_never_gives_a_lower_keep():
    model, positive, latent = _setup()
    measured = _psnrs(_calibrate(model, positive, latent, 0.0)[2])
    keeps = []
    for threshold in sorted(measured.values()) + [max(measured.values()) + 1.0]:
        keeps.append(_calibrate(model, positive, latent, threshold)[0])
    assert keeps == sorted(keeps) and keeps[-1] == 1.0, keeps  # nothing passes: dense
    # the SSIM threshold is a second condition, never a looser one
    assert _calibrate(model, positive, latent, 0.0, min_ssim=1.0)[0] == 1.0


def test_recommend_is_monotone_and_needs_every_larger_keep_to_pass():
    results = [KeepResult(0.1, 31.0, 0.9, 0.1), KeepResult(0.25, 25.0, 0.8, 0.1), KeepResult(0.5, 35.0, 0.95, 0.2)]
    assert recommend(results, 30.0, 0.0) == 0.5  # 0.1 passes alone, but 0.25 above it fails
    assert recommend(results, 20.0, 0.0) == 0.1
    assert recommend(results, 40.0, 0.0) == 1.0
    assert recommend(results, 20.0, 0.85) == 0.5
    thresholds = [10.0 + 0.5 * i for i in range(70)]
    picks = [recommend(results, t, 0.0) for t in thresholds]
    assert picks == sorted(picks)


def test_a_patched_model_keeps_its_settings_and_is_not_modified():
    model, positive, latent = _setup(refs=1)
    patched = SparseContextApply.execute(model, 0.9, "random", 0, 1, 0.0, 1.0, 5, True).result[0]
    before = patched.model_options["transformer_options"][PATCH_KEY].config
    keep, _, report = _calibrate(patched, positive, latent, 0.0, keeps="0.25, 0.5")
    assert keep == 0.25 and "keep 0.25" in report
    assert patched.model_options["transformer_options"][PATCH_KEY].config is before  # untouched
    from sparse_context.nodes.calibration import sparse_model

    cfg = sparse_model(patched, 0.5).model_options["transformer_options"][PATCH_KEY].config
    assert (cfg.rule, cfg.bucket, cfg.seed, cfg.budget.ratio) == ("random", 1, 5, 0.5)


def test_quality_of_identical_results_is_perfect():
    x = torch.randn(1, 16, 8, 8)
    psnr, ssim = quality(x, x.clone())
    assert psnr == math.inf and ssim == pytest.approx(1.0, abs=1e-5)
    assert quality(x + 0.1 * torch.randn_like(x), x)[0] < 40


@pytest.mark.parametrize("keeps, pattern", [("abc", "keep_ratios: expected numbers"),
                                            ("0.5, 1.5", "keep_ratios: expected one or more values in \\(0, 1\\)"),
                                            ("", "keep_ratios")])
def test_bad_keep_ratios_are_named(keeps, pattern):
    model, positive, latent = _setup(refs=1)
    with pytest.raises(SparseContextInputError, match=f"^Sparse Context Calibrate: {pattern}"):
        _calibrate(model, positive, latent, 30.0, keeps=keeps)


def test_conditioning_without_references_is_named():
    model, _, latent = _setup(refs=1)
    with pytest.raises(SparseContextInputError, match="^Sparse Context Calibrate: positive: .*no reference images"):
        _calibrate(model, sc_testpack.make_conditioning("flux1_kontext", 3), latent, 30.0)
