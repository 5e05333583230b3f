"""Model paths that are new since ComfyUI 0.3.75, each against the masked-dense oracle on the hosts that have them:
references modulated at t=0 (``index_timestep_zero``: FLUX in 0.30, Qwen-Image-Edit-2511 in 0.10+), the
per-reference token counts newer hosts record (``reference_image_num_tokens``), Qwen's time axis."""

from __future__ import annotations

import inspect

import pytest
import sc_testpack
import torch
from sc_harness.forward import forward_inputs, run_forward
from sc_harness.host import comfyui_version
from sc_harness.oracle import AttentionProbe, joint_keep
from sparse_context.selectors import Budget
from sparse_context.sparse_attention import SparseContextConfig, apply_sparse_context


def _forward_source(family: str) -> str:
    model = sc_testpack.build_model_patcher(family).model.diffusion_model
    return inspect.getsource(type(model)._forward)


HOST = comfyui_version()
FLUX_T0 = "index_timestep_zero" in _forward_source("flux2_klein")
QWEN_T0 = "index_timestep_zero" in _forward_source("qwen_image_edit")
COUNTS = {f: "reference_image_num_tokens" in _forward_source(f) for f in ("flux2_klein", "qwen_image_edit")}
no_flux_t0 = pytest.mark.skipif(not FLUX_T0, reason=f"ComfyUI {HOST}'s Flux has no index_timestep_zero path (0.30+)")
no_qwen_t0 = pytest.mark.skipif(not QWEN_T0, reason=f"ComfyUI {HOST}'s Qwen-Image has no index_timestep_zero (0.10+)")


def _config(ratio: float) -> SparseContextConfig:
    return SparseContextConfig(budget=Budget(mode="ratio", ratio=ratio), rule="random", bucket=1, seed=3)


def _sizes(family: str) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    d = sc_testpack.SPECS[family].downscale * (1 if family == "flux2_klein" else 2)  # pixels per token
    return (8 * d, 6 * d), [(6 * d, 6 * d), (4 * d, 7 * d)]


def _oracle_case(family: str, method: str | None, model=None):
    """(sparse output, masked-dense oracle output, dense output, plans, sparse probe) of one forward."""
    base_family = sc_testpack.VARIANTS.get(family, (family,))[0]
    base = model or sc_testpack.build_model_patcher(family, seed=11)
    target, refs = _sizes(base_family)
    inputs = forward_inputs(base_family, 3, target, refs)
    extra = {"ref_latents_method": method} if method else {}
    probe = AttentionProbe()
    fwd = run_forward(apply_sparse_context(base, _config(0.3)), inputs, probe=probe, ids_probe=True, **extra)
    text = inputs["context"].shape[1]
    n_target = fwd.ids[0].shape[1] - text - sum(p.kept for p in fwd.plans)
    oracle = run_forward(base, inputs, probe=AttentionProbe(joint_keep(text, n_target, fwd.plans)), **extra).out
    dense = run_forward(base, inputs, **extra).out
    return fwd.out, oracle, dense, fwd.plans, probe


@no_flux_t0
def test_flux2_references_at_timestep_zero_equal_the_masked_dense_oracle():
    """Core runs t=0 references for FLUX.2 only (global modulation): FLUX.1 blocks modulate per block and core's
    own dense forward fails with this method (checked on 0.30.0), so there is nothing to compare for FLUX.1."""
    family = "flux2_klein"
    sparse, oracle, dense, plans, _ = _oracle_case(family, "index_timestep_zero")
    assert all(0 < p.kept < p.total for p in plans)
    err = (sparse - oracle).abs().max().item()
    assert err < 1e-5, f"sparse differs from the masked dense oracle by {err}"
    assert (sparse - dense).abs().max().item() > 100 * max(err, 1e-7)
    # the t=0 path really ran: the same tokens at the sampling timestep give another output
    at_t = _oracle_case(family, "index")[0]
    assert (at_t - sparse).abs().max().item() > 1e-4


@no_qwen_t0
@pytest.mark.parametrize(("family", "method"), [("qwen_image_edit", "index_timestep_zero"),
                                                ("qwen_image_edit_2511", None)])
def test_qwen_references_at_timestep_zero_equal_the_masked_dense_oracle(family, method):
    model = sc_testpack.build_model_patcher(family, seed=11)
    if family == "qwen_image_edit_2511":  # the host's detection read the 2511 marker from the checkpoint keys
        assert model.model.diffusion_model.default_ref_method == "index_timestep_zero"
    sparse, oracle, dense, plans, _ = _oracle_case(family, method, model)
    err = (sparse - oracle).abs().max().item()
    assert err < 1e-5, f"sparse differs from the masked dense oracle by {err}"
    assert (sparse - dense).abs().max().item() > 100 * max(err, 1e-7)
    at_t = _oracle_case("qwen_image_edit", "index", model)[0]
    assert (at_t - sparse).abs().max().item() > 1e-4


@pytest.mark.parametrize("family", ["flux2_klein", "qwen_image_edit"])
def test_recorded_reference_token_counts_are_the_kept_counts(family):
    if not COUNTS[family]:
        pytest.skip(f"ComfyUI {HOST}'s {family} model does not record reference_image_num_tokens (0.30+)")
    _, _, _, plans, probe = _oracle_case(family, None)
    recorded = {tuple(c) for c in probe.reference_counts}
    assert recorded == {tuple(p.kept for p in plans)}, (recorded, [(p.kept, p.total) for p in plans])


def test_qwen_reference_with_a_time_axis_keeps_its_frame_ids():
    """Qwen-Image latents are (B, C, T, H, W): every kept token keeps the ids (frame, row, col) the dense model gives
    it, and the kept set is the planned one, whatever the host's time-axis handling."""
    family = "qwen_image_edit"
    base = sc_testpack.build_model_patcher(family, seed=2)
    inputs = forward_inputs(family, 5, (64, 48), [(48, 64)])
    assert inputs["ref_latents"][0].ndim == 5
    sparse = run_forward(apply_sparse_context(base, _config(0.4)), inputs, ids_probe=True)
    dense = run_forward(base, inputs, ids_probe=True)
    text = inputs["context"].shape[1]
    [plan] = sparse.plans
    n_target = dense.ids[0].shape[1] - text - plan.total
    keep = joint_keep(text, n_target, sparse.plans)
    assert torch.equal(sparse.ids[0], dense.ids[0][:, keep])
    ref_ids = dense.ids[0][0, text + n_target:]
    assert ref_ids.shape == (plan.total, 3)
