"""The families added on their adapters (Mage-Flow, Krea 2, LongCat-Image-Edit, Z-Image omni and pixel space,
JoyImage-Edit), each against the masked-dense oracle on every host whose model detection has it (Mage-Flow's
reference cache: tests/test_reference_cache.py); the adapter gate (subclasses, refused cache modes); and the README's
model table, generated from the adapters."""

from __future__ import annotations

import pytest
import sc_testpack
import torch
from sc_harness.forward import forward_inputs, run_forward
from sc_harness.host import REPO
from sc_harness.oracle import AttentionProbe, joint_keep
from sc_harness.sampling import sample, with_references
from sc_harness.skips import needs_family
from sparse_context.selectors import Budget
from sparse_context.sparse_attention import PATCH_KEY, SparseContextConfig, apply_sparse_context
from sparse_context.sparse_attention.families import FAMILIES, cache_refusal, match_family
from sparse_context.sparse_attention.patch import ReferenceSubsetter

# (family, reference method, extra transformer_options as the family's apply_model sets them)
CASES = [
    pytest.param("mage_flow", None, None, marks=needs_family("mage_flow"), id="mage_flow"),
    pytest.param("krea2", "index", None, marks=needs_family("krea2"), id="krea2-index"),
    pytest.param("krea2", "index_timestep_zero", None, marks=needs_family("krea2"), id="krea2-index_timestep_zero"),
    pytest.param("longcat_image_edit", None, {"rope_options": {"shift_t": 1.0, "shift_y": 8.0, "shift_x": 8.0}},
                 marks=needs_family("longcat_image_edit"), id="longcat_image_edit"),
]
#: and the families whose references do not enter through process_img (their oracles are below)
KEEP_ALL_CASES = [*CASES, pytest.param("z_image_omni", None, None, marks=needs_family("z_image_omni"), id="z_image_omni"),
                  pytest.param("z_image_pixel", None, None, marks=needs_family("z_image_pixel"), id="z_image_pixel"),
                  pytest.param("joyimage_edit", None, None, marks=needs_family("joyimage_edit"), id="joyimage_edit")]


def _config(ratio: float, **kw) -> SparseContextConfig:
    return SparseContextConfig(budget=Budget(mode="ratio", ratio=ratio), rule=kw.pop("rule", "random"), bucket=1,
                               seed=3, **kw)


def _sizes(family: str) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    d = sc_testpack.SPECS[family].pixels_per_token
    return (8 * d, 6 * d), [(6 * d, 6 * d), (4 * d, 7 * d)]


def _forward_case(family: str, method: str | None, options: dict | None, ratio: float = 0.3, batch: int = 1):
    base = sc_testpack.build_model_patcher(family, seed=11)
    target, refs = _sizes(family)
    inputs = forward_inputs(family, 3, target, refs, batch=batch)  # batch 2: each row its own references
    extra = {"ref_latents_method": method} if method else {}
    probe = AttentionProbe(blocks_only=True)
    sparse = run_forward(apply_sparse_context(base, _config(ratio)), inputs, probe=probe, ids_probe=True,
                         options=options, **extra)
    return base, inputs, extra, probe, sparse


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize(("family", "method", "options"), CASES)
def test_new_family_equals_the_masked_dense_oracle(family, method, options, batch):
    base, inputs, extra, probe, fwd = _forward_case(family, method, options, batch=batch)
    plans = fwd.plans
    text = inputs["context"].shape[1]
    n_target = fwd.ids[0].shape[1] - text - sum(p.kept for p in plans)
    assert all(0 < p.kept < p.total for p in plans), [(p.kept, p.total) for p in plans]
    assert set(probe.lengths) == {text + n_target + sum(p.kept for p in plans)}
    assert {tuple(c) for c in probe.reference_counts} == {tuple(p.kept for p in plans)}

    keep = joint_keep(text, n_target, plans)
    oracle_probe = AttentionProbe(keep, blocks_only=True)
    oracle = run_forward(base, inputs, probe=oracle_probe, ids_probe=True, options=options, **extra)
    assert set(oracle_probe.lengths) == {text + n_target + sum(p.total for p in plans)}
    dense = run_forward(base, inputs, options=options, **extra).out
    err = (fwd.out - oracle.out).abs().max().item()
    assert err < 1e-5, f"sparse differs from the masked dense oracle by {err}"
    assert (fwd.out - dense).abs().max().item() > 100 * max(err, 1e-7)
    assert torch.equal(fwd.ids[0], oracle.ids[0][:, keep]), "kept tokens lost their original position ids"


@needs_family("krea2")
def test_krea2_timestep_zero_path_really_runs():
    """With ``index_timestep_zero`` the references run at t=0: the same kept tokens at the sampling timestep give
    another output (so the oracle case above compared the t=0 path)."""
    t0 = _forward_case("krea2", "index_timestep_zero", None)[4].out
    at_t = _forward_case("krea2", "index", None)[4].out
    assert (t0 - at_t).abs().max().item() > 1e-4


@needs_family("krea2")
def test_krea2_without_a_reference_method_ignores_references_and_thins_nothing(caplog):
    """Krea 2 appends references only when a method is set; without one nothing is planned and nothing warns."""
    with caplog.at_level("WARNING", logger="SparseContext"):
        base, inputs, _, probe, fwd = _forward_case("krea2", None, None)
    assert fwd.plans is None
    assert "did not reach the model" not in caplog.text
    assert torch.equal(fwd.out, run_forward(base, inputs).out)


class _KeepByLength:
    """Attention override: hides keys by a (L,) keep mask chosen by the call's key length (Z-Image's refiners and
    blocks see different sequences); records the key lengths."""

    def __init__(self, keeps: dict[int, torch.Tensor] | None = None):
        self.keeps = keeps or {}
        self.lengths: list[int] = []

    def __call__(self, func, *args, **kwargs):
        q, k = args[:2]
        length = int(k.shape[2 if kwargs.get("skip_reshape") else 1])
        self.lengths.append(length)
        keep = self.keeps.get(length)
        if keep is None:
            return func(*args, **kwargs)
        v = args[2]
        heads = args[3] if len(args) > 3 else kwargs.pop("heads")  # JoyImage passes heads by name
        mask = args[4] if len(args) > 4 else kwargs.pop("mask", None)
        add = torch.zeros(length, dtype=q.dtype)
        add[~keep] = float("-inf")
        add = add.view(1, 1, 1, -1) if mask is None else add.view(1, 1, 1, -1) + mask
        return func(q, k, v, heads, mask=add, **kwargs)


def _padded(n: int) -> int:
    return -(-n // 32) * 32


def _assert_z_image_equals_the_masked_dense_oracle(family: str) -> torch.Tensor:
    """Z-Image's ``embed_all`` layout: [captions][SigLIP, omni only][references..., target], each image padded to 32
    tokens with one pad token at position 0 (at t=0 for references). The sparse run pads the kept tokens again;
    every reference pad token computes the same values, so the oracle is the dense model with the dropped tokens
    and the surplus pad tokens hidden as keys, in the image refiner (images only) and in the blocks (everything).
    Returns the sparse output."""
    d = sc_testpack.SPECS[family].pixels_per_token
    base = sc_testpack.build_model_patcher(family, seed=11)
    inputs = forward_inputs(family, 3, (8 * d, 6 * d), [(6 * d, 6 * d), (7 * d, 5 * d)])  # grids 6x6, 5x7: 28, 29 pads
    probe = _KeepByLength()
    fwd = run_forward(apply_sparse_context(base, _config(0.3)), inputs, probe=probe)
    plans = fwd.plans
    assert all(0 < p.kept < p.total for p in plans), [(p.kept, p.total) for p in plans]
    dense_probe = _KeepByLength()
    dense = run_forward(base, inputs, probe=dense_probe).out
    target = _padded(6 * 8)  # the target: 6x8 tokens
    images_dense = sum(_padded(p.total) for p in plans) + target
    images_sparse = sum(_padded(p.kept) for p in plans) + target
    front = max(dense_probe.lengths) - images_dense  # captions (and SigLIP)
    assert set(probe.lengths) - set(dense_probe.lengths) == {images_sparse, front + images_sparse}

    pads_sparse = sum(_padded(p.kept) - p.kept for p in plans)
    pads_dense = sum(_padded(p.total) - p.total for p in plans)
    assert pads_sparse <= pads_dense  # the oracle can only hide pad tokens
    parts, spare = [], pads_sparse
    for p in plans:
        keep = torch.zeros(_padded(p.total), dtype=torch.bool)
        keep[p.indices] = True
        pads = _padded(p.total) - p.total
        keep[p.total:p.total + min(pads, spare)] = True
        spare -= min(pads, spare)
        parts.append(keep)
    images = torch.cat([*parts, torch.ones(target, dtype=torch.bool)])
    oracle_keep = {images_dense: images, front + images_dense: torch.cat([torch.ones(front, dtype=torch.bool), images])}
    oracle = run_forward(base, inputs, probe=_KeepByLength(oracle_keep)).out
    err = (fwd.out - oracle).abs().max().item()
    assert err < 1e-5, f"sparse differs from the masked dense oracle by {err}"
    assert (fwd.out - dense).abs().max().item() > 100 * max(err, 1e-7)
    return fwd.out


@needs_family("z_image_omni")
def test_z_image_omni_equals_the_masked_dense_oracle():
    """Z-Image omni: references with caption pads and SigLIP pads before them (see the helper)."""
    _assert_z_image_equals_the_masked_dense_oracle("z_image_omni")


@needs_family("z_image_pixel")
def test_z_image_pixel_space_equals_the_masked_dense_oracle():
    """Z-Image pixel space (core's ``NextDiTPixelSpace``, a subclass that inherits ``embed_all``): the references are
    RGB patches, no SigLIP. Its decoder reads the target's hidden states at ``cap_size``, the joint length less the
    target's: the target stays last in the thinned sequence, so the decoder reads the target's own tokens and the
    output (RGB pixels, the target's shape) equals the oracle's."""
    out = _assert_z_image_equals_the_masked_dense_oracle("z_image_pixel")
    assert out.shape == (1, 3, 6 * 4, 8 * 4)


@pytest.mark.parametrize("family,cache,refusal", [
    pytest.param("z_image_omni", "first_step", "Z-Image omni puts its references before the target",
                 marks=needs_family("z_image_omni"), id="z_image_omni"),
    pytest.param("joyimage_edit", "reference_only", "JoyImage-Edit's joint order is", marks=needs_family("joyimage_edit"),
                 id="joyimage_edit"),
    pytest.param("z_image_pixel", "first_step", "NextDiTPixelSpace is a subclass", marks=needs_family("z_image_pixel"),
                 id="z_image_pixel"),
])
def test_the_cache_is_refused_where_its_layout_does_not_hold(family, cache, refusal):
    base = sc_testpack.build_model_patcher(family, seed=5)
    with pytest.raises(ValueError, match=refusal):
        apply_sparse_context(base, _config(0.5, cache=cache))


@needs_family("joyimage_edit")
def test_joyimage_equals_the_masked_dense_oracle():
    """JoyImage-Edit patchifies [target, references] inline and orders the joint sequence [image, text]: the thinned
    references reach it as strips of their kept patches, their RoPE rows come from the true grids."""
    family = "joyimage_edit"
    base = sc_testpack.build_model_patcher(family, seed=11)
    target, refs = _sizes(family)
    inputs = forward_inputs(family, 3, target, refs)
    probe = _KeepByLength()
    fwd = run_forward(apply_sparse_context(base, _config(0.3)), inputs, probe=probe)
    plans = fwd.plans
    assert all(0 < p.kept < p.total for p in plans), [(p.kept, p.total) for p in plans]
    text = inputs["context"].shape[1]
    n_target = (target[0] // 16) * (target[1] // 16)
    assert set(probe.lengths) == {n_target + sum(p.kept for p in plans) + text}
    keep = joint_keep(0, 0, plans)
    images = torch.cat([torch.ones(n_target, dtype=torch.bool), keep, torch.ones(text, dtype=torch.bool)])
    oracle = run_forward(base, inputs, probe=_KeepByLength({images.numel(): images})).out
    dense = run_forward(base, inputs).out
    err = (fwd.out - oracle).abs().max().item()
    assert err < 1e-5, f"sparse differs from the masked dense oracle by {err}"
    assert (fwd.out - dense).abs().max().item() > 100 * max(err, 1e-7)


def _sampled(family: str, model, method: str | None) -> torch.Tensor:
    target, refs = _sizes(family)
    latents = [sc_testpack.make_latent(family, 20 + i, w, h) for i, (w, h) in enumerate(refs)]
    positive = with_references(sc_testpack.make_conditioning(family, 1), latents, method)
    negative = with_references(sc_testpack.make_conditioning(family, 2), latents, method)
    empty = torch.zeros_like(sc_testpack.make_latent(family, 0, *target))
    return sample(model, positive, negative, empty, steps=2, cfg=2.0, seed=3)


@pytest.mark.parametrize(("family", "method", "options"), KEEP_ALL_CASES)
def test_new_family_keep_all_is_bit_identical_in_a_sampling_run(family, method, options):
    base = sc_testpack.build_model_patcher(family, seed=5)
    dense = _sampled(family, base, method)
    assert torch.equal(_sampled(family, apply_sparse_context(base, _config(1.0)), method), dense)
    sparse = apply_sparse_context(base, _config(0.25))
    assert (_sampled(family, sparse, method) - dense).abs().max().item() > 1e-4
    report = sparse.model_options["transformer_options"][PATCH_KEY].last_report
    assert report is not None and all(r["kept"] < r["tokens"] for r in report["references"])


@needs_family("krea2")
@pytest.mark.parametrize(("cache", "rule"), [("first_step", "random"), ("reference_only", "grid"), ("off", "attention")])
def test_krea2_refuses_the_cache_and_attention_rule_at_apply_time(cache, rule):
    base = sc_testpack.build_model_patcher("krea2")
    with pytest.raises(ValueError, match="cache: SparseContext cannot run .*Krea 2's text-fusion"):
        apply_sparse_context(base, _config(0.5, cache=cache, rule=rule))


def test_a_subclass_that_inherits_the_hook_is_accepted_without_the_cache():
    """Core's own Qwen-Image ControlNet class inherits ``process_img`` from the Qwen-Image class, as nunchaku's
    Qwen-Image class does: the gate accepts it for plain thinning and refuses the cache modes for it."""
    from comfy.ldm.qwen_image.controlnet import QwenImageControlNetModel

    sizes = dict(sc_testpack.FAMILIES["qwen_image_edit"])
    sizes.pop("image_model")
    import comfy.ops

    subclass = QwenImageControlNetModel(**sizes, operations=comfy.ops.disable_weight_init)
    match = match_family(subclass)
    assert match is not None and match.family.name == "Qwen-Image(-Edit)"
    assert match.subclass.endswith("QwenImageControlNetModel")
    assert "subclass" in cache_refusal(match)

    base = sc_testpack.build_model_patcher("qwen_image_edit")
    base.add_object_patch("diffusion_model", subclass)
    plain = apply_sparse_context(base, _config(0.5))
    assert isinstance(plain.object_patches["diffusion_model.process_img"], ReferenceSubsetter)
    with pytest.raises(ValueError, match="QwenImageControlNetModel is a subclass"):
        apply_sparse_context(base, _config(0.5, cache="first_step"))


def test_readme_model_table_is_generated_from_the_adapters():
    import importlib.util

    spec = importlib.util.spec_from_file_location("model_table", REPO / "scripts" / "model_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert module.render() in readme, "README's model table is stale: run python3 scripts/model_table.py --write"
    for family in FAMILIES:
        assert family.class_path in readme
