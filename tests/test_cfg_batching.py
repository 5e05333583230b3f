"""Cond and uncond stay one batch with the patch whenever ComfyUI batches them dense, and a negative with
fewer references than the positive's binding keeps the positive's tokens of the references they share."""

from __future__ import annotations

import comfy.patcher_extension
import sc_testpack
import torch
from sc_harness.oracle import IdsProbe
from sc_harness.sampling import sample, with_references
from sparse_context.nodes.reference_nodes import SparseContextReferenceLatent
from sparse_context.selectors import Budget
from sparse_context.sparse_attention import ReferenceSelection, SparseContextConfig, apply_sparse_context

FAMILY = "flux1_kontext"
STEPS = 3


def _forward_batches(model) -> list[int]:
    """Adds a DIFFUSION_MODEL wrapper to ``model`` that records the batch size of every model forward."""
    batches: list[int] = []

    def count(executor, x, *args, **kwargs):
        batches.append(int(x.shape[0]))
        return executor(x, *args, **kwargs)

    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test_count", count)
    return batches


def _bound(conditioning: list, latent: torch.Tensor, selection: ReferenceSelection) -> list:
    """The positive as the pack's Sparse Reference Latent node makes it: reference + its selection."""
    return SparseContextReferenceLatent.execute(conditioning, {"samples": latent}, selection).result[0]


def test_a_selection_on_the_positive_only_keeps_cond_and_uncond_in_one_batch():
    base = sc_testpack.build_model_patcher(FAMILY, seed=4)
    ref = sc_testpack.make_latent(FAMILY, 8, 64, 64)
    selection = ReferenceSelection(torch.rand(4, 4, generator=torch.Generator().manual_seed(0)),
                                   Budget(mode="count", count=4), rule="test")
    positive = _bound(sc_testpack.make_conditioning(FAMILY, 1), ref, selection)
    negative = with_references(sc_testpack.make_conditioning(FAMILY, 2), [ref])  # core ReferenceLatent only
    empty = torch.zeros((1, 16, 8, 8))

    # the dense graph: the same references through core's ReferenceLatent only, no pack node
    dense = base.clone()
    dense_batches = _forward_batches(dense)
    sample(dense, with_references(sc_testpack.make_conditioning(FAMILY, 1), [ref]), negative, empty,
           steps=STEPS, cfg=3.0, seed=1)
    assert dense_batches == [2] * STEPS, dense_batches  # ComfyUI batches cond and uncond
    for enabled in (True, False):  # Apply Sparse Context on, and off (the A/B switch)
        config = SparseContextConfig(budget=Budget(mode="ratio", ratio=0.5), enabled=enabled)
        sparse = apply_sparse_context(base, config)
        sparse_batches = _forward_batches(sparse)
        sample(sparse, positive, negative, empty, steps=STEPS, cfg=3.0, seed=1)
        assert sparse_batches == dense_batches, f"enabled={enabled}: forwards per step {sparse_batches}"
    # the user's conditionings are untouched: the negative still carries no binding
    assert "model_conds" not in negative[0][1]


def test_a_negative_with_fewer_references_uses_the_positives_selection_for_the_shared_ones():
    base = sc_testpack.build_model_patcher(FAMILY, seed=4)
    refs = [sc_testpack.make_latent(FAMILY, 8, 64, 64), sc_testpack.make_latent(FAMILY, 9, 64, 64)]
    scores = torch.zeros(4, 4)
    scores[3, :] = 1.0  # the bottom row: not what the default rule (grid) would keep
    positive = _bound(sc_testpack.make_conditioning(FAMILY, 1), refs[0],
                      ReferenceSelection(scores, Budget(mode="count", count=4), rule="test"))
    positive = _bound(positive, refs[1], ReferenceSelection(torch.ones(4, 4), Budget(mode="count", count=2)))
    negative = with_references(sc_testpack.make_conditioning(FAMILY, 2), refs[:1])
    sparse = apply_sparse_context(base, SparseContextConfig(budget=Budget(mode="ratio", ratio=0.5), rule="grid"))
    probe = IdsProbe(sparse.get_model_object("diffusion_model.pe_embedder"))
    sparse.add_object_patch("diffusion_model.pe_embedder", probe)
    sample(sparse, positive, negative, torch.zeros((1, 16, 8, 8)), steps=1, cfg=3.0, seed=1)

    text, target = 8, 16
    by_length = {int(ids.shape[1]): ids for ids in probe.ids}
    assert sorted(by_length) == [text + target + 4, text + target + 4 + 2], sorted(by_length)
    neg_ref1 = by_length[text + target + 4][0, text + target:]
    pos_ref1 = by_length[text + target + 6][0, text + target:text + target + 4]
    assert torch.equal(neg_ref1, pos_ref1), "the negative's first reference must keep the positive's tokens"
    assert neg_ref1[:, 1].eq(3).all(), "the kept tokens are the selection's bottom row (row id 3)"
