"""ComfyUI's memory estimate for a sampling run counts the reference tokens the patch keeps.

The estimate is the one core makes before loading the model (``comfy.sampler_helpers.estimate_memory`` inside
``prepare_sampling``), recorded by a PREPARE_SAMPLING wrapper of the test that runs inside the patch's.
"""

from __future__ import annotations

import sc_testpack
import torch
from sc_harness.sampling import memory_estimate, sample, with_references
from sparse_context.selectors import Budget
from sparse_context.sparse_attention import SparseContextConfig, apply_sparse_context

FAMILY = "flux1_kontext"


def _estimate(model, positive: list, negative: list) -> float:
    """Core's memory estimate (bytes) of a real sampling run of ``model``."""
    return memory_estimate(model, lambda m: sample(m, positive, negative, torch.zeros((1, 16, 8, 8)), steps=1, cfg=2.0,
                                                   seed=1))[0]


def _config(keep: float, **kw) -> SparseContextConfig:
    return SparseContextConfig(budget=Budget(mode="ratio", ratio=keep), bucket=1, **kw)


def test_the_memory_estimate_counts_the_kept_reference_tokens():
    base = sc_testpack.build_model_patcher(FAMILY, seed=2)
    ref = sc_testpack.make_latent(FAMILY, 8, 128, 128)  # 8 x 8 = 64 tokens
    positive = with_references(sc_testpack.make_conditioning(FAMILY, 1), [ref])
    negative = with_references(sc_testpack.make_conditioning(FAMILY, 2), [ref])
    no_refs = _estimate(base, sc_testpack.make_conditioning(FAMILY, 1), sc_testpack.make_conditioning(FAMILY, 2))
    dense = _estimate(base, positive, negative)
    sparse = {keep: _estimate(apply_sparse_context(base, _config(keep)), positive, negative)
              for keep in (1.0, 0.5, 0.25, 0.0)}

    assert dense > no_refs
    assert sparse[1.0] == dense
    assert dense > sparse[0.5] > sparse[0.25] > sparse[0.0]
    for keep, estimate in sparse.items():  # the references' part scales with the kept share
        share = (estimate - no_refs) / (dense - no_refs)
        assert abs(share - keep) < 1e-6, (keep, share)
    # a step window keeps some steps dense: those steps need the dense memory
    windowed = _estimate(apply_sparse_context(base, _config(0.25, end_percent=0.5)), positive, negative)
    assert windowed == dense
    # the conditionings are the user's, unchanged
    assert positive[0][1]["reference_latents"][0] is ref
