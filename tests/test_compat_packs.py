"""The compatibility matrix: Apply Sparse Context (keep 0.5) next to the packs FLUX users run, with their real
nodes, in both node orders. Every row ends in one of: composes (equal to an exact oracle where one exists), refused
with a clear message before any image is returned, or the pack fails by itself on this host. Never a silently
different image.

Third-party packs come from ``scripts/compat.sh --nodes DIR...`` (``sc_harness.packs``); without them their rows
skip with a reason naming the pack. Each test records its row (``matrix`` fixture) for docs/compatibility.md.

Oracle: the dense model with the dropped reference tokens hidden as keys by an ``attention_mask`` forward input
(``sc_harness.masked``); the model hands that mask to its blocks itself, so it holds next to packs that call the
blocks without ``transformer_options``.
"""

from __future__ import annotations

import logging

import comfy.patcher_extension
import pytest
import sc_testpack
import torch
from sc_harness import packs
from sc_harness.host import comfyui_version
from sc_harness.masked import MaskedReferences
from sc_harness.sampling import sample, with_references
from sparse_context.nodes.apply_node import SparseContextApply
from sparse_context.selectors import Budget
from sparse_context.sparse_attention import SparseContextConfig
from sparse_context.sparse_attention.errors import SparseContextBypassed
from sparse_context.sparse_attention.planning import plan_references

KEEP = 0.5
REF_TOKENS = [(6, 6), (5, 4)]  # (w, h) in tokens
TARGET_TOKENS = (8, 6)
#: mode -> (cache, rule) of Apply Sparse Context
MODES = {"cache=off": ("off", "random"), "cache=first_step": ("first_step", "random"),
         "cache=reference_only": ("reference_only", "random"), "rule=attention": ("off", "attention")}
ORDERS = ["pack -> Apply", "Apply -> pack"]
FAMILY_NAMES = {"flux1_kontext": "FLUX.1 Kontext", "flux2_klein": "FLUX.2 klein"}


def _config(mode: str) -> SparseContextConfig:
    cache, rule = MODES[mode]
    return SparseContextConfig(budget=Budget(mode="ratio", ratio=KEEP), rule=rule, bucket=1, seed=4, cache=cache)


def apply_node(model, mode: str):
    cache, rule = MODES[mode]
    return SparseContextApply.execute(model=model, keep_ratio=KEEP, rule=rule, total_tokens=0, bucket=1,
                                      start_percent=0.0, end_percent=1.0, seed=4, enabled=True, cache=cache).result[0]


class Scene:
    """A tiny model and a CFG sampling run with two references (the same on cond and uncond)."""

    def __init__(self, family: str, base, context_dim: int | None = None, pooled_dim: int | None = -1):
        spec = sc_testpack.SPECS[family]
        self.family, self.base = family, base
        self.context_dim = context_dim or spec.context_dim
        self.pooled_dim = spec.pooled_dim if pooled_dim == -1 else pooled_dim
        self.patch_size = 2 if family == "flux1_kontext" else 1
        d = spec.downscale * self.patch_size  # pixels per token
        self.refs = [sc_testpack.make_latent(family, 20 + i, w * d, h * d) for i, (w, h) in enumerate(REF_TOKENS)]
        self.empty = torch.zeros_like(sc_testpack.make_latent(family, 0, TARGET_TOKENS[0] * d, TARGET_TOKENS[1] * d))

    def _cond(self, seed: int) -> list:
        gen = torch.Generator().manual_seed(seed)
        extra = {"pooled_output": torch.randn((1, self.pooled_dim), generator=gen) if self.pooled_dim else None}
        return with_references([[torch.randn((1, 8, self.context_dim), generator=gen), extra]], self.refs)

    def run(self, model, steps: int = 4, seed: int = 1) -> torch.Tensor:
        return sample(model, self._cond(1), self._cond(2), self.empty, steps=steps, cfg=2.0, seed=seed)

    def plans(self, mode: str = "cache=off"):
        grids = [(h, w) for w, h in REF_TOKENS]
        return plan_references([torch.zeros(1, *g) for g in grids], grids, [None] * len(grids), _config(mode))

    def kept_line(self) -> str:
        plans = self.plans()
        return f"Kept {sum(p.kept for p in plans)}/{sum(p.total for p in plans)} reference tokens"

    def masked(self, model=None):
        """``model`` (default: the dense base) with the dropped reference keys hidden: the plain sparse oracle."""
        m = (model or self.base).clone()
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "oracle",
                               MaskedReferences(self.plans(), self.patch_size))
        return m


def compose(order: str, pack, model, mode: str):
    return apply_node(pack(model), mode) if order == ORDERS[0] else pack(apply_node(model, mode))


def check_composes(scene: Scene, out: torch.Tensor, oracle: torch.Tensor, dense: torch.Tensor) -> float:
    err = (out - oracle).abs().max().item()
    assert err < 1e-4, f"differs from its oracle by {err}"
    assert (out - dense).abs().max().item() > 100 * max(err, 1e-6), "sparse == dense: nothing was thinned"
    return err


def kept_reports(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("SparseContext (node")]


def use_pack(key: str, matrix):
    """The pack's module, or skip (recording why) when it was not given or does not load here."""
    pack = packs.PACKS[key]
    matrix.set(pack=pack.label)
    try:
        return packs.load(key)
    except packs.PackUnavailable as err:
        if packs.find(key) is not None:
            matrix.set(result="pack does not load", message=str(err))
        # Third-party packs are never committed: CI has none, so their rows skip there (the reason names the pack
        # and how to pass it); scripts/compat.sh --nodes runs them, and a pack that fails to load on a host is
        # recorded in the matrix as "pack does not load" before skipping.
        pytest.skip(str(err))


@pytest.fixture(autouse=True)
def _logs(caplog):
    caplog.set_level(logging.INFO, logger="SparseContext")


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# -- ComfyUI-GGUF ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["flux1_kontext", "flux2_klein"])
@pytest.mark.parametrize("mode", list(MODES))
def test_gguf_q8_0_file_through_its_loader(family, mode, matrix, tmp_path):
    """A real Q8_0 file (``gguf`` package) loaded by ComfyUI-GGUF's UnetLoaderGGUF: Apply on it equals Apply on a
    core model holding the file's dequantized weights (the pack's modes are checked against their own oracles on
    core models in test_reference_cache), and the plain mode also equals the masked-dense oracle on the GGUF
    model itself."""
    use_pack("gguf", matrix)
    from sc_harness.gguf_model import (
        effective_weights,
        float_model,
        load_with_gguf_pack,
        quantized_count,
        write_q8_0,
    )

    matrix.set(family=FAMILY_NAMES[family], order="loader -> Apply", mode=mode)
    reference = float_model(family, seed=5)
    path = tmp_path / f"tiny_{family}_q8_0.gguf"
    write_q8_0(reference.model.diffusion_model.state_dict(), path)
    assert quantized_count(path) >= 8
    gguf_model, loaded_by = load_with_gguf_pack(path, family)
    assert type(gguf_model).__name__ == "GGUFModelPatcher"
    reference.model.diffusion_model.load_state_dict(effective_weights(path))
    scene = Scene(family, gguf_model, context_dim=32, pooled_dim=32 if family == "flux1_kontext" else None)

    out = scene.run(apply_node(gguf_model, mode))
    oracle = scene.run(apply_node(reference, mode))
    err = (out - oracle).abs().max().item()
    assert err < 1e-4, f"GGUF + Apply differs from Apply on the dequantized core model by {err}"
    dense = scene.run(gguf_model)
    assert (out - dense).abs().max().item() > 100 * max(err, 1e-6)
    message = (f"Q8_0 file loaded by {loaded_by}: equal to Apply on the file's dequantized weights in a core model "
               f"({err:.1e})")
    if mode == "cache=off":
        masked_err = check_composes(scene, out, scene.run(scene.masked()), dense)
        message += f"; equal to the masked-dense oracle on the GGUF model ({masked_err:.1e})"
    matrix.set(result="composes", message=message)


# -- core nodes --------------------------------------------------------------------------------------------------
def _core_node(module: str, name: str):
    try:
        return getattr(__import__(f"comfy_extras.{module}", fromlist=[name]), name)
    except (ImportError, AttributeError):
        # A core node newer than this host (e.g. Flux KV Cache, 0.30+): the row runs on the hosts that have it.
        pytest.skip(f"ComfyUI {comfyui_version()} has no {name} node")


@pytest.mark.parametrize("order", ORDERS)
def test_core_torch_compile_model(order, matrix, caplog, fresh_dynamo):
    """core TorchCompileModel (its compile wrapper, backend aot_eager) before or after Apply equals eager."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    _core_node("nodes_torch_compile", "TorchCompileModel")
    matrix.set(pack="core TorchCompileModel (aot_eager)", family=FAMILY_NAMES["flux1_kontext"], order=order,
               mode="cache=off")

    def compiled(m):
        m = m.clone()
        set_torch_compile_wrapper(model=m, backend="aot_eager")
        return m

    scene = Scene("flux1_kontext", sc_testpack.build_model_patcher("flux1_kontext", seed=3))
    out = scene.run(compose(order, compiled, scene.base, "cache=off"))
    eager = scene.run(apply_node(scene.base, "cache=off"))
    err = (out - eager).abs().max().item()
    assert err < 1e-5, err
    check_composes(scene, out, scene.run(scene.masked()), scene.run(scene.base))
    assert any(scene.kept_line() in r for r in kept_reports(caplog)), kept_reports(caplog)
    matrix.set(result="composes", message=f"equal to eager Apply ({err:.1e}) and to the masked-dense oracle")


def _easycache_run(node, order, mode, scene):
    """The run's output, how many model forwards ran (attention calls of the model's two blocks) and the node."""
    from sc_harness.oracle import AttentionProbe

    def cache_node(m):
        return node.execute(m, reuse_threshold=2.0, start_percent=0.0, end_percent=1.0, verbose=False).result[0]

    probe = AttentionProbe()
    model = compose(order, cache_node, scene.base, mode)  # (clones copy model_options deeply: probe added last)
    model.model_options["transformer_options"]["optimized_attention_override"] = probe
    out = scene.run(model, steps=8)
    assert probe.lengths, "the attention probe saw no call"
    return out, len(probe.lengths) // 2, cache_node


@pytest.mark.parametrize("node_name", ["EasyCacheNode", "LazyCacheNode"])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("mode", ["cache=off", "cache=first_step"])
def test_core_easycache_and_lazycache_skip_steps_and_compose(node_name, order, mode, matrix, caplog):
    node = _core_node("nodes_easycache", node_name)
    matrix.set(pack=f"core {node_name.removesuffix('Node')}", family=FAMILY_NAMES["flux1_kontext"], order=order,
               mode=mode)
    scene = Scene("flux1_kontext", sc_testpack.build_model_patcher("flux1_kontext", seed=3))
    out, forwards, cache_node = _easycache_run(node, order, mode, scene)
    assert forwards < 8, f"{node_name} skipped no step ({forwards} forwards of 8 steps)"
    assert torch.isfinite(out).all()
    false = [r.getMessage() for r in caplog.records if "did not reach the model" in r.getMessage()]
    assert not false, false
    message = f"{8 - forwards} of 8 steps skipped by {node_name.removesuffix('Node')}"
    if mode == "cache=off":
        oracle = scene.run(cache_node(scene.masked()), steps=8)
        err = (out - oracle).abs().max().item()
        assert err < 1e-4, f"differs from the cache over the masked-dense model by {err}"
        message += f"; equal to the same cache over the masked-dense model ({err:.1e})"
    matrix.set(result="composes", message=message)


# -- TeaCache and WaveSpeed's first-block cache ------------------------------------------------------------------
def _teacache(module):
    def apply(m):
        return module.TeaCache().apply_teacache(m, "flux-kontext", 1.0, 0.0, 1.0, "cpu")[0]
    return apply


def _fbcache(module):
    def apply(m):  # a threshold no residual difference reaches: every step after the first is a cache hit
        return module.ApplyFBCacheOnModel().patch(m, "diffusion_model", 1e6, -1, 0.0, 1.0)[0]
    return apply


CACHE_PACKS = {"teacache": _teacache, "wavespeed": _fbcache}


def _fails_alone(pack, scene) -> Exception | None:
    try:
        scene.run(pack(scene.base))
    except Exception as err:  # the pack's own failure on this host is the finding
        return err
    return None


@pytest.mark.parametrize("key", list(CACHE_PACKS))
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("mode", list(MODES))
def test_block_caches_on_flux1_compose_or_are_refused(key, order, mode, matrix, caplog):
    """cache=off composes (equal to the pack over the masked-dense model); the cache modes and the attention rule,
    whose attention override these packs' blocks never call, stop with SparseContextBypassed before an image."""
    module = use_pack(key, matrix)
    matrix.set(family=FAMILY_NAMES["flux1_kontext"], order=order, mode=mode)
    pack = CACHE_PACKS[key](module)
    scene = Scene("flux1_kontext", sc_testpack.build_model_patcher("flux1_kontext", seed=3))
    own = _fails_alone(pack, scene)
    if own is not None:
        with pytest.raises(Exception) as with_ours:  # noqa: B017, PT011  (whatever the pack raises by itself)
            scene.run(compose(order, pack, scene.base, mode))
        assert isinstance(with_ours.value, (type(own), SparseContextBypassed)), with_ours.value
        matrix.set(result="pack fails by itself", message=f"{type(own).__name__}: {own}"[:300])
        return
    if mode == "cache=off":
        out = scene.run(compose(order, pack, scene.base, mode))
        err = check_composes(scene, out, scene.run(pack(scene.masked())), scene.run(pack(scene.base)))
        matrix.set(result="composes", message=f"equal to the pack over the masked-dense model ({err:.1e})")
        return
    with pytest.raises(SparseContextBypassed) as refused:
        scene.run(compose(order, pack, scene.base, mode))
    text = str(refused.value)
    assert text.startswith("SparseContext:") and "transformer_options" in text and "cache=off" in text, text
    matrix.set(result="refused", message=text)


@pytest.mark.parametrize("key", list(CACHE_PACKS))
def test_block_caches_on_flux2_fail_by_themselves(key, matrix):
    module = use_pack(key, matrix)
    matrix.set(family=FAMILY_NAMES["flux2_klein"], order="either", mode="cache=off")
    pack = CACHE_PACKS[key](module)
    scene = Scene("flux2_klein", sc_testpack.build_model_patcher("flux2_klein", seed=3))
    own = _fails_alone(pack, scene)
    if own is None:
        out = scene.run(apply_node(pack(scene.base), "cache=off"))
        err = check_composes(scene, out, scene.run(pack(scene.masked())), scene.run(pack(scene.base)))
        matrix.set(result="composes", message=f"equal to the pack over the masked-dense model ({err:.1e})")
        return
    with pytest.raises(type(own)):
        scene.run(apply_node(pack(scene.base), "cache=off"))
    matrix.set(result="pack fails by itself", message=f"{type(own).__name__}: {own}"[:300])


@pytest.mark.parametrize("order", ORDERS)
def test_wavespeed_enhanced_compile_model(order, matrix, caplog, fresh_dynamo):
    """WaveSpeed's EnhancedCompileModel puts ``torch.compile(diffusion_model)`` into an object patch; before Apply
    the references are thinned through it (object patches reach the compiled module), equal to eager Apply."""
    module = use_pack("wavespeed", matrix)
    matrix.set(pack=f"{packs.PACKS['wavespeed'].label} EnhancedCompileModel (aot_eager)",
               family=FAMILY_NAMES["flux1_kontext"], order=order, mode="cache=off")
    node = module.NODE_CLASS_MAPPINGS["EnhancedCompileModel"]()

    def compiled(m):
        return node.patch(m, True, "diffusion_model", "torch.compile", False, False, "", "", False, "aot_eager")[0]

    scene = Scene("flux1_kontext", sc_testpack.build_model_patcher("flux1_kontext", seed=3))
    model = compose(order, compiled, scene.base, "cache=off")
    assert type(model.get_model_object("diffusion_model")).__name__ == "OptimizedModule"
    out = scene.run(model)
    eager = scene.run(apply_node(scene.base, "cache=off"))
    err = (out - eager).abs().max().item()
    assert err < 1e-5, err
    check_composes(scene, out, scene.run(scene.masked()), scene.run(scene.base))
    reports = kept_reports(caplog)
    assert reports and all(scene.kept_line() in r for r in reports), reports
    assert not [r for r in caplog.records if "not a supported model" in r.getMessage()]
    matrix.set(result="composes", message=f"thinned through the compiled module, equal to eager Apply ({err:.1e})")


def test_report_names_an_unsupported_model_class(caplog):
    """A model whose class this pack does not thin (OmniGen2 takes references too): the Apply node's report and the
    log name the class instead of "No reference images reached the model"."""
    from sparse_context.nodes.apply_node import format_report
    from sparse_context.sparse_attention import unsupported_reason

    model = sc_testpack.build_omnigen2_patcher()
    apply_node(model, "cache=off")
    reason = unsupported_reason(model)
    assert "OmniGen2Transformer2DModel is not a supported model" in reason, reason
    assert reason in caplog.text
    text = format_report(None, True, 1.0, reason)
    assert text.startswith("References ran dense: the diffusion model comfy.ldm.omnigen") and "reached" not in text
    assert unsupported_reason(sc_testpack.build_model_patcher("flux1_kontext")) is None
