"""The nodes users drag in: schema rules, conditioning plumbing, selectors on a real photo, the preview,
clear errors for bad input, and the same behaviour through the real server."""

from __future__ import annotations

import logging

import comfy.conds
import pytest
import sc_testpack
import torch
from comfy_extras.nodes_edit_model import ReferenceLatent
from sc_harness.prompts import ksampler, tiny_latent
from sc_harness.sampling import sample
from skimage import data as skdata
from sparse_context.nodes import NODES
from sparse_context.nodes.apply_node import SparseContextApply, format_report
from sparse_context.nodes.budget_node import SparseContextBudget
from sparse_context.nodes.common import SparseContextInputError
from sparse_context.nodes.preview_node import SparseContextPreview
from sparse_context.nodes.reference_nodes import SparseContextBindSelections, SparseContextReferenceLatent
from sparse_context.nodes.selector_nodes import (
    SparseContextCombineSelections,
    SparseContextEdgeSelector,
    SparseContextGridSelector,
    SparseContextMaskSelector,
    SparseContextRandomSelector,
    SparseContextSaliencySelector,
)
from sparse_context.selectors import DEFAULT_COVERAGE, Budget
from sparse_context.sparse_attention import BINDING_KEY, PATCH_KEY, ReferenceSelection, SelectionBinding


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    """skimage's astronaut as a ComfyUI IMAGE (1, 256, 256, 3): a real photograph, downsized for speed."""
    img = torch.from_numpy(skdata.astronaut()).float().div(255).permute(2, 0, 1).unsqueeze(0)
    return torch.nn.functional.interpolate(img, size=(256, 256), mode="area").permute(0, 2, 3, 1).contiguous()


def _budget(**kw) -> Budget:
    args = dict(mode="ratio", keep_ratio=0.25, token_count=64, mass=0.8, min_ratio=0.05, max_ratio=0.5, coverage=-1.0)
    args.update(kw)
    return SparseContextBudget.execute(**args).result[0]


def _out(node_output):
    return node_output.result[0]


# -- schema ------------------------------------------------------------------------------------
@pytest.mark.parametrize("node", NODES, ids=lambda n: n.__name__)
def test_schema_rules(node):
    schema = node.define_schema()
    assert schema.node_id.startswith("SparseContext"), schema.node_id
    assert schema.category.split("/")[0] == "SparseContext" and "/" in schema.category, schema.category
    assert schema.description and len(schema.description) > 30
    assert schema.display_name
    for inp in schema.inputs:
        assert inp.tooltip, f"{schema.node_id}.{inp.id} has no tooltip"
    info = node.GET_NODE_INFO_V1() if hasattr(node, "GET_NODE_INFO_V1") else None
    if info is not None:
        assert info["description"] == schema.description


def test_node_ids_are_unique_and_all_registered():
    import asyncio

    import sparse_context

    ids = [n.define_schema().node_id for n in NODES]
    assert len(ids) == len(set(ids))
    registered = asyncio.run(asyncio.run(sparse_context.comfy_entrypoint()).get_node_list())
    assert {n.define_schema().node_id for n in registered} == set(ids)
    assert len(ids) == 16


# -- conditioning plumbing ---------------------------------------------------------------------
def _cond(family="flux1_kontext", seed=3):
    return sc_testpack.make_conditioning(family, seed)


def test_sparse_reference_latent_matches_core_reference_latent_plus_binding(photo):
    ref1 = {"samples": sc_testpack.make_latent("flux1_kontext", 1, 64, 64)}
    ref2 = {"samples": sc_testpack.make_latent("flux1_kontext", 2, 64, 48)}
    sel = _out(SparseContextGridSelector.execute(image=photo))
    cond = _cond()
    cond[0][1]["model_conds"] = {"other": comfy.conds.CONDConstant("keep me")}

    core = _out(ReferenceLatent.execute(_out(ReferenceLatent.execute(cond, ref1)), ref2))
    ours1 = _out(SparseContextReferenceLatent.execute(cond, ref1, None))  # no selection: exactly core
    ours = _out(SparseContextReferenceLatent.execute(ours1, ref2, sel))

    assert len(ours) == len(core) == 1
    assert torch.equal(ours[0][0], core[0][0])
    assert [r is s for r, s in zip(ours[0][1]["reference_latents"], core[0][1]["reference_latents"], strict=True)] == [True, True]
    assert set(ours[0][1]) == set(core[0][1])
    for key in core[0][1]:
        if key not in ("model_conds", "reference_latents"):
            assert ours[0][1][key] is core[0][1][key], key
    conds = ours[0][1]["model_conds"]
    assert conds["other"].cond == "keep me"  # existing model_conds entries survive
    binding = conds[BINDING_KEY].cond
    assert isinstance(conds[BINDING_KEY], comfy.conds.CONDConstant) and isinstance(binding, SelectionBinding)
    assert binding.get(0) is None and binding.get(1) is sel  # bound to the SECOND reference, by position
    assert BINDING_KEY not in cond[0][1]["model_conds"] and "reference_latents" not in cond[0][1]  # input untouched

    # a third reference with its own selection keeps the earlier binding
    sel3 = _out(SparseContextRandomSelector.execute(image=photo, seed=5))
    three = _out(SparseContextReferenceLatent.execute(ours, ref1, sel3))
    b3 = three[0][1]["model_conds"][BINDING_KEY].cond
    assert (b3.get(0), b3.get(1), b3.get(2)) == (None, sel, sel3)


def test_sparse_reference_latent_without_latent_passes_through():
    cond = _cond()
    assert _out(SparseContextReferenceLatent.execute(cond, None, None)) is cond


def test_bind_selections_binds_by_order_and_names_the_missing_reference(photo):
    refs = [sc_testpack.make_latent("qwen_image_edit", i, 64, 64) for i in range(2)]
    cond = _cond("qwen_image_edit")
    for r in refs:
        cond = _out(ReferenceLatent.execute(cond, {"samples": r}))
    a = _out(SparseContextSaliencySelector.execute(image=photo, blur_tokens=1.0))
    b = _out(SparseContextGridSelector.execute(image=photo, weight=2.0))
    bound = _out(SparseContextBindSelections.execute(cond, selection_1=a, selection_2=b))
    binding = bound[0][1]["model_conds"][BINDING_KEY].cond
    assert (binding.get(0), binding.get(1)) == (a, b)
    assert bound[0][1]["reference_latents"] == cond[0][1]["reference_latents"]

    only_second = _out(SparseContextBindSelections.execute(cond, selection_2=b))
    assert only_second[0][1]["model_conds"][BINDING_KEY].cond.get(0) is None

    with pytest.raises(SparseContextInputError, match=r"^Bind Sparse Selections: selection_3: .*only 2 reference"):
        SparseContextBindSelections.execute(cond, selection_3=a)
    with pytest.raises(SparseContextInputError, match=r"^Bind Sparse Selections: selection_1: .*only 0 reference"):
        SparseContextBindSelections.execute(_cond(), selection_1=a)
    with pytest.raises(SparseContextInputError, match=r"^Bind Sparse Selections: selection_1: expected a SPARSE_SELECTION"):
        SparseContextBindSelections.execute(cond, selection_1="not a selection")
    assert _out(SparseContextBindSelections.execute(cond)) is cond


# -- selectors on a real photo ------------------------------------------------------------------
def _square_mask(size=256, lo=64, hi=160) -> torch.Tensor:
    m = torch.zeros(1, size, size)
    m[:, lo:hi, lo:hi] = 1.0
    return m


def _all_selectors(photo):
    edge = _out(SparseContextEdgeSelector.execute(image=photo, low_threshold=0.1, high_threshold=0.2, spread=1))
    sal = _out(SparseContextSaliencySelector.execute(image=photo, blur_tokens=1.0))
    mask = _out(SparseContextMaskSelector.execute(mask=_square_mask(), inside=1.0, outside=0.0, dilate_tokens=1, feather_tokens=2))
    rnd = _out(SparseContextRandomSelector.execute(image=photo, seed=3))
    grid = _out(SparseContextGridSelector.execute(image=photo))
    comb = _out(SparseContextCombineSelections.execute(mask, edge, 1.0, 0.5, 1.0, 1.0, "max", budget=None, weight=1.0))
    return {"edge": edge, "saliency": sal, "mask": mask, "random": rnd, "grid": grid, "mask+edge": comb}


def test_every_selector_returns_a_valid_selection_on_a_real_photo(photo):
    sels = _all_selectors(photo)
    for rule, sel in sels.items():
        assert isinstance(sel, ReferenceSelection), rule
        assert sel.rule == rule
        assert sel.scores.shape == (16, 16), (rule, sel.scores.shape)  # 256 px / 16 px per token
        assert torch.isfinite(sel.scores).all() and (sel.scores >= 0).all()
        assert sel.scores.std() > 0, f"{rule}: a constant map selects nothing in particular"
        assert sel.budget is None and sel.weight == 1.0
    # content-aware selectors really follow the content
    mask = sels["mask"].scores
    assert mask[6:9, 6:9].min() == 1.0 and mask[0, 0] == 0.0
    gray = photo[0].mean(-1)
    grad = (gray[1:, :-1] - gray[:-1, :-1]).abs() + (gray[:-1, 1:] - gray[:-1, :-1]).abs()
    busy = torch.nn.functional.pad(grad, (0, 1, 0, 1)).unfold(0, 16, 16).unfold(1, 16, 16).mean(dim=(-2, -1)).flatten()
    order = sels["edge"].scores.flatten().argsort(descending=True)
    assert busy[order[:64]].mean() > 2 * busy[order[-64:]].mean(), "edge tokens should be the busy ones"
    assert not torch.equal(sels["random"].scores, _out(SparseContextRandomSelector.execute(image=photo, seed=4)).scores)
    comb = sels["mask+edge"].scores
    assert torch.allclose(comb[7, 7], torch.tensor(1.0)) and comb[0].max() > 0  # mask inside + edges elsewhere


def test_budget_travels_in_the_selection_with_the_rule_default_coverage(photo):
    auto = _budget(mode="count", token_count=48)
    edge = _out(SparseContextEdgeSelector.execute(image=photo, low_threshold=0.1, high_threshold=0.2, spread=1, budget=auto, weight=2.0))
    sal = _out(SparseContextSaliencySelector.execute(image=photo, blur_tokens=1.0, budget=auto, weight=1.0))
    assert edge.budget.mode == "count" and edge.budget.count == 48 and edge.weight == 2.0
    assert edge.budget.coverage == DEFAULT_COVERAGE["edge"] and sal.budget.coverage == DEFAULT_COVERAGE["saliency"]
    explicit = _budget(coverage=0.5)
    assert _out(SparseContextGridSelector.execute(image=photo, budget=explicit, weight=1.0)).budget.coverage == 0.5


# -- preview -------------------------------------------------------------------------------------
def test_preview_shows_kept_tokens_brighter(photo, tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setattr(folder_paths, "temp_directory", str(tmp_path))
    sel = _out(SparseContextSaliencySelector.execute(image=photo, blur_tokens=1.0, budget=_budget(keep_ratio=0.25), weight=1.0))
    result = SparseContextPreview.execute(photo, sel, 1)
    out = result.result[0]
    assert out.shape == (1, 256, 256, 3) and out.min() >= 0 and out.max() <= 1
    from sparse_context.nodes.preview_node import kept_mask
    from sparse_context.sparse_attention import SparseContextConfig

    keep = kept_mask(sel, 256, 256, SparseContextConfig(bucket=1))
    assert int(keep.sum()) == 64  # 25% of 16 x 16
    ratio = out[0] / photo[0].clamp_min(1e-3)
    per_token = ratio.mean(-1).unfold(0, 16, 16).unfold(1, 16, 16)[..., 2:14, 2:14].mean(dim=(-2, -1))
    bright = photo[0].mean(-1).unfold(0, 16, 16).unfold(1, 16, 16).mean(dim=(-2, -1)) > 0.15  # ratios need light
    away_from_label = torch.ones(16, 16, dtype=torch.bool)
    away_from_label[:2, :10] = False  # the kept-count text box sits on the top-left tokens
    measured = bright & away_from_label
    kept, dropped = per_token[keep & measured], per_token[~keep & measured]
    # kept tokens ~ unchanged, dropped ones dimmed
    assert kept.mean() > 0.9 and dropped.mean() < 0.4, (kept.mean(), dropped.mean())
    images = result.ui.as_dict()["images"] if hasattr(result.ui, "as_dict") else result.ui["images"]
    assert len(images) == 1 and (tmp_path / images[0]["subfolder"] / images[0]["filename"]).is_file()
    # the kept count is written on the image (top-left box is dark with bright text)
    box = out[0, :12, :120]
    assert box.max() > 0.9 and (box < 0.05).float().mean() > 0.5


# -- bad input: clear messages that name the node and the input -------------------------------------
@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda p: SparseContextMaskSelector.execute(mask=torch.zeros(1, 64, 64), inside=1.0, outside=0.0, dilate_tokens=1, feather_tokens=2),
         r"^Sparse Mask Selector: mask: is empty \(all zeros\)"),
        (lambda p: SparseContextMaskSelector.execute(mask=torch.ones(1, 64, 64) * 3, inside=1.0, outside=0.0, dilate_tokens=1, feather_tokens=2),
         r"^Sparse Mask Selector: mask: values must lie in \[0, 1\]"),
        (lambda p: SparseContextMaskSelector.execute(mask=_square_mask(), inside=0.5, outside=0.5, dilate_tokens=1, feather_tokens=2),
         r"^Sparse Mask Selector: inside/outside: must differ"),
        (lambda p: SparseContextEdgeSelector.execute(image=p, low_threshold=0.5, high_threshold=0.2, spread=1),
         r"^Sparse Edge Selector: low_threshold: .*<= high_threshold"),
        (lambda p: SparseContextEdgeSelector.execute(image=torch.rand(1, 4, 64, 64), low_threshold=0.1, high_threshold=0.2, spread=1),
         r"^Sparse Edge Selector: image: expected a ComfyUI IMAGE"),
        (lambda p: _budget(mode="adaptive", min_ratio=0.6, max_ratio=0.5),
         r"^Sparse Budget: min_ratio: must be <= max_ratio"),
        (lambda p: SparseContextApply.execute(sc_testpack.build_model_patcher("flux1_kontext", 1), 0.25, "grid", 0,
                                              64, 0.8, 0.2, 0, True),
         r"^Apply Sparse Context: start_percent: must be <= end_percent"),
        (lambda p: SparseContextPreview.execute(p, "nope", 64),
         r"^Preview Sparse Tokens: selection: expected a SPARSE_SELECTION"),
        (lambda p: SparseContextReferenceLatent.execute(_cond(), None, _out(SparseContextGridSelector.execute(image=p))),
         r"^Sparse Reference Latent: selection: is connected but latent is not"),
    ],
    ids=["empty-mask", "mask-0-255", "inside-eq-outside", "canny-order", "not-an-image", "budget-min-max", "apply-window", "preview-wiring", "ref-latent-missing"],
)
def test_bad_inputs_give_clear_messages(photo, call, pattern):
    with pytest.raises(SparseContextInputError, match=pattern):
        call(photo)


# -- Apply Sparse Context in a real sampling run --------------------------------------------------------
def test_apply_thins_bound_references_and_reports(photo, caplog):
    family = "flux1_kontext"
    base = sc_testpack.build_model_patcher(family, seed=1)
    model = _out(SparseContextApply.execute(base, 0.25, "grid", 0, 1, 0.0, 1.0, 0, True))
    assert model is not base and PATCH_KEY in model.model_options["transformer_options"]
    ref = {"samples": sc_testpack.make_latent(family, 2, 128, 128)}  # 8 x 8 tokens
    sel = _out(SparseContextEdgeSelector.execute(image=photo, low_threshold=0.1, high_threshold=0.2, spread=1, budget=_budget(mode="count", token_count=16), weight=1.0))
    positive = _out(SparseContextReferenceLatent.execute(_cond(family), ref, sel))
    latent = torch.zeros_like(sc_testpack.make_latent(family, 5, 64, 64))
    with caplog.at_level(logging.INFO, logger="SparseContext"):
        out = sample(model, positive, _cond(family, 4), latent, steps=2, seed=7)
        dense = sample(base, positive, _cond(family, 4), latent, steps=2, seed=7)
    assert torch.isfinite(out).all() and (out - dense).abs().max() > 1e-5
    report = model.model_options["transformer_options"][PATCH_KEY].last_report
    assert report["references"] == [{"grid": [8, 8], "tokens": 64, "kept": 16, "rule": "edge"}]
    text = format_report(report, True, 1.5)
    assert text.startswith("Kept 16/64 reference tokens (25%): #1 16/64 (edge)") and "1.50 s" in text
    assert any("Kept 16/64 reference tokens" in r.getMessage() for r in caplog.records), caplog.text

    off = _out(SparseContextApply.execute(base, 0.25, "grid", 0, 1, 0.0, 1.0, 0, False))
    assert torch.equal(sample(off, positive, _cond(family, 4), latent, steps=2, seed=7), dense)
    assert format_report(None, False, 2.0).startswith("Sparse Context off")


# -- through the real server ------------------------------------------------------------------------------
def _graph(mask_node: dict) -> dict:
    f = "flux1_kontext"
    return {
        "1": {"class_type": "SCTest_TinyModel", "inputs": {"family": f, "seed": 1}},
        "2": {"class_type": "SCTest_Conditioning", "inputs": {"family": f, "seed": 3, "tokens": 8}},
        "3": tiny_latent(f, 2, size=128),
        "4": {"class_type": "SCTest_LatentToImage", "inputs": {"samples": ["3", 0]}},
        "5": mask_node,
        "6": {"class_type": "SparseContextMaskSelector", "inputs": {"mask": ["5", 0], "inside": 1.0, "outside": 0.0,
                                                                     "dilate_tokens": 0, "feather_tokens": 0, "weight": 1.0}},
        "7": {"class_type": "SparseContextReferenceLatent", "inputs": {"conditioning": ["2", 0], "latent": ["3", 0],
                                                                       "selection": ["6", 0]}},
        "8": {"class_type": "SparseContextApply", "inputs": {"model": ["1", 0], "keep_ratio": 0.25, "rule": "grid",
                                                             "total_tokens": 0, "bucket": 1, "start_percent": 0.0,
                                                             "end_percent": 1.0, "seed": 0, "enabled": True}},
        "9": tiny_latent(f, 0, empty=True),
        "10": ksampler(["8", 0], ["7", 0], ["2", 0], ["9", 0], steps=2),
        "11": {"class_type": "PreviewImage", "inputs": {"images": ["12", 0]}},
        "12": {"class_type": "SparseContextPreview", "inputs": {"image": ["4", 0], "selection": ["6", 0], "bucket": 1}},
        "13": {"class_type": "SCTest_LatentToImage", "inputs": {"samples": ["10", 0]}},
        "14": {"class_type": "SaveImage", "inputs": {"images": ["13", 0], "filename_prefix": "sc_nodes"}},
    }


def _view(server, image: dict) -> bytes:
    import urllib.parse
    import urllib.request

    query = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
    with urllib.request.urlopen(f"{server.url}/view?{query}", timeout=30) as resp:
        return resp.read()


@pytest.mark.server
def test_server_reports_bad_values_by_node_and_input_and_keeps_running(server):
    # an all-zero mask (what Load Image gives for a picture without alpha): fails at execution, clearly
    bad = _graph({"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 128, "height": 128}})
    msg = server.execution_error(bad)
    assert msg["node_type"] == "SparseContextMaskSelector" and msg["node_id"] == "6"
    assert msg["exception_message"].startswith("Sparse Mask Selector: mask: is empty (all zeros)"), msg
    assert server.proc.poll() is None

    # the server is alive and the same graph with a real mask runs, thins the reference and reports it
    good = _graph({"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 128, "height": 128}})
    good["5"] = {"class_type": "FeatherMask", "inputs": {"mask": ["15", 0], "left": 0, "top": 0, "right": 64,
                                                         "bottom": 64}}
    good["15"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 128, "height": 128}}
    entry = server.run(good)
    assert len(entry["outputs"]["14"]["images"]) == 1
    preview = entry["outputs"]["12"]["images"]
    assert len(preview) == 1 and preview[0]["type"] == "temp"
    assert _view(server, preview[0])[:8] == b"\x89PNG\r\n\x1a\n"  # served like any preview
    log = server.log(400)
    assert "SparseContext: kept reference tokens #1 16/64 (mask)" in log, log
    assert "SparseContext (node 8): Kept 16/64 reference tokens" in log, log
