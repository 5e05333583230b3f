"""The Preview node shows exactly the tokens the patch keeps, and the Apply node reports the last run only."""

from __future__ import annotations

import sc_testpack
import torch
from sc_harness.forward import forward_inputs, run_forward
from sc_harness.sampling import sample, with_references
from sparse_context.nodes.apply_node import SparseContextApply
from sparse_context.nodes.preview_node import SparseContextPreview, draw_tokens, kept_mask
from sparse_context.selectors import Budget
from sparse_context.sparse_attention import (
    PATCH_KEY,
    ReferenceSelection,
    SelectionBinding,
    SparseContextConfig,
    apply_sparse_context,
)

FAMILY = "flux1_kontext"


def _mask(plan) -> torch.Tensor:
    keep = torch.zeros(plan.total, dtype=torch.bool)
    keep[plan.indices] = True
    return keep.view(plan.grid)


def test_preview_shows_the_patchs_tokens_for_references_1_to_4(tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setattr(folder_paths, "temp_directory", str(tmp_path))
    gen = torch.Generator().manual_seed(0)
    sizes = [(64, 64), (96, 64), (64, 128), (128, 96)]  # (width, height) pixels: 4x4, 4x6, 8x4, 6x8 tokens
    selections = [
        ReferenceSelection(torch.rand(4, 4, generator=gen), rule="edge"),  # Apply's keep_ratio + the edge floor
        ReferenceSelection(torch.rand(6, 4, generator=gen), Budget(mode="count", count=5)),  # its own budget
        ReferenceSelection(torch.ones(4, 8), rule="saliency"),  # all ties: only the seed decides
        ReferenceSelection(torch.rand(8, 6, generator=gen), Budget(mode="ratio", ratio=0.4, coverage=0.5), rule="mask"),
    ]
    binding = SelectionBinding()
    for i, selection in enumerate(selections):
        binding = binding.with_selection(i, selection)
    seed, bucket, keep_ratio = 1234, 4, 0.3
    config = SparseContextConfig(budget=Budget(mode="ratio", ratio=keep_ratio), rule="grid", bucket=bucket, seed=seed)
    base = sc_testpack.build_model_patcher(FAMILY, seed=1)
    plans = run_forward(apply_sparse_context(base, config), forward_inputs(FAMILY, 2, (64, 64), sizes),
                        sparse_context_selection=binding).plans
    assert len(plans) == 4

    for i, ((width, height), selection, plan) in enumerate(zip(sizes, selections, plans, strict=True)):
        image = 0.2 + 0.8 * torch.rand(1, height, width, 3, generator=gen)
        shown = SparseContextPreview.execute(image, selection, bucket, reference=i + 1, seed=seed,
                                             keep_ratio=keep_ratio).result[0]
        assert torch.equal(shown, draw_tokens(image, _mask(plan))), f"reference {i + 1}: preview != patch"
        assert torch.equal(kept_mask(selection, height, width, config, i + 1), _mask(plan))
    # the per-reference seed matters: reference 3's tokens are not what the same selection keeps as reference 1
    assert not torch.equal(kept_mask(selections[2], 64, 128, config, 1), _mask(plans[2]))


def test_the_apply_nodes_report_belongs_to_the_last_run(caplog):
    base = sc_testpack.build_model_patcher(FAMILY, seed=1)
    model = SparseContextApply.execute(base, 0.25, "grid", 0, 1, 0.0, 1.0, 0, True).result[0]
    ref = sc_testpack.make_latent(FAMILY, 8, 64, 64)
    empty = torch.zeros((1, 16, 8, 8))
    with caplog.at_level("INFO", logger="SparseContext"):
        sample(model, with_references(sc_testpack.make_conditioning(FAMILY, 1), [ref]),
               sc_testpack.make_conditioning(FAMILY, 2), empty, steps=1)
    assert "Kept 4/16 reference tokens" in caplog.text
    patch = model.model_options["transformer_options"][PATCH_KEY]
    assert patch.last_report["references"][0]["kept"] == 4
    caplog.clear()
    with caplog.at_level("INFO", logger="SparseContext"):
        sample(model, sc_testpack.make_conditioning(FAMILY, 1), sc_testpack.make_conditioning(FAMILY, 2), empty, steps=1)
    assert "No reference images reached the model" in caplog.text and "Kept" not in caplog.text, caplog.text
    assert patch.last_report is None
