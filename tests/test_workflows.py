"""The shipped workflows: they load against the real server's node definitions, the API copies match
them, the template browser lists them, and every one runs end to end (tiny models swapped in)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sc_harness.host import REPO
from sc_harness.workflow_convert import (
    FRONTEND_ONLY,
    _inputs,
    combo_options,
    socket_inputs,
    ui_to_api,
    widget_slots,
)

UI_DIR = REPO / "workflows"
API_DIR = REPO / "tests" / "workflows_api"
NAMES = sorted(p.stem for p in UI_DIR.glob("*.json"))
EXPECTED = {
    "sparse_kontext_edit_edge", "sparse_masked_edit", "sparse_flux2_klein_multi_reference",
    "sparse_qwen_image_edit_2509", "sparse_dense_vs_sparse", "sparse_train_lora", "sparse_calibrate_keep",
}
TRAINING = {"sparse_train_lora"}  # runs end to end in tests/test_training.py (it trains), not below
FILE_WIDGETS = {"UNETLoader", "DualCLIPLoader", "CLIPLoader", "VAELoader", "LoraLoaderModelOnly", "LoadImage"}
REPORT = re.compile(r"SparseContext: kept reference tokens (.*); joint attention work (\d+)% of dense")
TINY_REF_PX = 256  # tiny test references: 256 px = 256 tokens (a real 1024 px reference has 4096)


def _load(folder: Path, name: str) -> dict:
    return json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def object_info(server) -> dict:
    return server.object_info()


def test_the_workflows_ship_in_both_formats():
    assert set(NAMES) == EXPECTED
    assert {p.stem for p in API_DIR.glob("*.json")} == EXPECTED


# -- UI format against the real node definitions -------------------------------------------------------
def _problems(workflow: dict, info: dict) -> list[str]:
    problems = []
    nodes = {n["id"]: n for n in workflow["nodes"]}
    if workflow.get("version") != 0.4:
        problems.append(f"version {workflow.get('version')}")
    for node in workflow["nodes"]:
        kind, where = node["type"], f"node {node['id']} ({node['type']})"
        if kind in FRONTEND_ONLY:
            if not node["widgets_values"] or not str(node["widgets_values"][0]).strip():
                problems.append(f"{where}: empty note")
            continue
        if kind not in info:
            problems.append(f"{where}: unknown node type")
            continue
        spec = info[kind]
        slots = widget_slots(spec)
        values = node.get("widgets_values") or []
        if len(values) != len(slots):
            problems.append(f"{where}: {len(values)} widget values for {slots}")
            continue
        declared = {name: (k, opts) for name, k, opts, _ in _inputs(spec)}
        for name, value in zip(slots, values, strict=True):
            if name is None:
                continue
            k, opts = declared[name]
            options = combo_options(k, opts)
            if options is not None:
                if kind in FILE_WIDGETS and value not in options:  # model/input files: none on a test server
                    listed = [m["name"] for m in node["properties"].get("models", [])]
                    ok = (kind == "LoadImage" and isinstance(value, str)) or value in listed
                    if not ok:
                        problems.append(f"{where}: {name}={value!r} is not in its properties.models {listed}")
                elif value not in options:
                    problems.append(f"{where}: {name}={value!r} not in {options}")
            elif k in ("INT", "FLOAT"):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or (k == "INT" and not isinstance(value, int)):
                    problems.append(f"{where}: {name}={value!r} is not {k}")
                elif not opts.get("min", -np.inf) <= value <= opts.get("max", np.inf):
                    problems.append(f"{where}: {name}={value!r} outside [{opts.get('min')}, {opts.get('max')}]")
            elif k == "BOOLEAN" and not isinstance(value, bool):
                problems.append(f"{where}: {name}={value!r} is not BOOLEAN")
            elif k == "STRING" and not isinstance(value, str):
                problems.append(f"{where}: {name}={value!r} is not STRING")
        sockets = socket_inputs(spec)
        plain = [i for i in node["inputs"] if "widget" not in i]
        if [(i["name"], i["type"]) for i in plain] != [(n, t) for n, t, _ in sockets]:
            problems.append(f"{where}: inputs {[i['name'] for i in plain]} != {[n for n, _, _ in sockets]}")
        for inp in node["inputs"]:  # a widget driven by a link: a real widget of that type
            if "widget" in inp and (inp["widget"].get("name") != inp["name"] or inp["name"] not in slots
                                    or declared[inp["name"]][0] != inp["type"]):
                problems.append(f"{where}: widget input {inp['name']} ({inp['type']}) is not a widget of that type")
        for (name, _, optional), inp in zip(sockets, plain, strict=False):
            if not optional and inp.get("link") is None and node["mode"] == 0:
                problems.append(f"{where}: required input {name} is not connected")
        if [o["type"] for o in node["outputs"]] != spec["output"]:
            problems.append(f"{where}: outputs {[o['type'] for o in node['outputs']]} != {spec['output']}")
    for link_id, src, out, dst, slot, kind in workflow["links"]:
        a, b = nodes.get(src), nodes.get(dst)
        if a is None or b is None:
            problems.append(f"link {link_id}: missing node")
            continue
        out_type = a["outputs"][out]["type"]
        in_type = b["inputs"][slot]["type"]
        if not (kind == out_type and (in_type == kind or in_type == "*")):
            problems.append(f"link {link_id}: {a['type']}.{out_type} -> {b['type']}.{in_type} typed {kind}")
        if link_id not in (a["outputs"][out]["links"] or []) or b["inputs"][slot]["link"] != link_id:
            problems.append(f"link {link_id}: not recorded on both ends")
    return problems


def _overlaps(workflow: dict) -> list[tuple[int, int]]:
    boxes = [(n["id"], n["pos"][0], n["pos"][1] - 30, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in workflow["nodes"]]  # 30 px: the title bar above pos
    return [(a[0], b[0]) for i, a in enumerate(boxes) for b in boxes[i + 1:]
            if a[1] < b[3] and b[1] < a[3] and a[2] < b[4] and b[2] < a[4]]


@pytest.mark.server
@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_is_valid_for_the_real_server(name, object_info):
    workflow = _load(UI_DIR, name)
    assert _problems(workflow, object_info) == []
    assert _overlaps(workflow) == [], "nodes overlap (the README screenshot needs a tidy graph)"
    types = {n["type"] for n in workflow["nodes"]}
    assert "MarkdownNote" in types and "SparseContextApply" in types
    assert name in TRAINING or "SparseContextPreview" in types, "every inference workflow shows its kept tokens"
    for node in workflow["nodes"]:
        if node["type"] in FILE_WIDGETS - {"LoadImage"}:  # real model files with download links, like the templates
            models = node["properties"]["models"]
            assert models and all(m["url"].startswith("https://huggingface.co/") and m["directory"] for m in models)


@pytest.mark.parametrize("name", NAMES)
def test_seeds_are_fixed_where_notes_compare_runs(name):
    """Every note tells the user to compare with dense at the same seed: a randomized seed would change it."""
    workflow = _load(UI_DIR, name)
    for node in workflow["nodes"]:
        if node["type"] in ("KSampler", "RandomNoise"):
            assert node["widgets_values"][1] == "fixed", f"{name}: node {node['id']} {node['type']} randomizes its seed"


ALIGNED_EDITS = ("sparse_kontext_edit_edge", "sparse_masked_edit", "sparse_dense_vs_sparse")


@pytest.mark.parametrize("name", ALIGNED_EDITS)
def test_aligned_edit_workflows_keep_what_the_evidence_recommends(name):
    """An aligned edit copies every token it does not change: the natural-image run's recommended keep for edits
    (with the drop-robust fine-tune; none without) is the floor, and the note says how to go lower."""
    evidence = json.loads((REPO / "docs" / "natural.json").read_text(encoding="utf-8"))["summary"]["recommended_keep"]
    floor = min(evidence["edit"]["lora"], evidence["edit"]["full_ft"])
    workflow = _load(UI_DIR, name)
    keeps = [n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "SparseContextApply"]
    keeps += [n["widgets_values"][1] for n in workflow["nodes"] if n["type"] == "SparseContextBudget"]
    assert keeps and min(keeps) >= floor, (keeps, floor)
    note = next(n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "MarkdownNote")
    assert "LoRA" in note and "sparse_calibrate_keep" in note


def test_validator_catches_broken_workflows():
    info = json.loads(json.dumps({
        "A": {"input": {"required": {"x": ["INT", {"min": 0, "max": 3}], "c": [["p", "q"], {}]}},
              "input_order": {"required": ["x", "c"]}, "output": ["IMAGE"], "output_name": ["IMAGE"]},
        "B": {"input": {"required": {"image": ["LATENT", {}]}}, "input_order": {"required": ["image"]},
              "output": [], "output_name": []},
    }))
    wf = {"version": 0.4, "nodes": [
        {"id": 1, "type": "A", "mode": 0, "inputs": [], "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [1]}],
         "widgets_values": [7, "z"], "properties": {}},
        {"id": 2, "type": "B", "mode": 0, "inputs": [{"name": "image", "type": "LATENT", "link": 1}], "outputs": [],
         "widgets_values": [], "properties": {}},
        {"id": 3, "type": "Nope", "mode": 0, "inputs": [], "outputs": [], "widgets_values": [], "properties": {}},
    ], "links": [[1, 1, 0, 2, 0, "IMAGE"]]}
    text = "\n".join(_problems(wf, info))
    for expected in ("x=7 outside", "c='z' not in", "IMAGE -> B.LATENT", "unknown node type"):
        assert expected in text, text


@pytest.mark.server
@pytest.mark.parametrize("name", NAMES)
def test_api_copy_matches_the_ui_workflow(name, object_info):
    assert _load(API_DIR, name) == ui_to_api(_load(UI_DIR, name), object_info), (
        "tests/workflows_api is out of date: run `.venv/bin/python scripts/build_workflows.py`")


@pytest.mark.server
def test_template_browser_lists_the_pack_workflows(server):
    listed = server.get("/workflow_templates")
    assert sorted(listed.get("sparse_context", [])) == sorted(EXPECTED), listed


# -- end to end on tiny models -----------------------------------------------------------------------------
def family_of(prompt: dict) -> str:
    names = " ".join(str(n["inputs"].get("unet_name", "")) for n in prompt.values() if n["class_type"] == "UNETLoader")
    for key, family in (("kontext", "flux1_kontext"), ("klein", "flux2_klein"), ("qwen", "qwen_image_edit")):
        if key in names:
            return family
    raise AssertionError(f"no known model in {names!r}")


def swap_for_tiny_models(prompt: dict) -> dict:
    """The shipped API prompt with real loaders, text encoders and VAE replaced by the test pack's tiny ones.

    UNETLoader -> SCTest_TinyModel of the workflow's family; LoRA loaders are bypassed (no tiny LoRA);
    CLIPTextEncode -> SCTest_Conditioning; TextEncodeQwenImageEditPlus -> SCTest_Conditioning + one core
    ReferenceLatent per connected image (what it does with a VAE); VAEEncode -> SCTest_Latent (256 px);
    VAEDecode -> SCTest_LatentToImage; empty latents -> SCTest_Latent(empty); the loaders of CLIP and VAE
    disappear. Samplers run 2 steps. Apply Sparse Context: bucket 1 (a tiny reference has fewer tokens than
    one bucket of 64) and total_tokens scaled by tiny/real tokens (256/4096), so the kept SHARE is the
    shipped one. Everything else (LoadImage, scalers, selectors, preview, guiders) runs as shipped.
    """
    family = family_of(prompt)
    p = copy.deepcopy(prompt)
    seed = iter(range(100, 10_000))

    def latent(empty: bool) -> dict:
        return {"class_type": "SCTest_Latent", "inputs": {"family": family, "seed": next(seed), "width": TINY_REF_PX,
                                                          "height": TINY_REF_PX, "batch_size": 1, "empty": empty}}

    def conditioning() -> dict:
        return {"class_type": "SCTest_Conditioning", "inputs": {"family": family, "seed": next(seed), "tokens": 8}}

    bypass = {}
    for node_id, node in list(p.items()):
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "UNETLoader":
            p[node_id] = {"class_type": "SCTest_TinyModel", "inputs": {"family": family, "seed": 1}}
        elif kind == "LoraLoaderModelOnly":
            bypass[node_id] = inputs["model"]
        elif kind in ("CLIPLoader", "DualCLIPLoader", "VAELoader"):
            del p[node_id]
        elif kind == "CLIPTextEncode":
            p[node_id] = conditioning()
        elif kind == "TextEncodeQwenImageEditPlus":
            previous = [f"{node_id}_cond", 0]
            p[previous[0]] = conditioning()
            images = [k for k in ("image1", "image2", "image3") if k in inputs]
            for j, k in enumerate(images):  # the last reference takes the encoder's id: its consumers stay wired
                ref_id = node_id if j == len(images) - 1 else f"{node_id}_{k}"
                p[f"{node_id}_{k}_latent"] = latent(False)
                p[ref_id] = {"class_type": "ReferenceLatent",
                             "inputs": {"conditioning": previous, "latent": [f"{node_id}_{k}_latent", 0]}}
                previous = [ref_id, 0]
            if not images:
                p[node_id] = p.pop(previous[0])
        elif kind == "VAEEncode":
            p[node_id] = latent(False)
        elif kind in ("EmptySD3LatentImage", "EmptyFlux2LatentImage", "EmptyLatentImage"):
            p[node_id] = latent(True)
        elif kind == "VAEDecode":
            p[node_id] = {"class_type": "SCTest_LatentToImage", "inputs": {"samples": inputs["samples"]}}
        elif kind in ("KSampler", "Flux2Scheduler"):
            inputs["steps"] = 2
        elif kind == "SparseContextCalibrate":
            inputs.pop("vae", None)  # no tiny VAE: it compares latents
            inputs["steps"] = 2
        elif kind == "SparseContextApply":
            inputs["bucket"] = 1
            inputs["total_tokens"] = inputs["total_tokens"] * TINY_REF_PX**2 // 1024**2
    for node_id in bypass:
        del p[node_id]
    for node in p.values():
        for name, value in node["inputs"].items():
            while isinstance(value, list) and value[0] in bypass:
                value = bypass[value[0]]
            node["inputs"][name] = value
    return p


def _example_png(folder: Path) -> None:
    """A real photo (skimage astronaut, 128 px) with a transparent square: Load Image's MASK is 1 there."""
    from skimage import data as skdata

    rgb = np.asarray(Image.fromarray(skdata.astronaut()).resize((128, 128), Image.Resampling.LANCZOS))
    alpha = np.full((128, 128, 1), 255, np.uint8)
    alpha[40:88, 32:80] = 0
    Image.fromarray(np.concatenate([rgb, alpha], -1), "RGBA").save(folder / "example.png")


def _run(server, prompt: dict) -> tuple[dict, str]:
    start = server.log_path.stat().st_size
    entry = server.run(prompt, timeout=600)
    with open(server.log_path, encoding="utf-8", errors="replace") as fh:
        fh.seek(start)
        return entry, fh.read()


def _saved(server, entry: dict) -> list[np.ndarray]:
    out = []
    for node_out in entry["outputs"].values():
        for image in node_out.get("images", []):
            if image.get("type") == "output":
                out.append(np.asarray(Image.open(server.output_path(image))).astype(np.float32))
    return out


def _kept(log: str) -> list[list[tuple[int, int]]]:
    """Per sampling run: [(kept, total)] per reference, from the patch's report lines."""
    return [[(int(a), int(b)) for a, b in re.findall(r"#\d+ (\d+)/(\d+)", m.group(1))] for m in REPORT.finditer(log)]


@pytest.mark.server
@pytest.mark.parametrize("name", sorted(EXPECTED - {"sparse_dense_vs_sparse", "sparse_calibrate_keep"} - TRAINING))
def test_shipped_workflow_runs_dense_and_sparse_on_tiny_models(server, name):
    _example_png(server.tmp / "input")
    sparse = swap_for_tiny_models(_load(API_DIR, name))
    entry, log = _run(server, sparse)
    runs = _kept(log)
    assert runs, f"no SparseContext report in the server log:\n{log[-3000:]}"
    n_refs = {"sparse_flux2_klein_multi_reference": 3, "sparse_qwen_image_edit_2509": 3}.get(name, 1)
    assert all(len(r) == n_refs for r in runs), runs
    assert all(0 < kept < total for r in runs for kept, total in r), f"no tokens dropped: {runs}"
    assert "Kept " in log and "Sampling took" in log  # the node's own report line (also sent to the UI)

    dense = copy.deepcopy(sparse)
    for node in dense.values():
        if node["class_type"] == "SparseContextApply":
            node["inputs"]["enabled"] = False
    dense_entry, dense_log = _run(server, dense)
    assert _kept(dense_log) == [] and "Sparse Context off" in dense_log
    a, b = _saved(server, entry), _saved(server, dense_entry)
    assert len(a) == len(b) == 1 and a[0].shape == b[0].shape
    assert np.abs(a[0] - b[0]).max() > 0, "dropping reference tokens should change the picture"


@pytest.mark.server
def test_dense_vs_sparse_workflow_shows_both_branches(server):
    _example_png(server.tmp / "input")
    entry, log = _run(server, swap_for_tiny_models(_load(API_DIR, "sparse_dense_vs_sparse")))
    runs = _kept(log)
    assert len(runs) == 1 and all(0 < k < t for k, t in runs[0]), runs  # only the sparse branch thins
    assert "Sparse Context off (dense references). Sampling took" in log
    assert re.search(r"Kept \d+/\d+ reference tokens .* Sampling took [\d.]+ s", log)
    [stitched] = _saved(server, entry)
    half = stitched.shape[1] // 2
    left, right = stitched[:, : half - 8], stitched[:, half + 8:]
    assert left.shape == right.shape and np.abs(left - right).max() > 0


@pytest.mark.server
@pytest.mark.parametrize("min_psnr", [None, 0.0])
def test_calibrate_workflow_drives_apply_with_the_calibrated_keep(server, min_psnr):
    _example_png(server.tmp / "input")
    prompt = swap_for_tiny_models(_load(API_DIR, "sparse_calibrate_keep"))
    [calib] = [n for n in prompt.values() if n["class_type"] == "SparseContextCalibrate"]
    if min_psnr is not None:
        calib["inputs"]["min_psnr"] = min_psnr
    entry, log = _run(server, prompt)
    found = re.search(r"Sparse Context Calibrate \(latent, 2 steps, seed 42\): recommended keep_ratio ([\d.]+)", log)
    assert found, log[-3000:]
    keep = float(found.group(1))
    measured = {float(k): float(v) for k, v in re.findall(r"keep ([\d.]+): PSNR ([\d.inf-]+) dB", log)}
    assert sorted(measured) == [0.1, 0.25, 0.5, 0.75]
    threshold = calib["inputs"]["min_psnr"]
    assert all(v >= threshold for k, v in measured.items() if k >= keep), (keep, measured)
    if min_psnr == 0.0:
        assert keep == 0.1
    runs = _kept(log)
    assert len(runs) == 5, runs  # four calibration runs, then the workflow's own sampler
    [(kept, total)] = runs[-1]
    assert abs(kept / total - keep) <= 1 / total, (kept, total, keep)
    assert len(_saved(server, entry)) == 1


def test_swap_is_a_pure_function_of_the_shipped_file():
    shipped = _load(API_DIR, "sparse_qwen_image_edit_2509")
    before = json.dumps(shipped, sort_keys=True)
    swapped = swap_for_tiny_models(shipped)
    assert json.dumps(shipped, sort_keys=True) == before
    kinds = {n["class_type"] for n in swapped.values()}
    assert not kinds & {"UNETLoader", "CLIPLoader", "VAELoader", "LoraLoaderModelOnly", "TextEncodeQwenImageEditPlus"}
    assert sum(n["class_type"] == "ReferenceLatent" for n in swapped.values()) == 6  # 3 images x (pos, neg)
