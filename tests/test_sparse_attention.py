"""The model patch on real tiny ComfyUI models: exact, really shorter, and well-behaved."""

from __future__ import annotations

import pytest
import sc_testpack
import torch
from sc_harness.forward import forward_inputs, run_forward
from sc_harness.oracle import AttentionProbe, joint_keep
from sc_harness.sampling import sample, with_references
from sparse_context.selectors import Budget
from sparse_context.sparse_attention import (
    BINDING_KEY,
    PATCH_KEY,
    ReferenceSelection,
    SelectionBinding,
    SparseContextConfig,
    apply_sparse_context,
)
from sparse_context.sparse_attention.patch import ReferenceSubsetter, model_family

# (family, reference method or None for the model's default)
CASES = [
    ("flux1_kontext", None), ("flux1_kontext", "offset"), ("flux1_kontext", "index"), ("flux1_kontext", "uxo"),
    ("flux2_klein", None), ("flux2_klein", "index"),
    ("qwen_image_edit", None), ("qwen_image_edit", "index"), ("qwen_image_edit", "offset"),
]
IDS = [f"{f}-{m or 'default'}" for f, m in CASES]


def _config(ratio: float, rule: str = "random", **kw) -> SparseContextConfig:
    return SparseContextConfig(budget=Budget(mode="ratio", ratio=ratio), rule=rule, bucket=kw.pop("bucket", 1), **kw)


def _sizes(family: str) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    d = sc_testpack.SPECS[family].downscale * (2 if family != "flux2_klein" else 1)  # pixels per token
    return (8 * d, 6 * d), [(6 * d, 6 * d), (4 * d, 7 * d)]


@pytest.mark.parametrize(("family", "method"), CASES, ids=IDS)
def test_subset_equals_masked_dense_oracle_and_attention_is_shorter(family, method):
    base = sc_testpack.build_model_patcher(family, seed=11)
    target, refs = _sizes(family)
    inputs = forward_inputs(family, 3, target, refs)
    extra = {"ref_latents_method": method} if method else {}
    sparse = apply_sparse_context(base, _config(0.3))

    probe = AttentionProbe()
    fwd = run_forward(sparse, inputs, probe=probe, ids_probe=True, **extra)
    out_sparse, sparse_ids, plans = fwd.out, fwd.ids, fwd.plans
    text = inputs["context"].shape[1]
    n_target = sparse_ids[0].shape[1] - text - sum(p.kept for p in plans)
    kept_total = text + n_target + sum(p.kept for p in plans)
    dense_total = text + n_target + sum(p.total for p in plans)
    assert all(0 < p.kept < p.total for p in plans), [(p.kept, p.total) for p in plans]
    assert set(probe.lengths) == {kept_total}, (probe.lengths, kept_total, dense_total)

    oracle = AttentionProbe(joint_keep(text, n_target, plans))
    fwd = run_forward(base, inputs, probe=oracle, ids_probe=True, **extra)
    out_oracle, dense_ids = fwd.out, fwd.ids
    assert set(oracle.lengths) == {dense_total}
    out_dense = run_forward(base, inputs, **extra).out
    err = (out_sparse - out_oracle).abs().max().item()
    gap = (out_sparse - out_dense).abs().max().item()
    assert err < 1e-5, f"sparse differs from the masked dense oracle by {err}"
    assert gap > 100 * max(err, 1e-7), f"dropping tokens should change the output (gap {gap}, err {err})"

    # the kept tokens carry exactly the ids the dense model gives them
    keep = joint_keep(text, n_target, plans)
    assert torch.equal(sparse_ids[0], dense_ids[0][:, keep]), "kept tokens lost their original position ids"


@pytest.mark.parametrize(("family", "method"), CASES, ids=IDS)
def test_keep_all_equals_unpatched_in_a_full_sampling_run(family, method):
    base = sc_testpack.build_model_patcher(family, seed=5)
    target, refs = _sizes(family)
    latents = [sc_testpack.make_latent(family, 20 + i, w, h) for i, (w, h) in enumerate(refs)]
    positive = with_references(sc_testpack.make_conditioning(family, 1), latents, method)
    negative = with_references(sc_testpack.make_conditioning(family, 2), latents, method)
    empty = torch.zeros_like(sc_testpack.make_latent(family, 0, *target))
    dense = sample(base, positive, negative, empty, steps=3, cfg=2.0, seed=3)
    keep_all = sample(apply_sparse_context(base, _config(1.0)), positive, negative, empty, steps=3, cfg=2.0, seed=3)
    sparse = sample(apply_sparse_context(base, _config(0.25)), positive, negative, empty, steps=3, cfg=2.0, seed=3)
    assert (keep_all - dense).abs().max().item() < 1e-6
    assert (sparse - dense).abs().max().item() > 1e-4


@pytest.mark.parametrize("n_refs", [1, 2, 4])
def test_references_of_different_sizes_batch_two(n_refs):
    family = "flux1_kontext"
    base = sc_testpack.build_model_patcher(family, seed=2)
    refs = [(64 + 16 * i, 48 + 32 * (i % 2)) for i in range(n_refs)]
    inputs = forward_inputs(family, 9, (64, 64), refs, batch=2)
    sparse = apply_sparse_context(base, _config(0.4))
    probe = AttentionProbe()
    fwd = run_forward(sparse, inputs, probe=probe)
    out, plans = fwd.out, fwd.plans
    assert len(plans) == n_refs and [p.grid for p in plans] == [((h // 8 + 1) // 2, (w // 8 + 1) // 2) for w, h in refs]
    oracle = AttentionProbe(joint_keep(8, 16, plans))
    expected = run_forward(base, inputs, probe=oracle).out
    assert out.shape == inputs["x"].shape
    assert (out - expected).abs().max().item() < 1e-5
    # both batch rows are computed (not a broadcast of row 0)
    assert (out[0] - out[1]).abs().max().item() > 1e-3


def test_cfg_cond_and_uncond_share_the_same_tokens_and_plans_are_made_once_per_run(caplog):
    family = "flux1_kontext"
    base = sc_testpack.build_model_patcher(family, seed=4)
    sparse = apply_sparse_context(base, _config(0.3, rule="detail"))
    ref = sc_testpack.make_latent(family, 8, 64, 64)
    positive = with_references(sc_testpack.make_conditioning(family, 1), [ref])
    negative = with_references(sc_testpack.make_conditioning(family, 2), [ref])
    probe = AttentionProbe()
    sparse.model_options["transformer_options"]["optimized_attention_override"] = probe
    empty = torch.zeros((1, 16, 8, 8))
    with caplog.at_level("INFO", logger="SparseContext"):
        sample(sparse, positive, negative, empty, steps=4, cfg=3.0, seed=1)
        sample(sparse, positive, negative, empty, steps=4, cfg=3.0, seed=2)
    assert caplog.text.count("kept reference tokens") == 2, caplog.text  # once per run, not per step
    report = sparse.model_options["transformer_options"][PATCH_KEY].last_report
    kept = report["references"][0]["kept"]
    assert kept == round(0.3 * 16)
    # cond and uncond are batched together: every attention call saw text + target + kept tokens
    assert set(probe.lengths) == {8 + 16 + kept}
    assert report["attention_work_ratio"] < 0.6


def test_lora_weight_patches_compose_with_the_token_patch():
    import comfy.lora
    import comfy.sd

    family = "flux1_kontext"
    base = sc_testpack.build_model_patcher(family, seed=6)
    key = "diffusion_model.double_blocks.0.img_attn.qkv.weight"
    weight = base.get_model_object(key)
    gen = torch.Generator().manual_seed(0)
    rank = 2
    lora = {"diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight": torch.randn(weight.shape[0], rank, generator=gen),
            "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight": torch.randn(rank, weight.shape[1], generator=gen)}
    with_lora, _ = comfy.sd.load_lora_for_models(base, None, lora, 0.5, 0)
    inputs = forward_inputs(family, 1, (64, 64), [(64, 64)])
    sparse_lora = apply_sparse_context(with_lora, _config(1.0))
    out_lora = run_forward(with_lora, inputs).out
    out_sparse_lora = run_forward(sparse_lora, inputs).out
    out_plain = run_forward(base, inputs).out
    assert (out_sparse_lora - out_lora).abs().max().item() < 1e-6
    assert (out_lora - out_plain).abs().max().item() > 1e-3
    # and LoRA on top of a sparse model (the other order) is the same model
    lora_on_sparse, _ = comfy.sd.load_lora_for_models(apply_sparse_context(base, _config(1.0)), None, lora, 0.5, 0)
    out_other_order = run_forward(lora_on_sparse, inputs).out
    assert (out_other_order - out_lora).abs().max().item() < 1e-6


def test_unpatching_restores_the_model_and_clones_do_not_share_state():
    family = "flux2_klein"
    base = sc_testpack.build_model_patcher(family, seed=7)
    inputs = forward_inputs(family, 2, (96, 96), [(96, 96)])
    before = run_forward(base, inputs).out
    a = apply_sparse_context(base, _config(0.2, seed=1))
    b = apply_sparse_context(base, _config(0.6, seed=2))
    fa, fb = run_forward(a, inputs), run_forward(b, inputs)
    out_a, out_b = fa.out, fb.out
    after = run_forward(base, inputs).out
    assert torch.equal(before, after), "a dense run after a sparse run must be unchanged"
    assert (out_a - out_b).abs().max().item() > 1e-4
    assert fa.plans[0].kept != fb.plans[0].kept
    dm = base.model.diffusion_model
    assert not isinstance(dm.process_img, ReferenceSubsetter), "the object patch must be removed after use"


def test_keep_ratio_zero_equals_running_without_the_reference():
    family = "flux1_kontext"
    base = sc_testpack.build_model_patcher(family, seed=8)
    inputs = forward_inputs(family, 4, (64, 64), [(64, 64)])
    none = dict(inputs, ref_latents=None)
    out_zero = run_forward(apply_sparse_context(base, _config(0.0)), inputs).out
    out_none = run_forward(base, none).out
    assert (out_zero - out_none).abs().max().item() < 1e-6


def test_bucket_rounds_kept_counts_up_by_at_most_a_sixteenth_of_the_reference():
    from sparse_context.sparse_attention.planning import bucket_round

    family = "flux1_kontext"
    base = sc_testpack.build_model_patcher(family, seed=8)
    inputs = forward_inputs(family, 4, (64, 64), [(512, 512), (256, 256)])  # 32x32 and 16x16 tokens
    plans = run_forward(apply_sparse_context(base, _config(0.3, bucket=64)), inputs).plans
    assert plans[0].kept == 320  # round(0.3 * 1024) = 307 -> next multiple of 64
    assert plans[1].kept == 80  # round(0.3 * 256) = 77 -> next multiple of 16 (= 256 / 16), not 128
    assert [bucket_round(k, 64, 4096) for k in (0, 1, 64, 65, 4096)] == [0, 64, 64, 128, 4096]


def test_step_window_runs_dense_outside_it():
    family = "flux1_kontext"
    base = sc_testpack.build_model_patcher(family, seed=9)
    ref = sc_testpack.make_latent(family, 8, 64, 64)
    positive = with_references(sc_testpack.make_conditioning(family, 1), [ref])
    negative = sc_testpack.make_conditioning(family, 2)
    empty = torch.zeros((1, 16, 8, 8))
    windowed = apply_sparse_context(base, _config(0.25, start_percent=0.0, end_percent=0.5))
    probe = AttentionProbe()
    windowed.model_options["transformer_options"]["optimized_attention_override"] = probe
    sample(windowed, positive, negative, empty, steps=4, cfg=1.0, seed=1)
    kept = round(0.25 * 16)
    lengths = sorted(set(probe.lengths))
    assert lengths == [8 + 16 + kept, 8 + 16 + 16], lengths


def test_bound_selection_is_used_for_its_reference():
    family = "flux1_kontext"
    base = sc_testpack.build_model_patcher(family, seed=9)
    inputs = forward_inputs(family, 4, (64, 64), [(64, 64), (64, 64)])
    scores = torch.zeros(4, 4)
    scores[0, :] = 1.0  # only the top row matters
    binding = SelectionBinding().with_selection(1, ReferenceSelection(scores, Budget(mode="count", count=4), rule="test"))
    sparse = apply_sparse_context(base, _config(0.5, rule="grid"))
    plans = run_forward(sparse, inputs, sparse_context_selection=binding).plans
    assert plans[0].rule == "grid" and plans[0].kept == 8
    assert plans[1].rule == "test" and plans[1].indices.tolist() == [0, 1, 2, 3]


def test_selection_bound_to_a_missing_reference_is_a_clear_error():
    family = "flux1_kontext"
    base = sc_testpack.build_model_patcher(family, seed=9)
    inputs = forward_inputs(family, 4, (64, 64), [(64, 64)])
    binding = SelectionBinding().with_selection(2, ReferenceSelection(torch.ones(4, 4)))
    with pytest.raises(ValueError, match="reference #3.*only 1 reference"):
        run_forward(apply_sparse_context(base, _config(0.5)), inputs, sparse_context_selection=binding)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(budget=Budget(mode="ratio", ratio=0.5), rule="edges"), "rule"),
    (dict(bucket=0), "bucket"),
    (dict(start_percent=0.8, end_percent=0.2), "start_percent"),
])
def test_bad_config_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseContextConfig(**kwargs)


@pytest.mark.parametrize(("scores", "match"), [
    (torch.ones(2, 3, 4), "scores"), (torch.full((4, 4), float("nan")), "finite"), (-torch.ones(4, 4), ">= 0"),
])
def test_bad_selection_is_a_clear_error(scores, match):
    with pytest.raises(ValueError, match=match):
        ReferenceSelection(scores)


def test_ratio_out_of_range_is_a_clear_error():
    with pytest.raises(ValueError, match="ratio"):
        Budget(mode="ratio", ratio=1.5)


def test_unsupported_reference_model_runs_dense_and_says_so(caplog):
    """OmniGen2 takes reference latents too, but orders them before the image: not supported."""
    model = sc_testpack.build_omnigen2_patcher()
    assert model_family(model.model.diffusion_model) is None
    with caplog.at_level("WARNING", logger="SparseContext"):
        patched = apply_sparse_context(model, _config(0.5))
    assert "not a supported model" in caplog.text and "run dense" in caplog.text
    # the warning says why, and which hook core would need (README's model table, sparse_attention/families/dense.py)
    assert "OmniGen2: no official hook gives an exact route" in caplog.text and "WrapperExecutor" in caplog.text
    assert not patched.object_patches and PATCH_KEY not in patched.model_options["transformer_options"]


def test_a_binding_on_the_positive_only_also_selects_the_negatives_tokens():
    import comfy.conds

    family = "flux1_kontext"
    base = sc_testpack.build_model_patcher(family, seed=4)
    sparse = apply_sparse_context(base, _config(0.5, rule="grid"))
    ref = sc_testpack.make_latent(family, 8, 64, 64)
    binding = SelectionBinding().with_selection(0, ReferenceSelection(torch.rand(4, 4), Budget(mode="count", count=4)))
    positive = with_references(sc_testpack.make_conditioning(family, 1), [ref])
    positive = [[positive[0][0], dict(positive[0][1], model_conds={BINDING_KEY: comfy.conds.CONDConstant(binding)})]]
    negative = with_references(sc_testpack.make_conditioning(family, 2), [ref])
    probe = AttentionProbe()
    sparse.model_options["transformer_options"]["optimized_attention_override"] = probe
    sample(sparse, positive, negative, torch.zeros((1, 16, 8, 8)), steps=2, cfg=3.0, seed=1)
    assert set(probe.lengths) == {8 + 16 + 4}, sorted(set(probe.lengths))


def test_a_selection_without_a_budget_keeps_its_rules_coverage_floor():
    from sparse_context.selectors import DEFAULT_COVERAGE
    from sparse_context.sparse_attention.planning import plan_references

    scores = torch.full((8, 8), 0.01)
    scores[:2] = 1.0  # the edge mass in the top two rows: exactly the 16 tokens a 0.25 budget keeps
    config = _config(0.25)
    latent = torch.zeros(16, 16, 16)
    (edge,) = plan_references([latent], [(8, 8)], [ReferenceSelection(scores, rule="edge")], config)
    (custom,) = plan_references([latent], [(8, 8)], [ReferenceSelection(scores, rule="custom")], config)
    assert DEFAULT_COVERAGE["edge"] > 0
    assert edge.kept == custom.kept == 16
    assert (custom.indices >= 16).sum() == 0  # no floor: top-k only
    assert (edge.indices >= 16).sum() >= 2, "the edge rule's coverage floor must reach beyond the edges"


def test_composes_with_core_easycache_wrappers():
    """Core EasyCache adds OUTER_SAMPLE / CALC_COND_BATCH / DIFFUSION_MODEL wrappers of its own."""
    from comfy_extras.nodes_easycache import EasyCacheNode

    family = "flux1_kontext"
    base = sc_testpack.build_model_patcher(family, seed=3)
    ref = sc_testpack.make_latent(family, 8, 64, 64)
    positive = with_references(sc_testpack.make_conditioning(family, 1), [ref])
    negative = with_references(sc_testpack.make_conditioning(family, 2), [ref])
    empty = torch.zeros((1, 16, 8, 8))
    for cached_first in (True, False):
        model = base
        if cached_first:
            model = EasyCacheNode.execute(model, 0.2, 0.0, 1.0, False).result[0]
        model = apply_sparse_context(model, _config(0.25))
        if not cached_first:
            model = EasyCacheNode.execute(model, 0.2, 0.0, 1.0, False).result[0]
        probe = AttentionProbe()
        model.model_options["transformer_options"]["optimized_attention_override"] = probe
        out = sample(model, positive, negative, empty, steps=6, cfg=2.0, seed=1)
        assert torch.isfinite(out).all()
        assert probe.lengths and set(probe.lengths) == {8 + 16 + 4}, sorted(set(probe.lengths))


def test_a_reference_changed_behind_the_patch_runs_dense_and_is_reported(caplog):
    """Another wrapper inside ours swaps the references for resized copies: they run dense, with a warning."""
    import comfy.patcher_extension
    import torch.nn.functional as F

    def resize_refs(executor, *args, **kwargs):
        args = list(args)
        args[5] = [F.interpolate(r, scale_factor=2.0) for r in args[5]]  # Flux._forward's ref_latents
        return executor(*args, **kwargs)

    family = "flux1_kontext"
    base = sc_testpack.build_model_patcher(family, seed=3)
    model = apply_sparse_context(base, _config(0.25))
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test_resize", resize_refs)
    inputs = forward_inputs(family, 4, (64, 64), [(64, 64)])
    probe = AttentionProbe()
    with caplog.at_level("WARNING", logger="SparseContext"):
        run_forward(model, inputs, probe=probe)
    assert set(probe.lengths) == {8 + 16 + 64}  # the resized reference (8x8 tokens) ran dense
    assert "did not reach the model as expected" in caplog.text
