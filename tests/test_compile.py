"""torch.compile through core's own wrapper (what the TorchCompileModel node does) on a patched model:
no graph breaks, no recompiles for a new sampling run with the same shapes, compiled == eager.

Graphs, graph breaks and compile attempts are read from ``torch._dynamo.utils.counters``: a frame that
dynamo has to (re)compile goes through ``convert_frame`` (``frames/total``); a cached frame whose guards
hold does not. Backend ``aot_eager`` (no code generation): what is traced, not how fast it runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import sc_testpack
import torch
from sc_harness.sampling import sample, with_references
from sc_harness.skips import family_param
from sparse_context.selectors import Budget
from sparse_context.sparse_attention import SparseContextConfig, apply_sparse_context

#: the families added in ComfyUI 0.29-0.30 (and Z-Image omni, 0.10+), on the hosts whose detection has them
NEWER_FAMILIES = ("mage_flow", "krea2", "longcat_image_edit", "z_image_omni", "z_image_pixel", "joyimage_edit")


def sdpa(func, *args, **kwargs):
    """PyTorch SDPA attention through core's ``optimized_attention_override`` hook. On the CPU ComfyUI picks
    sub-quadratic attention, which reads the free memory with psutil (a graph break of core's own, even
    dense); with SDPA, ComfyUI's default on GPUs, the dense model compiles to one graph."""
    import comfy.ldm.modules.attention as attention

    return attention.attention_pytorch(*args, **kwargs)


@dataclass(frozen=True)
class Compiled:
    out: torch.Tensor
    graphs: int  # new graphs compiled
    breaks: int  # graph breaks
    frames: int  # frames dynamo had to (re)compile


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _with_sdpa(model):
    m = model.clone()
    m.model_options["transformer_options"]["optimized_attention_override"] = sdpa
    return m


def _compiled(model):
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    m = _with_sdpa(model)
    set_torch_compile_wrapper(m, backend="aot_eager")
    return m


def _config(keep: float, bucket: int = 1, seed: int = 0) -> SparseContextConfig:
    return SparseContextConfig(budget=Budget(mode="ratio", ratio=keep), rule="grid", bucket=bucket, seed=seed)


class Scene:
    """One family's tiny model and a CFG sampling run (positive and negative with the same reference)."""

    def __init__(self, family: str):
        self.family = family
        self.base = sc_testpack.build_model_patcher(family, seed=3)
        self.empty = torch.zeros_like(sc_testpack.make_latent(family, 0, 64, 64))

    def conds(self, width: int, height: int) -> tuple[list, list]:
        ref = sc_testpack.make_latent(self.family, 8, width, height)
        method = "index" if self.family == "krea2" else None  # Krea 2 ignores references without a method
        return (with_references(sc_testpack.make_conditioning(self.family, 1), [ref], method),
                with_references(sc_testpack.make_conditioning(self.family, 2), [ref], method))

    def sample(self, model, conds, seed: int = 1) -> torch.Tensor:
        return sample(model, conds[0], conds[1], self.empty, steps=2, cfg=2.0, seed=seed)

    def compiled_run(self, model, conds, seed: int = 1) -> Compiled:
        from torch._dynamo.utils import counters

        counters.clear()
        out = self.sample(model, conds, seed)
        return Compiled(out, counters["stats"]["unique_graphs"], sum(counters["graph_break"].values()),
                        counters["frames"]["total"])

    def check_equal_to_eager(self, model, conds, compiled: Compiled, seed: int = 1) -> None:
        eager = self.sample(_with_sdpa(model), conds, seed)
        assert torch.allclose(compiled.out, eager, atol=1e-5, rtol=1e-5), (compiled.out - eager).abs().max().item()


def test_compiled_sparse_runs_have_no_graph_breaks_and_no_recompiles_for_a_second_run():
    scene = Scene("flux1_kontext")
    conds = scene.conds(64, 64)  # 4 x 4 reference tokens
    dense = scene.compiled_run(_compiled(scene.base), conds)
    assert dense.graphs >= 1 and dense.breaks == 0, dense
    scene.check_equal_to_eager(scene.base, conds, dense)

    models = {}
    for keep in (0.25, 0.5):
        models[keep] = apply_sparse_context(scene.base, _config(keep))
        compiled = _compiled(models[keep])
        first = scene.compiled_run(compiled, conds)
        assert first.breaks == 0, first
        assert first.graphs == 1, f"keep {keep}: one new graph for the new token count, got {first}"
        scene.check_equal_to_eager(models[keep], conds, first)

        again = scene.compiled_run(compiled, conds, seed=2)  # a new sampling run (new SparseRun), same shapes
        assert again.frames == 0 and again.graphs == 0 and again.breaks == 0, f"keep {keep}: recompiled: {again}"
        scene.check_equal_to_eager(models[keep], conds, again, seed=2)

    # the same settings on a new Apply node output (a new clone) reuse the compiled graph too
    clone = scene.compiled_run(_compiled(apply_sparse_context(scene.base, _config(0.5, seed=7))), conds)
    assert clone.frames == 0, clone

    other = scene.conds(96, 64)  # another reference size: 4 x 6 tokens
    first = scene.compiled_run(_compiled(models[0.5]), other)
    assert first.breaks == 0 and first.graphs <= 1, first
    scene.check_equal_to_eager(models[0.5], other, first)
    again = scene.compiled_run(_compiled(models[0.5]), other, seed=2)
    assert again.frames == 0, again


def test_keep_ratios_with_the_same_bucketed_count_share_one_graph():
    scene = Scene("flux1_kontext")
    conds = scene.conds(512, 512)  # 32 x 32 = 1024 tokens: bucket 64 applies
    first = scene.compiled_run(_compiled(apply_sparse_context(scene.base, _config(0.27, bucket=64))), conds)
    assert first.breaks == 0 and first.graphs == 1, first
    # round(0.27 * 1024) = 276 and round(0.3 * 1024) = 307 both keep 320 tokens: same shapes, no new graph
    second = scene.compiled_run(_compiled(apply_sparse_context(scene.base, _config(0.3, bucket=64))), conds)
    assert second.frames == 0 and second.graphs == 0, second


@pytest.mark.parametrize("family", ["flux2_klein", "qwen_image_edit",
                                    *map(family_param, NEWER_FAMILIES)])
def test_other_families_compile_clean(family):
    """Thinning adds no graph break and no graph to what the dense model compiles to (one graph for most; core's
    own breaks, e.g. in a fused-kernel path, stay as they are), compiled == eager, and no recompile next run."""
    scene = Scene(family)
    conds = scene.conds(64, 64)
    dense = scene.compiled_run(_compiled(scene.base), conds)
    torch._dynamo.reset()
    model = apply_sparse_context(scene.base, _config(0.25))
    compiled = _compiled(model)
    first = scene.compiled_run(compiled, conds)
    assert (first.breaks, first.graphs) == (dense.breaks, dense.graphs), (first, dense)
    scene.check_equal_to_eager(model, conds, first)
    again = scene.compiled_run(compiled, conds, seed=2)
    assert again.frames == 0 and again.breaks == 0, again
