"""The foundation: the pack loads with and without ComfyUI, the tiny real models sample with references,
the model_conds path the pack relies on works, and the real server runs a graph over HTTP."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import comfy.conds
import comfy.patcher_extension
import pytest
import sc_testpack
import sparse_context
import torch
from sc_harness.host import REPO, comfyui_path, comfyui_version
from sc_harness.prompts import ksampler, tiny_latent
from sc_harness.sampling import sample, with_references
from sc_harness.skips import family_param

FAMILIES = sorted(sc_testpack.FAMILIES)


def test_pack_imports_without_comfyui():
    code = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("sparse_context", {str(REPO / "__init__.py")!r},
                                                      submodule_search_locations=[{str(REPO)!r}])
        mod = importlib.util.module_from_spec(spec); sys.modules["sparse_context"] = mod
        spec.loader.exec_module(mod)
        assert "comfy" not in sys.modules and "comfy_api" not in sys.modules, "ComfyUI was imported"
        assert not hasattr(mod, "comfy_entrypoint"), "nodes registered without ComfyUI"
        import selectors  # the stdlib module must not be shadowed by the pack's folder
        assert hasattr(selectors, "DefaultSelector"), selectors.__file__
        print("OK")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr


def test_pack_registers_through_v3_entrypoint():
    import asyncio

    from comfy_api.latest import ComfyExtension

    assert not hasattr(sparse_context, "NODE_CLASS_MAPPINGS"), "one registration mechanism only"
    extension = asyncio.run(sparse_context.comfy_entrypoint())
    assert isinstance(extension, ComfyExtension)
    nodes = asyncio.run(extension.get_node_list())
    assert isinstance(nodes, list)


def test_host_is_a_real_comfyui():
    assert (comfyui_path() / "main.py").is_file()
    assert comfyui_version().count(".") == 2


@pytest.mark.parametrize("family", [family_param(f) for f in FAMILIES])
def test_tiny_model_samples_with_a_reference(family):
    model = sc_testpack.build_model_patcher(family, seed=1)
    ref = sc_testpack.make_latent(family, seed=2, width=64, height=48)
    method = "index" if family == "krea2" else None  # Krea 2 appends references only with a method
    positive = with_references(sc_testpack.make_conditioning(family, 3), [ref], method)
    negative = sc_testpack.make_conditioning(family, 4)
    latent = torch.zeros_like(sc_testpack.make_latent(family, 5, 64, 64))
    with_ref = sample(model, positive, negative, latent, steps=2, seed=7)
    without = sample(model, sc_testpack.make_conditioning(family, 3), negative, latent, steps=2, seed=7)
    assert with_ref.shape == latent.shape and torch.isfinite(with_ref).all()
    # the reference really reaches the transformer: it changes the result
    assert (with_ref - without).abs().max() > 1e-4


def test_model_conds_condlist_reaches_diffusion_model_wrapper():
    """The pack binds selections to references through the conditioning's own ``model_conds``."""
    family = "flux1_kontext"
    model = sc_testpack.build_model_patcher(family, seed=1).clone()
    seen: list = []

    def wrapper(executor, *args, **kwargs):
        seen.append(kwargs.get("sc_probe"))
        return executor(*args, **kwargs)

    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "sc_probe", wrapper)
    ref = sc_testpack.make_latent(family, 2, 64, 64)
    positive = with_references(sc_testpack.make_conditioning(family, 3), [ref])
    probe = torch.arange(5).reshape(1, 5)
    positive = [[positive[0][0], dict(positive[0][1], model_conds={"sc_probe": comfy.conds.CONDList([probe])})]]
    negative = [[positive[0][0], dict(positive[0][1])]]  # same conds => batched with the positive under CFG
    latent = torch.zeros_like(sc_testpack.make_latent(family, 5, 64, 64))
    sample(model, positive, negative, latent, steps=2, cfg=2.0, seed=7)
    arrived = [s for s in seen if s is not None]
    assert arrived, f"the CONDList never reached the wrapper: {seen}"
    assert all(isinstance(s, list) and len(s) == 1 for s in arrived)
    assert all(torch.equal(s[0][0], probe[0]) for s in arrived)


@pytest.mark.server
def test_server_starts_with_the_pack_and_no_import_errors(server):
    log = server.log_path.read_text(encoding="utf-8", errors="replace")  # from the start: other tests log a lot
    # core's optional audio/upscale nodes may fail without torchaudio/spandrel; our two packs may not
    ours = [line for line in log.splitlines() if "sparse_context" in line]
    assert any(line.strip().endswith("/sparse_context") for line in ours), log
    assert not [line for line in ours if "IMPORT FAILED" in line or "Cannot import" in line], log
    info = server.object_info()
    assert "SCTest_TinyModel" in info and "ReferenceLatent" in info


@pytest.mark.server
def test_kontext_prompt_with_a_reference_runs_end_to_end_over_http(server):
    f = "flux1_kontext"
    prompt = {
        "1": {"class_type": "SCTest_TinyModel", "inputs": {"family": f, "seed": 1}},
        "2": {"class_type": "SCTest_Conditioning", "inputs": {"family": f, "seed": 3, "tokens": 8}},
        "3": tiny_latent(f, 2),
        "4": {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["2", 0], "latent": ["3", 0]}},
        "5": tiny_latent(f, 0, empty=True),
        "6": ksampler(["1", 0], ["4", 0], ["2", 0], ["5", 0], steps=3),
        "7": {"class_type": "SCTest_LatentToImage", "inputs": {"samples": ["6", 0]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "sc_e2e"}},
    }
    entry = server.run(prompt)
    images = entry["outputs"]["8"]["images"]
    assert len(images) == 1
    assert server.output_path(images[0]).stat().st_size > 0
