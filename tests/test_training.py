"""The drop-robust fine-tune and its LoRA files, on tiny REAL ComfyUI models (CPU, seeded).

Run: ``.venv/bin/pytest tests/test_training.py -q -x -s`` (``-s`` prints the measured losses).
"""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
from pathlib import Path

import comfy.ops  # ComfyUI is importable: conftest put it on sys.path
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from sc_harness.host import REPO
from sc_harness.skips import family_param

FAMILY = "flux1_kontext"
API_WORKFLOW = REPO / "tests" / "workflows_api" / "sparse_train_lora.json"
UI_WORKFLOW = REPO / "workflows" / "sparse_train_lora.json"


pytestmark = pytest.mark.usefixtures("one_thread")


def _training():
    import sparse_context.training as training

    return training


def _task(n: int, first_seed: int) -> list:
    """Synthetic reference task: the target is the reference with a fixed channel permutation."""
    import sc_testpack

    tr = _training()
    context, extra = sc_testpack.make_conditioning(FAMILY, 5)[0]
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    out = []
    for i in range(n):
        ref = sc_testpack.make_latent(FAMILY, first_seed + i, 64, 64) / 0.3611 + 0.1159  # ~unit scale after process_in
        out.append(tr.TrainingExample(target=ref[:, perm].clone(), references=[ref], context=context,
                                      pooled=extra["pooled_output"]))
    return out


def _trainer(model_seed: int = 0, dtype=torch.float32, family: str = FAMILY, base_dtype=None, **train):
    """A trainer on a tiny model; ``base_dtype`` stores the weights in that dtype (fp8) and computes in ``dtype``."""
    import sc_testpack

    tr = _training()
    if base_dtype is not None:
        mp = sc_testpack.build_model_patcher(family, model_seed, dtype=base_dtype, manual_cast=dtype)
    else:
        mp = sc_testpack.build_model_patcher(family, model_seed, dtype=dtype)
    config = tr.TrainConfig(lora_dtype=dtype, **train)
    return mp, tr.LoraTrainer(mp, tr.LoraConfig(rank=4, alpha=4.0), config)


def _example(family: str):
    """One example of ``family`` with one 4x4-token reference (FLUX.1: the permutation task)."""
    import sc_testpack

    if family == FAMILY:
        return _task(1, 100)[0]
    context, extra = sc_testpack.make_conditioning(family, 5)[0]
    ref = sc_testpack.make_latent(family, 3, 64, 64)
    return _training().TrainingExample(ref.flip(1).clone(), [ref], context, extra["pooled_output"])


def _graph_nodes(loss: torch.Tensor, name: str) -> int:
    """How many autograd nodes called ``name`` the graph of ``loss`` holds."""
    seen, stack, count = set(), [loss.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count += type(node).__name__ == name
        stack.extend(fn for fn, _ in node.next_functions)
    return count


def _check_against_forward_ad(trainer, example, keep: float = 0.5) -> tuple[dict, int]:
    """Backward of the trainer's loss vs forward-mode AD, one random direction per LoRA module (float64).
    Returns ({module: (backward, forward-AD)}, number of checkpointed blocks in the graph)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a LoRA with both factors non-zero, so every factor has a gradient
        for p in trainer.lora.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    params = list(trainer.lora.parameters())
    out = {}
    with trainer.session():
        loss = trainer.loss(example, keep_ratio=keep, seed=3, sigma=0.4)
        checkpointed = _graph_nodes(loss, "_CheckpointedBlockBackward")
        loss.backward(inputs=params)
        grads = {id(p): p.grad.detach().clone() for p in params}
        for name, delta in trainer.lora.deltas.items():
            tangents = {n: torch.randn(getattr(delta, n).shape, generator=gen, dtype=torch.float64)
                        for n in ("lora_down", "lora_up")}
            expected = sum(float((grads[id(getattr(delta, n))] * t).sum()) for n, t in tangents.items())
            saved = {n: delta._parameters.pop(n) for n in tangents}  # dual tensors in place of the parameters
            try:
                with torch.no_grad(), fwAD.dual_level():
                    for n, t in tangents.items():
                        setattr(delta, n, fwAD.make_dual(saved[n].detach(), t))
                    tangent = fwAD.unpack_dual(trainer.loss(example, keep, seed=3, sigma=0.4)).tangent
                    jvp = 0.0 if tangent is None else float(tangent)  # None: the loss does not depend on it
            finally:
                for n, p in saved.items():
                    delattr(delta, n)
                    delta._parameters[n] = p
            out[name] = (expected, jvp)
    return out, checkpointed


# -- gradients ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family, checkpointing, base_dtype", [
    (FAMILY, False, None), (FAMILY, True, None), ("flux2_klein", True, None), ("qwen_image_edit", True, None),
    (FAMILY, True, torch.float8_e4m3fn), (FAMILY, False, torch.float8_e4m3fn),
])
def test_gradients_match_forward_mode_ad_with_sparse_references(family, checkpointing, base_dtype):
    _, trainer = _trainer(dtype=torch.float64, family=family, base_dtype=base_dtype,
                          gradient_checkpointing=checkpointing)
    checked, checkpointed = _check_against_forward_ad(trainer, _example(family))
    [ref] = trainer.last_report["references"]
    assert ref["kept"] == ref["tokens"] // 2, trainer.last_report  # the inference patch dropped half
    for name, (backward, jvp) in checked.items():
        print(f"{family} checkpointing={checkpointing} base={base_dtype}: {name}: backward {backward:+.10f}  "
              f"forward-AD {jvp:+.10f}")
        assert backward == pytest.approx(jvp, rel=1e-5, abs=1e-10), name  # RoPE runs in float32
    assert len(checked) == len(trainer.lora.deltas)
    # every module has a signal to compare, but the text stream of Qwen's last block (its output is unused)
    assert sum(abs(jvp) > 1e-6 for _, jvp in checked.values()) >= 8
    # checkpointing on: one recomputing node per transformer block in the graph (Flux 1 + 1, Qwen 1); off: none
    assert checkpointed == ((1 if family == "qwen_image_edit" else 2) if checkpointing else 0)


def test_without_checkpointing_the_graph_needs_cloned_saved_tensors():
    """Why the trainer records the graph with cloned saved tensors when it does not checkpoint: ComfyUI's
    blocks add residuals in place."""
    _, trainer = _trainer(dtype=torch.float64, gradient_checkpointing=False)
    with trainer.session(), pytest.raises(RuntimeError, match="inplace"):
        trainer.loss(_example(FAMILY), 0.5, seed=3, sigma=0.4, clone_saved=False).backward()


def test_lora_on_an_fp8_base_is_exact_for_the_fp8_weights_upcast():
    """Training on an fp8 base computes with the fp8 values upcast, LoRA added after the cast: the loss equals
    that of a float64 model holding exactly those values, with the same LoRA."""
    import sc_testpack

    tr = _training()
    fp8 = sc_testpack.build_model_patcher(FAMILY, 0, dtype=torch.float8_e4m3fn, manual_cast=torch.float64)
    wide = sc_testpack.build_model_patcher(FAMILY, 0, dtype=torch.float64)
    full = sc_testpack.build_model_patcher(FAMILY, 0, dtype=torch.float64)  # unrounded weights
    fp8_weights = fp8.model.diffusion_model.state_dict()
    assert {v.dtype for v in fp8_weights.values()} == {torch.float8_e4m3fn}
    wide.model.diffusion_model.load_state_dict({k: v.double() for k, v in fp8_weights.items()})
    config = tr.TrainConfig(lora_dtype=torch.float64)
    a, b, c = (tr.LoraTrainer(m, tr.LoraConfig(rank=4, alpha=4.0), config) for m in (fp8, wide, full))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p, q, r in zip(a.lora.parameters(), b.lora.parameters(), c.lora.parameters(), strict=True):
            p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            q.copy_(p)
            r.copy_(p)
        example = _example(FAMILY)
        la, lb, lc = (float(t.loss(example, 0.5, seed=3, sigma=0.4)) for t in (a, b, c))
    print(f"\nloss with LoRA: fp8 base {la:.12f}, its values in float64 {lb:.12f}, unrounded float64 base {lc:.12f}")
    assert la == pytest.approx(lb, rel=1e-12)
    assert abs(la - lc) > 1e-6  # the comparison can tell fp8 rounding apart


# -- low-precision and quantized bases ----------------------------------------------------------------------------
@pytest.mark.parametrize("lora_dtype", [torch.bfloat16, torch.float32])
def test_fp8_base_trains_and_its_lora_loads_through_core(lora_dtype, tmp_path):
    """An fp8 base (ComfyUI's fp8_e4m3fn weight dtype, computing in float32 here): the LoRA trains, and core's
    loader merges the saved file onto the fp8 weights (to within fp8 rounding of W + delta)."""
    import comfy.lora
    import comfy.sd
    import sc_testpack

    tr = _training()
    mp = sc_testpack.build_model_patcher(FAMILY, 0, dtype=torch.float8_e4m3fn, manual_cast=torch.float32)
    trainer = tr.LoraTrainer(mp, tr.LoraConfig(rank=4, alpha=4.0),
                             tr.TrainConfig(steps=5, learning_rate=5e-2, lora_dtype=lora_dtype))
    losses = trainer.fit(_task(2, 100), progress=False)
    assert len(losses) == 5 and all(math.isfinite(v) for v in losses)
    assert {p.dtype for p in trainer.lora.parameters()} == {lora_dtype}
    sd, _ = tr.load_lora_file(trainer.save(tmp_path / "fp8.safetensors"))
    assert len(comfy.lora.load_lora(sd, comfy.lora.model_lora_keys_unet(mp.model, {}), log_missing=False)) == 10
    patched, _ = comfy.sd.load_lora_for_models(mp, None, sd, 1.0, 0)
    with torch.inference_mode():  # as inside a ComfyUI run
        patched.patch_model()
        merged = {k: v.clone() for k, v in patched.model.diffusion_model.state_dict().items()}
        patched.unpatch_model()
    base = mp.model.diffusion_model.state_dict()
    for name, delta in trainer.lora.deltas.items():
        key = f"{name}.weight"
        assert merged[key].dtype == torch.float8_e4m3fn
        wanted = base[key].float() + delta.delta().detach().float()
        size = delta.delta().detach().float().abs().mean()
        assert (merged[key].float() - wanted).abs().mean() < 0.25 * size, name  # the unmerged base is 1.0 * size off


class OwnKernelOps(comfy.ops.manual_cast):
    """Ops as custom-quantization packs (ComfyUI-GGUF) make them: a core op whose forward computes from its own
    copy of the weight, never applying ComfyUI's weight function."""

    class Linear(comfy.ops.manual_cast.Linear):
        def forward(self, input):
            bias = None if self.bias is None else self.bias.to(input.dtype)
            return torch.nn.functional.linear(input, self.weight.to(input.dtype), bias)


@pytest.mark.parametrize("ops", ["own_kernel", "scaled_fp8"])
def test_layers_that_bypass_the_weight_function_are_refused_before_the_first_step(ops):
    """A core op subclass with its own weight path (as GGUF's), and core's own scaled-fp8 ops of hosts that
    apply the weight function BEFORE the scale (the LoRA would train against other weights than inference's)."""
    import sc_testpack

    tr = _training()
    if ops == "scaled_fp8":
        if not hasattr(comfy.ops, "scaled_fp8_ops"):
            # 0.10+ has no scaled-fp8 op class to build a model from: such files load as quantized tensors, which
            # the trainer's per-layer gradient check decides on at run time (the own_kernel case tests that check).
            pytest.skip("this ComfyUI has no scaled_fp8_ops (scaled fp8 files load as quantized tensors there)")
        mp = sc_testpack.build_model_patcher(FAMILY, 0, dtype=torch.float8_e4m3fn, manual_cast=torch.float32,
                                             operations=comfy.ops.scaled_fp8_ops())
        kind = "scaled_fp8_op.Linear"
    else:
        mp, kind = sc_testpack.build_model_patcher(FAMILY, 0, operations=OwnKernelOps), "OwnKernelOps.Linear"
    trainer = tr.LoraTrainer(mp, tr.LoraConfig(rank=4, alpha=4.0), tr.TrainConfig(steps=3))
    before = trainer.lora_state_dict()
    with pytest.raises(ValueError) as info:
        trainer.fit(_task(2, 100), progress=False)
    message = str(info.value)
    print("\n" + message)
    assert message.startswith("model: 10 of 10 layers the LoRA adapts compute without ComfyUI's weight function")
    assert kind in message and "GGUF" in message and "weight_dtype" in message
    assert trainer.step == 0 and trainer.losses == []
    after = trainer.lora_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# -- what training leaves alone ---------------------------------------------------------------------------------
def test_training_leaves_the_shared_model_and_other_loaded_models_alone():
    import logging

    import comfy.model_management as mm
    import sc_testpack

    with torch.inference_mode():  # as a loader node makes them: inference tensors
        mp = sc_testpack.build_model_patcher(FAMILY, 0)
        other = sc_testpack.build_model_patcher("flux2_klein", 0)
    dm = mp.model.diffusion_model
    state = {n: (t, t.is_inference(), t.requires_grad, t.clone()) for n, t in
             list(dm.named_parameters()) + list(dm.named_buffers())}
    process_img = dm.process_img
    mm.load_models_gpu([other])
    try:
        trainer = _training().LoraTrainer(mp, _training().LoraConfig(rank=4, alpha=4.0),
                                          _training().TrainConfig(steps=2))
        trainer.fit(_task(2, 100), progress=False)
        assert any(m.model is other for m in mm.current_loaded_models)  # not unloaded for training
        assert not any(m.model is trainer.model for m in mm.current_loaded_models)  # the training clone is
    finally:
        mm.free_memory(1e30, other.load_device, keep_loaded=[m for m in mm.current_loaded_models if m.model is not other])
    now = dict(list(dm.named_parameters()) + list(dm.named_buffers()))
    for n, (t, inference, grad, value) in state.items():
        assert now[n] is t and t.is_inference() == inference and t.requires_grad == grad and t.grad is None, n
        assert torch.equal(now[n], value), n
    assert dm.process_img == process_img
    assert all(not getattr(m, "weight_function", []) and not getattr(m, "bias_function", []) for m in dm.modules())
    assert logging.getLogger("SparseContext.training").level == logging.NOTSET  # no logger set up on import
    assert logging.getLogger("SparseContext").level == logging.NOTSET


# -- a short training run --------------------------------------------------------------------------------------
def test_training_with_dropping_lowers_the_sparse_loss_and_keeps_the_dense_loss():
    tr = _training()
    train, held_out = _task(16, 100), _task(6, 1000)
    _, trainer = _trainer(model_seed=0, steps=200, learning_rate=1e-3, seed=1,
                          keep_ratios=tr.KeepRatioDistribution(low=0.1, high=1.0, dense_share=0.1))
    with trainer.session():
        before_sparse, before_dense = trainer.evaluate(held_out, 0.25), trainer.evaluate(held_out, 1.0)
        losses = trainer.fit(train, progress=False)
        after_sparse, after_dense = trainer.evaluate(held_out, 0.25), trainer.evaluate(held_out, 1.0)
    print(f"\nheld-out loss, keep 0.25: untuned {before_sparse:.4f} -> tuned {after_sparse:.4f}")
    print(f"held-out loss, dense:     untuned {before_dense:.4f} -> tuned {after_dense:.4f}")
    print(f"training loss: first 10 steps {sum(losses[:10]) / 10:.4f}, last 10 {sum(losses[-10:]) / 10:.4f}")
    assert len(losses) == 200 and trainer.step == 200
    assert after_sparse < 0.8 * before_sparse
    assert after_dense <= before_dense * 1.02  # tolerance: the dense loss may not get more than 2 % worse


def test_checkpoint_resume_continues_exactly(tmp_path):
    train = _task(3, 100)
    _, straight = _trainer(steps=6, learning_rate=1e-3)
    straight.fit(train, progress=False)
    _, first = _trainer(steps=6, learning_rate=1e-3)
    first.fit(train, steps=3, progress=False)
    ckpt = first.save_checkpoint(tmp_path / "ckpt.safetensors")
    _, resumed = _trainer(steps=6, learning_rate=1e-3)
    resumed.load_checkpoint(ckpt)
    assert resumed.step == 3
    resumed.fit(train, progress=False)
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-5)
    a, b = straight.lora_state_dict(), resumed.lora_state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


LORA_FAMILY = {"flux2_klein": "flux2", "qwen_image_edit": "qwen_image", "mage_flow": "mage_flow", "krea2": "krea2",
               "longcat_image_edit": "longcat_image", "z_image_omni": "z_image", "z_image_pixel": "z_image_pixel"}


@pytest.mark.parametrize("family", ["flux2_klein", "qwen_image_edit", *map(family_param, ["mage_flow", "krea2",
                                                                                      "longcat_image_edit",
                                                                                      "z_image_omni", "z_image_pixel"])])
def test_other_families_train_with_two_sparse_references(family, tmp_path):
    import sc_testpack

    tr = _training()
    mp = sc_testpack.build_model_patcher(family, 0)
    context, extra = sc_testpack.make_conditioning(family, 1)[0]
    d = sc_testpack.SPECS[family].pixels_per_token
    ref = sc_testpack.make_latent(family, 3, 4 * d, 4 * d)  # 16 tokens, then 8
    method = "index" if family == "krea2" else None  # Krea 2 appends references only with a method
    example = tr.TrainingExample(ref.flip(1).clone(), [ref, sc_testpack.make_latent(family, 4, 2 * d, 4 * d)], context,
                                 extra["pooled_output"], reference_method=method)
    hooked = family not in ("krea2", "z_image_omni", "z_image_pixel")  # core has no block-replacement hook for these
    if not hooked:
        with pytest.raises(ValueError, match="gradient_checkpointing: ComfyUI calls this model's transformer blocks"):
            tr.LoraTrainer(mp, tr.LoraConfig(rank=2, alpha=2.0, targets="attention"), tr.TrainConfig(steps=2))
    trainer = tr.LoraTrainer(mp, tr.LoraConfig(rank=2, alpha=2.0, targets="attention"),
                             tr.TrainConfig(steps=2, keep_ratios=tr.KeepRatioDistribution(kind="fixed", low=0.5,
                                                                                          dense_share=0.0),
                                            gradient_checkpointing=hooked))
    losses = trainer.fit([example], progress=False)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert [r["kept"] for r in trainer.last_report["references"]] == [8, 4]  # half of 16 and of 8 tokens
    sd, meta = tr.load_lora_file(trainer.save(tmp_path / "l.safetensors"))
    assert meta.family == LORA_FAMILY[family]
    assert tr.match_lora(mp, sd).ok and len(tr.match_lora(mp, sd).matched) == len(trainer.lora.deltas) > 0


# -- LoRA files -------------------------------------------------------------------------------------------------
@pytest.fixture
def loras_folder(tmp_path, monkeypatch):
    import folder_paths

    folder = tmp_path / "loras"
    folder.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras",
                        ([str(folder)], folder_paths.supported_pt_extensions))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    return folder


@pytest.fixture
def trained(loras_folder):
    """A tiny trained LoRA saved in the loras folder, and its trainer."""
    mp, trainer = _trainer(steps=5, learning_rate=1e-2)
    trainer.fit(_task(2, 100), progress=False)
    path = trainer.save(loras_folder / "tiny_kontext.safetensors")
    return mp, trainer, path


def _patched_state(model_patcher) -> dict:
    model_patcher.patch_model()
    try:
        return {k: v.detach().clone() for k, v in model_patcher.model.diffusion_model.state_dict().items()}
    finally:
        model_patcher.unpatch_model()


def test_saved_lora_loads_with_the_pack_loader_and_core_alike(trained):
    import comfy.lora
    import sc_testpack
    from sparse_context.nodes.lora_loader import SparseContextLoraLoader
    from sparse_context.sparse_attention import RUN_KEY

    import nodes as core_nodes

    mp, trainer, path = trained
    tr = _training()
    sd, meta = tr.load_lora_file(path)
    # metadata round trip
    assert meta.is_sparse_context and meta.family == "flux1" and meta.rank == 4 and meta.alpha == 4.0
    assert meta.steps == 5 and meta.recommended_keep_ratio == 0.25 and meta.pack_version == tr.lora_file.pack_version() != "unknown"
    assert meta.keep_ratio_distribution == {"kind": "uniform", "low": 0.1, "high": 1.0, "dense_share": 0.1}
    assert meta.targets == trainer.lora.patterns and meta.architecture["hidden_size"] == 32
    # core's key map takes every key
    key_map = comfy.lora.model_lora_keys_unet(mp.model, {})
    loaded = comfy.lora.load_lora(sd, key_map, log_missing=False)
    assert len(loaded) == len(trainer.lora.deltas) == 10
    assert tr.match_lora(mp, sd).ok and not tr.match_lora(mp, sd).missing

    out = SparseContextLoraLoader.execute(mp, "tiny_kontext.safetensors", 1.0)
    pack_model, keep, info = out.args
    assert keep == 0.25 and "10 layers matched, 0 missing" in info and "family flux1" in info
    (core_model,) = core_nodes.LoraLoaderModelOnly().load_lora_model_only(mp, "tiny_kontext.safetensors", 1.0)
    a, b, base = _patched_state(pack_model), _patched_state(core_model), _patched_state(mp)
    changed = [k for k in a if not torch.equal(a[k], base[k])]
    assert len(changed) == 10 and all(torch.equal(a[k], b[k]) for k in a)
    for name, delta in trainer.lora.deltas.items():  # = W + alpha / rank * up @ down, as trained
        key = f"{name}.weight"
        assert torch.allclose(a[key], base[key] + delta.delta().detach(), atol=1e-6)

    # the model the loader returns computes what the trainer's weight wrappers computed
    import sc_harness.forward as fwd

    inputs = fwd.forward_inputs(FAMILY, 7, (64, 64), [(64, 64)])
    with trainer.session(), torch.no_grad():
        options = dict(trainer._options)
        options[RUN_KEY] = tr.sparse_run_for(1.0, 0)
        trained_out = trainer._dm(**inputs, transformer_options=options)
    loaded_out = fwd.run_forward(pack_model, inputs).out
    base_out = fwd.run_forward(sc_testpack.build_model_patcher(FAMILY, 0), inputs).out
    assert torch.allclose(trained_out, loaded_out, atol=1e-5)
    assert not torch.allclose(base_out, loaded_out, atol=1e-5)


def test_loader_refuses_pickle_corrupt_and_foreign_files(trained, loras_folder):
    import sc_testpack
    from sparse_context.nodes.common import SparseContextInputError
    from sparse_context.nodes.lora_loader import SparseContextLoraLoader

    mp, trainer, path = trained
    sd = trainer.lora_state_dict()
    torch.save(dict(sd), loras_folder / "pickled.pt")  # a plain dict, pickled
    (loras_folder / "pickle_named.safetensors").write_bytes((loras_folder / "pickled.pt").read_bytes())
    (loras_folder / "truncated.safetensors").write_bytes(path.read_bytes()[:200])
    (loras_folder / "raw_pickle.safetensors").write_bytes(pickle.dumps({"a": 1}))

    def error(name: str, model=mp) -> str:
        with pytest.raises(SparseContextInputError) as info:
            SparseContextLoraLoader.execute(model, name, 1.0)
        message = str(info.value)
        assert message.startswith("Load Sparse Context LoRA: lora_name:"), message
        return message

    assert "not a .safetensors file" in error("pickled.pt")
    for name in ("pickle_named.safetensors", "truncated.safetensors", "raw_pickle.safetensors"):
        assert "not a valid safetensors file" in error(name)
    # a LoRA of the same layer names for another base model family: refused by its metadata...
    assert "trained for FLUX.1 (dev / Kontext), but the model is FLUX.2 (dev / klein)" in error(
        "tiny_kontext.safetensors", sc_testpack.build_model_patcher("flux2_klein", 0))
    # ...and, without metadata, by its shapes (FLUX.2's MLPs are wider) or its keys (Qwen-Image's names)
    from safetensors.torch import save_file

    save_file(sd, str(loras_folder / "no_metadata.safetensors"))
    assert "does not fit this model" in error("no_metadata.safetensors", sc_testpack.build_model_patcher("flux2_klein", 0))
    assert "does not fit this model" in error("no_metadata.safetensors", sc_testpack.build_model_patcher("qwen_image_edit", 0))
    # a generic LoRA (no metadata) on the right model: applied, keep ratio 1.0 (not trained with dropping)
    _, keep, info = SparseContextLoraLoader.execute(mp, "no_metadata.safetensors", 1.0).args
    assert keep == 1.0 and "no Sparse Context metadata" in info


def test_training_example_files_round_trip(tmp_path):
    tr = _training()
    [example] = _task(1, 100)
    example.guidance = 2.5
    example.reference_method = "offset"
    path = tr.save_example(tmp_path / "ex_0001.safetensors", example, prompt="recolour")
    [back] = tr.load_example_folder(tmp_path)
    assert torch.equal(back.target, example.target) and torch.equal(back.references[0], example.references[0])
    assert torch.equal(back.context, example.context) and torch.equal(back.pooled, example.pooled)
    assert back.guidance == 2.5 and back.reference_method == "offset" and back.meta == {"prompt": "recolour"}
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable safetensors training example"):
        tr.load_example(path)


# -- the shipped training workflow on the real server ------------------------------------------------------------------
def swap_for_tiny(prompt: dict, steps: int = 4) -> dict:
    """The shipped API prompt with its real loaders / encoders / VAE replaced by the test pack's tiny nodes."""
    p = copy.deepcopy(prompt)
    seeds = iter(range(200, 10_000))
    for node_id, node in list(p.items()):
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "UNETLoader":
            p[node_id] = {"class_type": "SCTest_TinyModel", "inputs": {"family": FAMILY, "seed": 1}}
        elif kind in ("DualCLIPLoader", "VAELoader", "LoadImage", "FluxKontextImageScale"):
            del p[node_id]
        elif kind == "CLIPTextEncode":
            p[node_id] = {"class_type": "SCTest_Conditioning", "inputs": {"family": FAMILY, "seed": next(seeds), "tokens": 8}}
        elif kind == "VAEEncode":
            p[node_id] = {"class_type": "SCTest_Latent", "inputs": {"family": FAMILY, "seed": next(seeds), "width": 64,
                                                                    "height": 64, "batch_size": 1, "empty": False}}
        elif kind == "VAEDecode":
            p[node_id] = {"class_type": "SCTest_LatentToImage", "inputs": {"samples": inputs["samples"]}}
        elif kind == "KSampler":
            inputs["steps"] = 2
        elif kind == "SparseContextTrainLora":
            inputs["steps"] = steps
            inputs["filename_prefix"] = "sparse_context_test/tiny"
        elif kind == "SparseContextApply":
            inputs["bucket"] = 1
    return p


@pytest.mark.server
def test_training_workflow_runs_on_the_server_and_its_lora_loads(server):
    prompt = swap_for_tiny(json.loads(API_WORKFLOW.read_text(encoding="utf-8")))
    assert {"SparseContextTrainLora", "SparseContextApply", "KSampler"} <= {n["class_type"] for n in prompt.values()}
    entry = server.run(prompt, timeout=600)
    loras = sorted((server.tmp / "output" / "loras" / "sparse_context_test").glob("tiny_*.safetensors"))
    assert len(loras) == 1, f"no LoRA in the server's output folder: {list((server.tmp / 'output').rglob('*'))}"
    tr = _training()
    sd, meta = tr.load_lora_file(loras[0])
    assert meta.family == "flux1" and meta.steps == 4 and all(v.dtype == torch.bfloat16 for k, v in sd.items()
                                                                 if not k.endswith(".alpha"))
    train_id = next(k for k, n in prompt.items() if n["class_type"] == "SparseContextTrainLora")
    ui = entry["outputs"][train_id]
    assert ui["images"] and "Saved output/loras/sparse_context_test/tiny_" in ui["text"][0]
    assert not (Path(os.path.expanduser("~")) / "ComfyUI" / "models" / "loras" / loras[0].name).exists()

    # the loader finds it in output/loras (a loras folder of ComfyUI) and its keep ratio drives Apply Sparse Context
    use = {k: v for k, v in prompt.items()
           if k != train_id and not any(val == [train_id, 3] for val in v["inputs"].values())}  # no loss curve
    model_id = next(k for k, n in prompt.items() if n["class_type"] == "SCTest_TinyModel")
    use["loader"] = {"class_type": "SparseContextLoraLoader",
                     "inputs": {"model": [model_id, 0], "lora_name": f"sparse_context_test/{loras[0].name}",
                                "strength": 1.0}}
    apply_id = next(k for k, n in use.items() if n["class_type"] == "SparseContextApply")
    assert use[apply_id]["inputs"]["model"] == [train_id, 0]
    use[apply_id]["inputs"].update(model=["loader", 0], keep_ratio=["loader", 1], rule="random")
    start = server.log_path.stat().st_size
    server.run(use, timeout=300)
    log = server.log_path.read_bytes()[start:].decode("utf-8", errors="replace")
    assert "10 layers matched, 0 missing" in log
    assert "SparseContext: kept reference tokens #1 4/16 (random)" in log  # keep 0.25 from the LoRA's metadata


def test_shipped_workflow_files_match():
    ui = json.loads(UI_WORKFLOW.read_text(encoding="utf-8"))
    kinds = {n["type"] for n in ui["nodes"]}
    assert {"SparseContextTrainLora", "SparseContextApply", "MarkdownNote", "UNETLoader"} <= kinds
    api = json.loads(API_WORKFLOW.read_text(encoding="utf-8"))
    assert {n["class_type"] for n in api.values()} == kinds - {"MarkdownNote"}


def test_save_training_example_node_writes_files_the_cli_reads(tmp_path, monkeypatch):
    import folder_paths
    import sc_testpack
    from sparse_context.nodes.train import SparseContextSaveTrainingExample

    tr = _training()
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path))
    ref = sc_testpack.make_latent(FAMILY, 3, 64, 64)
    cond = sc_testpack.make_conditioning(FAMILY, 1, references=[ref])
    target = {"samples": torch.cat([ref.flip(1), ref])}  # two target rows = two examples
    (text,) = SparseContextSaveTrainingExample.execute(target, cond, "examples/pair", "make it blue").args
    examples = tr.load_example_folder(tmp_path / "examples")
    assert len(text.splitlines()) == len(examples) == 2
    assert torch.equal(examples[0].target, ref.flip(1)) and torch.equal(examples[1].references[0], ref)
    assert examples[0].meta == {"prompt": "make it blue"}
