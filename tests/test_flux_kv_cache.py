"""Composition with core's Flux KV Cache node (ComfyUI 0.30+, experimental): it keeps the references' keys/values
of the first step and appends them in every later step, so after Apply Sparse Context it caches only the kept
tokens. Checked against the masked-dense oracle (the same cache over the dense model, dropped reference keys
hidden), in both node orders, with CFG and batch 2."""

from __future__ import annotations

import logging

import pytest
import sc_testpack
import torch
from sc_harness.host import comfyui_version
from sc_harness.oracle import AttentionProbe, joint_keep
from sc_harness.sampling import sample, with_references
from sparse_context.selectors import Budget
from sparse_context.sparse_attention import PATCH_KEY, SparseContextConfig, apply_sparse_context

try:
    from comfy_extras.nodes_flux import FluxKVCache
except ImportError:  # older hosts
    FluxKVCache = None

pytestmark = pytest.mark.skipif(FluxKVCache is None,
                                reason=f"ComfyUI {comfyui_version()} has no Flux KV Cache node (0.30+)")

FAMILY = "flux2_klein"  # core's cache forces t=0 references, which core runs for FLUX.2 only
TARGET = 6 * 4  # tokens of a 96x64 target at 16 px per token (the text tokens are what FLUX.2's conds pad to)
REFS = [(96, 96), (64, 112)]  # 6x6 and 7x4 tokens


def _config(ratio: float, **kw) -> SparseContextConfig:
    return SparseContextConfig(budget=Budget(mode="ratio", ratio=ratio), rule="random", bucket=1, seed=5, **kw)


def _cached(model):
    return FluxKVCache.execute(model).result[0]


def _inputs(ref_seed: int = 20):
    latents = [sc_testpack.make_latent(FAMILY, ref_seed + i, w, h) for i, (w, h) in enumerate(REFS)]
    positive = with_references(sc_testpack.make_conditioning(FAMILY, 1), latents)
    negative = with_references(sc_testpack.make_conditioning(FAMILY, 2), latents)
    return positive, negative


def _run(model, probe=None, batch: int = 1, cfg: float = 2.0, ref_seed: int = 20, steps: int = 4):
    if probe is not None:
        model = model.clone()
        model.model_options["transformer_options"]["optimized_attention_override"] = probe
    positive, negative = _inputs(ref_seed)
    empty = torch.zeros_like(sc_testpack.make_latent(FAMILY, 0, 96, 64, batch))
    return sample(model, positive, negative, empty, steps=steps, cfg=cfg, seed=3)


@pytest.mark.parametrize("order", ["sparse_then_cache", "cache_then_sparse"])
@pytest.mark.parametrize(("batch", "cfg"), [(1, 2.0), (2, 1.0)])
def test_the_cache_holds_exactly_the_kept_tokens_and_equals_the_masked_dense_oracle(order, batch, cfg, matrix):
    base = sc_testpack.build_model_patcher(FAMILY, seed=7)
    config = _config(0.3)
    model = (_cached(apply_sparse_context(base, config)) if order == "sparse_then_cache"
             else apply_sparse_context(_cached(base), config))
    probe = AttentionProbe()
    out = _run(model, probe, batch, cfg)
    run = model.model_options["transformer_options"][PATCH_KEY]
    kept = [r["kept"] for r in run.last_report["references"]]
    assert all(0 < k < 36 for k in kept) and sum(kept) < 36 + 28
    calls = list(zip(probe.query_lengths, probe.lengths, strict=True))
    first = {c for c in calls if c[0] == c[1]}
    later = {c for c in calls if c[0] != c[1]}
    assert len(first) == 1, first
    text = first.pop()[0] - TARGET - sum(kept)
    # step 1 runs text + target + the kept reference tokens; every later step only text + target queries, whose
    # keys are followed by exactly the cached kept tokens
    assert later == {(text + TARGET, text + TARGET + sum(kept))}, (later, text)
    assert run.last_report.get("kv_cache") == "core FluxKVCache"

    # which tokens: the same cache over the DENSE model with the dropped reference keys hidden gives the same images
    plans = _plans(config)
    assert [p.kept for p in plans] == kept
    oracle = AttentionProbe(joint_keep(text, TARGET, plans))
    expected = _run(_cached(base), oracle, batch, cfg)
    assert set(oracle.lengths) == {text + TARGET + 36 + 28}
    err = (out - expected).abs().max().item()
    assert err < 1e-4, f"sparse + cache differs from the masked dense oracle by {err}"
    dense = _run(_cached(base), None, batch, cfg)
    assert (out - dense).abs().max().item() > 100 * max(err, 1e-7)
    if batch == 2:
        assert (out[0] - out[1]).abs().max().item() > 1e-4
    matrix.set(pack="core Flux KV Cache", family="FLUX.2 klein",
               order="Apply -> pack" if order == "sparse_then_cache" else "pack -> Apply", mode="cache=off",
               result="composes", message=f"keep 0.3, batch {batch}, cfg {cfg}: holds the kept tokens only; equal to "
                                          f"the same cache over the masked-dense model ({err:.1e})")


def _plans(config: SparseContextConfig):
    """The kept tokens of the run (the random rule depends only on the grids and the seed)."""
    from sparse_context.sparse_attention.planning import plan_references

    grids = [(h // 16, w // 16) for w, h in REFS]
    return plan_references([torch.zeros(1, *g) for g in grids], grids, [None] * len(grids), config)


def test_keep_all_with_the_cache_is_the_cache_alone_bit_for_bit():
    base = sc_testpack.build_model_patcher(FAMILY, seed=8)
    alone = _run(_cached(base))
    assert torch.equal(_run(_cached(apply_sparse_context(base, _config(1.0)))), alone)
    assert torch.equal(_run(apply_sparse_context(_cached(base), _config(1.0))), alone)


def test_a_second_run_with_other_references_does_not_reuse_a_stale_cache():
    base = sc_testpack.build_model_patcher(FAMILY, seed=9)
    model = _cached(apply_sparse_context(base, _config(0.3)))
    first = _run(model, ref_seed=20)
    second = _run(model, ref_seed=40)
    fresh = _run(_cached(apply_sparse_context(base, _config(0.3))), ref_seed=40)
    assert torch.equal(second, fresh)
    assert (first - second).abs().max().item() > 1e-4


def test_a_step_window_is_ignored_with_a_warning_while_the_cache_is_active(caplog):
    base = sc_testpack.build_model_patcher(FAMILY, seed=9)
    model = _cached(apply_sparse_context(base, _config(0.3, start_percent=0.5)))
    probe = AttentionProbe()
    with caplog.at_level(logging.WARNING, logger="SparseContext"):
        _run(model, probe)
    assert "window is ignored" in caplog.text
    kept = sum(r["kept"] for r in model.model_options["transformer_options"][PATCH_KEY].last_report["references"])
    assert len(set(probe.lengths)) == 1  # step 1 and the cached steps see the same kept references, never dense
    assert min(probe.query_lengths) + kept == probe.lengths[0]
