"""References whose plan keeps every token (keep 1.0, or a selection whose budget covers the reference) pass
through the patch uncopied: no index_select of their tokens or ids."""

from __future__ import annotations

import sc_testpack
import torch
from sc_harness.forward import forward_inputs, run_forward
from sc_harness.sampling import sample, with_references
from sparse_context.selectors import Budget
from sparse_context.sparse_attention import (
    ReferenceSelection,
    SelectionBinding,
    SparseContextConfig,
    apply_sparse_context,
)

FAMILY = "flux1_kontext"


class CountIndexSelect(torch.overrides.TorchFunctionMode):
    """Counts ``index_select`` calls (tensor method or function) while active."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.index_select, torch.index_select):
            self.calls += 1
        return func(*args, **(kwargs or {}))


def _count(fn) -> tuple[int, torch.Tensor]:
    with CountIndexSelect() as mode:
        out = fn()
    return mode.calls, out


def _config(keep: float) -> SparseContextConfig:
    return SparseContextConfig(budget=Budget(mode="ratio", ratio=keep), bucket=1)


def test_references_that_keep_every_token_are_not_copied():
    base = sc_testpack.build_model_patcher(FAMILY, seed=5)
    inputs = forward_inputs(FAMILY, 3, (64, 64), [(64, 64), (96, 64)])
    dense_calls, dense = _count(lambda: run_forward(base, inputs).out)
    keep_all_calls, keep_all = _count(lambda: run_forward(apply_sparse_context(base, _config(1.0)), inputs).out)
    assert keep_all_calls == dense_calls and torch.equal(keep_all, dense)

    # reference 1 bound to a selection whose budget covers it; reference 2 keeps half of its tokens
    binding = SelectionBinding().with_selection(0, ReferenceSelection(torch.rand(4, 4), Budget(mode="count", count=99)))
    mixed_calls, _ = _count(lambda: run_forward(apply_sparse_context(base, _config(0.5)), inputs,
                                                sparse_context_selection=binding).out)
    assert mixed_calls == dense_calls + 2, (mixed_calls, dense_calls)  # tokens and ids of reference 2 only


def test_keep_all_sampling_run_copies_no_reference():
    base = sc_testpack.build_model_patcher(FAMILY, seed=5)
    ref = sc_testpack.make_latent(FAMILY, 8, 64, 64)
    positive = with_references(sc_testpack.make_conditioning(FAMILY, 1), [ref])
    negative = with_references(sc_testpack.make_conditioning(FAMILY, 2), [ref])
    empty = torch.zeros((1, 16, 8, 8))
    dense_calls, dense = _count(lambda: sample(base, positive, negative, empty, steps=2, cfg=2.0, seed=1))
    calls, out = _count(lambda: sample(apply_sparse_context(base, _config(1.0)), positive, negative, empty,
                                       steps=2, cfg=2.0, seed=1))
    assert calls == dense_calls and torch.equal(out, dense)
    sparse_calls, _ = _count(lambda: sample(apply_sparse_context(base, _config(0.5)), positive, negative, empty,
                                            steps=2, cfg=2.0, seed=1))
    assert sparse_calls == dense_calls + 2 * 2  # 2 steps x (tokens, ids) of the one reference, cond+uncond batched
