"""The reference cache and the other fast paths never return a silently wrong image or hold memory ComfyUI was not
told about (issue "cache trust"); one test per case found by review and by the masked-dense oracle, on tiny real
Flux models through ComfyUI's own sampler, forwards and hooks."""

from __future__ import annotations

import logging
import threading

import comfy.ldm.modules.attention as attention
import pytest
import sc_testpack
import torch
from sc_harness.direct import patched_diffusion_model
from sc_harness.forward import forward_inputs, run_forward
from sc_harness.oracle import AttentionProbe
from sc_harness.sampling import memory_estimate, sample, with_references
from sparse_context.nodes.apply_node import SparseContextApply
from sparse_context.nodes.calibrate_node import SparseContextCalibrate
from sparse_context.selectors import Budget
from sparse_context.sparse_attention import PATCH_KEY, RUN_KEY, SparseContextConfig, apply_sparse_context
from sparse_context.sparse_attention.errors import SparseContextBypassed
from sparse_context.sparse_attention.patch import attention_blocks
from sparse_context.sparse_attention.reference_cache import CacheAttention, reference_attention_mass

FAMILY = "flux1_kontext"
OVERRIDE = "optimized_attention_override"


def _config(keep: float, cache: str = "off", rule: str = "grid", **kw) -> SparseContextConfig:
    return SparseContextConfig(budget=Budget(mode="ratio", ratio=keep), rule=rule, bucket=1, seed=3, cache=cache, **kw)


def _case(family: str = FAMILY, ref_seed: int = 20, refs: int = 2):
    d = sc_testpack.SPECS[family].downscale * (1 if family == "flux2_klein" else 2)
    references = [sc_testpack.make_latent(family, ref_seed + i, w * d, h * d)
                  for i, (w, h) in enumerate([(6, 6), (4, 5)][:refs])]
    positive = with_references(sc_testpack.make_conditioning(family, 1), references)
    negative = with_references(sc_testpack.make_conditioning(family, 2), references)
    return positive, negative, torch.zeros_like(sc_testpack.make_latent(family, 0, 8 * d, 6 * d))


def _sample(model, case, cfg: float = 2.0, seed: int = 1, steps: int = 3):
    positive, negative, latent = case
    return sample(model, positive, negative, latent, steps=steps, cfg=cfg, seed=seed)


def _direct(model, inputs: dict, options: dict | None = None) -> torch.Tensor:
    """One forward of ``model`` outside any sampling run (no run made by the caller)."""
    with patched_diffusion_model(model) as (dm, base), torch.no_grad():
        return dm(**inputs, transformer_options=options if options is not None else dict(base))


def _forward(model, inputs: dict, run, **options) -> torch.Tensor:
    """One forward of ``model`` in the given ``run`` with extra transformer_options."""
    with patched_diffusion_model(model) as (dm, base), torch.no_grad():
        return dm(**inputs, transformer_options={**base, RUN_KEY: run, **options})


def _rows(inputs: dict, rows: list[int]) -> dict:
    index = torch.tensor(rows)
    out = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.index_select(0, index)
        elif isinstance(value, list):
            value = [t.index_select(0, index) for t in value]
        out[name] = value
    return out


def _strip_options(args: dict, extra: dict) -> dict:
    """A block patch that calls its block without the forward's transformer_options, as TeaCache and WaveSpeed call
    blocks (an empty dict: newer blocks read options from it, while the override it would carry is gone)."""
    return extra["original_block"]({**args, "transformer_options": {}})


def _without_options(model, kinds=("double_block", "single_block")):
    m = model.clone()
    dm = m.get_model_object("diffusion_model")
    for kind in kinds:
        for i in range(len(getattr(dm, f"{kind}s"))):
            m.set_model_patch_replace(_strip_options, "dit", kind, i)
    return m


# -- silently wrong, measured ------------------------------------------------------------------------------------

def test_reference_only_fills_every_batch_row_with_its_own_references():
    base = sc_testpack.build_model_patcher(FAMILY, seed=6)
    model = apply_sparse_context(base, _config(0.5, "reference_only"))
    inputs = forward_inputs(FAMILY, 3, (64, 48), [(96, 96)], batch=2)  # the two rows have other references
    both = run_forward(model, inputs).out
    for row in (0, 1):
        alone = run_forward(model, _rows(inputs, [row])).out
        err = (both[row] - alone[0]).abs().max().item()
        assert err < 1e-5, f"row {row} of the batch differs from its own run by {err}"


def test_a_block_patch_added_after_apply_misses_the_cross_run_store():
    family = "flux2_klein"
    base = sc_testpack.build_model_patcher(family, seed=6)
    model = apply_sparse_context(base, _config(0.5, "reference_only"))
    patch = model.model_options["transformer_options"][PATCH_KEY]
    case = _case(family)
    _sample(model, case)
    assert len(patch.store) == 1

    def scaled(args, extra):
        out = extra["original_block"](args)
        return {**out, "img": out["img"] * 1.05}

    patched = model.clone()
    patched.set_model_patch_replace(scaled, "dit", "double_block", 0)
    out = _sample(patched, case)
    assert patch.last_report["cache"]["misses"] == 1, patch.last_report["cache"]
    patch.store.clear()
    fresh = _sample(patched, case)
    assert (out - fresh).abs().max().item() < 1e-6
    again = _sample(model, case)  # the clone without the patch still hits its own entry
    assert patch.last_report["cache"]["hits"] >= 1
    assert (again - _sample(apply_sparse_context(base, _config(0.5, "reference_only")), case)).abs().max() < 1e-6


def test_forwards_outside_a_sampling_run_never_reuse_another_calls_references():
    base = sc_testpack.build_model_patcher(FAMILY, seed=6)
    config = _config(0.5, "reference_only")
    model = apply_sparse_context(base, config)
    first = forward_inputs(FAMILY, 3, (64, 48), [(96, 96)])
    second = {**first, "ref_latents": [sc_testpack.make_latent(FAMILY, 77, 96, 96)]}
    _direct(model, first)
    out = _direct(model, second)
    expected = _direct(apply_sparse_context(base, config), second)
    assert (out - expected).abs().max().item() < 1e-6


@pytest.mark.parametrize("cache", ["first_step", "reference_only"])
def test_keep_zero_with_a_cache_equals_a_run_without_references(cache):
    base = sc_testpack.build_model_patcher(FAMILY, seed=6)
    case = _case()
    out = _sample(apply_sparse_context(base, _config(0.0, cache)), case)
    positive, negative = sc_testpack.make_conditioning(FAMILY, 1), sc_testpack.make_conditioning(FAMILY, 2)
    expected = _sample(base, (positive, negative, case[2]))
    assert (out - expected).abs().max().item() < 1e-5


# -- silently wrong next to other packs: blocks called without transformer_options --------------------------------

@pytest.mark.parametrize("cache,rule", [("first_step", "grid"), ("reference_only", "grid"), ("off", "attention")])
def test_blocks_called_without_transformer_options_stop_the_run(cache, rule):
    base = sc_testpack.build_model_patcher(FAMILY, seed=6)
    model = _without_options(apply_sparse_context(base, _config(0.5, cache, rule)))
    with pytest.raises(SparseContextBypassed, match="without transformer_options"):
        _sample(model, _case())


@pytest.mark.parametrize("cache", ["first_step", "reference_only"])
def test_some_blocks_called_without_transformer_options_stop_the_run(cache):
    base = sc_testpack.build_model_patcher(FAMILY, seed=6)
    model = _without_options(apply_sparse_context(base, _config(0.5, cache)), kinds=("single_block",))
    blocks = attention_blocks(base.get_model_object("diffusion_model"))
    with pytest.raises(SparseContextBypassed, match=f"of the model's {blocks} attention blocks"):
        _sample(model, _case())


def test_plain_dropping_composes_with_blocks_called_without_transformer_options():
    base = sc_testpack.build_model_patcher(FAMILY, seed=6)
    sparse = apply_sparse_context(base, _config(0.5))
    out = _sample(_without_options(sparse), _case())
    assert (out - _sample(sparse, _case())).abs().max().item() < 1e-6


@pytest.mark.parametrize("cache", ["off", "first_step"])
def test_process_img_replaced_after_apply_warns_once_and_the_report_says_why(caplog, cache):
    base = sc_testpack.build_model_patcher(FAMILY, seed=6)
    model = apply_sparse_context(base, _config(0.5, cache)).clone()
    model.add_object_patch("diffusion_model.process_img", base.get_model_object("diffusion_model.process_img"))
    with caplog.at_level(logging.WARNING, logger="SparseContext"):
        out = _sample(model, _case())
    warnings = [r for r in caplog.records if "replaced the model's process_img" in r.getMessage()]
    assert len(warnings) == 1
    report = model.model_options["transformer_options"][PATCH_KEY].last_report
    assert "process_img" in report["dense_reason"]
    assert (out - _sample(base, _case())).abs().max().item() < 1e-6  # it really ran dense


# -- threads (core's MultiGPU runs forwards of one model in several threads) ----------------------------------------

def test_two_threads_forwarding_one_patched_model_each_get_their_own_tokens():
    base = sc_testpack.build_model_patcher(FAMILY, seed=6)
    model = apply_sparse_context(base, _config(0.5))
    patch = model.model_options["transformer_options"][PATCH_KEY]
    inputs = [forward_inputs(FAMILY, 3, (64, 48), [(96, 96)]), forward_inputs(FAMILY, 5, (64, 48), [(64, 80), (48, 48)])]
    run = patch.new_run()
    with patched_diffusion_model(model) as (dm, base_options), torch.no_grad():
        def call(i):
            return dm(**inputs[i], transformer_options={**base_options, RUN_KEY: run})

        expected = [call(0), call(1)]
        barrier, errors = threading.Barrier(2), []

        def worker(i):
            barrier.wait()
            for _ in range(6):
                errors.append((call(i) - expected[i]).abs().max().item())

        threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(errors) == 12 and max(errors) < 1e-6, errors


def test_cache_modes_refuse_forwards_from_several_threads_and_core_multigpu():
    base = sc_testpack.build_model_patcher(FAMILY, seed=6)
    model = apply_sparse_context(base, _config(0.5, "first_step"))
    patch = model.model_options["transformer_options"][PATCH_KEY]
    inputs = forward_inputs(FAMILY, 3, (64, 48), [(96, 96)])
    run = patch.new_run()
    _forward(model, inputs, run)
    failures = []
    thread = threading.Thread(target=lambda: failures.append(pytest.raises(ValueError, _forward, model, inputs, run)))
    thread.start()
    thread.join()
    assert failures and "several" in str(failures[0].value)
    with pytest.raises(ValueError, match="MultiGPU"):
        _forward(model, inputs, patch.new_run(), multigpu_thread_device=torch.device("cpu"))


# -- hidden memory ------------------------------------------------------------------------------------------------

def _estimate(model, case) -> float:
    """Core's minimum memory estimate (bytes, one batch) of a real sampling run."""
    return memory_estimate(model, lambda m: _sample(m, case, steps=2))[1]


def _tensor_bytes(obj, seen=None) -> int:
    """Bytes of the distinct tensor storages reachable from ``obj``'s attributes, dicts, lists and tuples."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        ptr = obj.untyped_storage().data_ptr()
        if ptr in seen:
            return 0
        seen.add(ptr)
        return obj.untyped_storage().nbytes()
    if id(obj) in seen or isinstance(obj, (str, bytes, int, float, torch.nn.Module)):
        return 0
    seen.add(id(obj))
    if isinstance(obj, dict):
        return sum(_tensor_bytes(k, seen) + _tensor_bytes(v, seen) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return _tensor_bytes(vars(obj), seen) if hasattr(obj, "__dict__") else 0


@pytest.mark.parametrize("cache", ["first_step", "reference_only"])
def test_a_cached_run_holds_its_entries_and_one_join_buffer_and_tells_the_estimate(cache):
    base = sc_testpack.build_model_patcher(FAMILY, seed=6)
    model = apply_sparse_context(base, _config(0.5, cache, cache_mib=0.0))
    patch = model.model_options["transformer_options"][PATCH_KEY]
    inputs = forward_inputs(FAMILY, 3, (64, 48), [(96, 96), (64, 64)])
    run = patch.new_run()
    for _ in range(3):
        _forward(model, inputs, run)
    entries = sum(e.nbytes for e in run.cached.entries.values())
    text, target = inputs["context"].shape[1], 4 * 3
    kept = sum(p.kept for p in run.last_plans)
    width = base.get_model_object("diffusion_model").hidden_size
    one_block = 2 * (text + target + kept) * width * 4  # the keys and values of one block's joint sequence
    assert entries > 0
    assert _tensor_bytes(run.cached) <= entries + one_block + 4096  # (+ the kept indices)
    case = _case()
    held = _estimate(model, case) - _estimate(apply_sparse_context(base, _config(0.5)), case)
    _sample(model, case, steps=2)
    report = patch.last_report["cache"]
    assert held >= report["mib"] * 2**20 > 0, (held, report)
    assert report["estimate_mib"] * 2**20 <= held


def test_the_cross_run_store_holds_final_entries_only_on_the_offload_device():
    family = "flux2_klein"
    base = sc_testpack.build_model_patcher(family, seed=6)
    model = apply_sparse_context(base, _config(0.3, "reference_only", rule="attention"))
    patch = model.model_options["transformer_options"][PATCH_KEY]
    _sample(model, _case(family), cfg=1.0)
    kept = [r["kept"] for r in patch.last_report["references"]]
    stored = patch.store.entries()
    assert len(stored) == 1 and list(stored[0].counts) == kept  # not the keep-all entry that measured attention
    assert all(k.device == torch.device(base.offload_device) for k, _ in stored[0].blocks.values())
    assert SparseContextConfig().cache_mib <= 1024


# -- smaller items ------------------------------------------------------------------------------------------------

def test_attention_mass_takes_qwens_three_dimensional_masks_at_batch_two():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 10, 8, generator=gen), torch.randn(2, 4, 14, 8, generator=gen)
    mask = torch.zeros(2, 10, 14)
    mask[1, :, -2:] = float("-inf")
    mass = reference_attention_mass(q, k, (0, 10), 4, mask)
    per_row = [reference_attention_mass(q[i:i + 1], k[i:i + 1], (0, 10), 4, mask[i:i + 1, None]) for i in (0, 1)]
    assert torch.allclose(mass, per_row[0] + per_row[1])
    assert per_row[1][-2:].abs().max() == 0


def test_the_override_leaves_the_options_as_it_found_them_and_keeps_positional_arguments():
    base = sc_testpack.build_model_patcher(FAMILY, seed=6)
    model = apply_sparse_context(base, _config(0.5, "reference_only"))
    inputs = forward_inputs(FAMILY, 3, (64, 48), [(96, 96)])
    with patched_diffusion_model(model) as (dm, base_options), torch.no_grad():
        options = dict(base_options)
        dm(**inputs, transformer_options=options)
    assert OVERRIDE not in options
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=gen) for _ in range(3))
    expected = attention.attention_pytorch(q, k, v, 2, None, None, True)
    got = CacheAttention()(attention.attention_pytorch, q, k, v, 2, None, None, True)
    assert torch.equal(got, expected)


def test_the_reference_only_fill_runs_through_the_users_own_override():
    base = sc_testpack.build_model_patcher(FAMILY, seed=6)
    model = apply_sparse_context(base, _config(0.5, "reference_only"))
    probe = AttentionProbe()
    inputs = forward_inputs(FAMILY, 3, (64, 48), [(96, 96)])
    with patched_diffusion_model(model) as (dm, base_options), torch.no_grad():
        dm(**inputs, transformer_options={**base_options, OVERRIDE: probe})
    blocks = attention_blocks(base.get_model_object("diffusion_model"))
    assert len(probe.lengths) == 2 * blocks  # the fill forward and the cached step


def test_first_step_records_a_new_entry_without_recording_the_others_again():
    base = sc_testpack.build_model_patcher(FAMILY, seed=6)
    model = apply_sparse_context(base, _config(0.5, "first_step"))
    patch = model.model_options["transformer_options"][PATCH_KEY]
    both = forward_inputs(FAMILY, 3, (64, 48), [(96, 96)], batch=2)
    a, b = _rows(both, [0]), _rows(both, [1])
    run = patch.new_run()
    _forward(model, a, run, uuids=["a"])
    recorded = run.cached.entries["a"]
    out = _forward(model, both, run, uuids=["a", "b"])  # "b" joins mid-run (e.g. a timestep-ranged conditioning)
    assert run.cached.entries["a"] is recorded
    cached_a = _forward(model, a, run, uuids=["a"])
    recorded_b = _forward(model, b, patch.new_run(), uuids=["b"])
    assert (out[0] - cached_a[0]).abs().max().item() < 1e-6
    assert (out[1] - recorded_b[0]).abs().max().item() < 1e-6


def test_calibrate_does_not_report_on_the_apply_node(caplog):
    base = sc_testpack.build_model_patcher(FAMILY, seed=1)
    applied = SparseContextApply.execute(base, 0.5, "grid", 0, 1, 0.0, 1.0, 0, True).result[0]
    refs = [sc_testpack.make_latent(FAMILY, 10, 128, 128)]
    positive = with_references(sc_testpack.make_conditioning(FAMILY, 3), refs)
    latent = {"samples": torch.zeros_like(sc_testpack.make_latent(FAMILY, 5, 64, 64))}
    with caplog.at_level(logging.INFO, logger="SparseContext"):
        SparseContextCalibrate.execute(applied, positive, latent, 7, 20.0, keep_ratios="0.25, 0.5", steps=1)
    assert "No reference images reached the model" not in caplog.text
    assert "SparseContext (node" not in caplog.text  # Calibrate's runs are its own, not the Apply node's


def test_the_default_keep_is_where_the_evidence_says_to_start():
    assert SparseContextConfig().budget.ratio == 0.5
    keep = next(i for i in SparseContextApply.define_schema().inputs if i.id == "keep_ratio")
    assert keep.default == 0.5 and "0.5" in keep.tooltip
