"""The shipped workflows: they load against the real server's node definitions, the API copies match
them, the template browser lists them, and every one runs end to end (tiny models swapped in).

Each file is saved as the oldest ComfyUI with its core nodes saves it (``scripts/build_workflows.py``: 0.3.75,
or 0.30.0 for the families added in 0.29-0.30). On that host it must match the node definitions exactly; on a
newer host it must be what that host accepts from an older workflow, the way its frontend loads one
(``test_browser.py`` checks the frontend does that): widgets a core node gained since keep their defaults,
output slots it gained are added, inputs are matched by name. An older host skips it (it lacks the nodes).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sc_harness.host import PINNED_VERSION, REPO, comfyui_version
from sc_harness.workflow_convert import (
    FRONTEND_ONLY,
    _inputs,
    combo_options,
    grown_sockets,
    needs_newer_host,
    saved_with,
    socket_inputs,
    ui_to_api,
    version_key,
    widget_slots,
    with_widget_defaults,
)

UI_DIR = REPO / "workflows"
API_DIR = REPO / "tests" / "workflows_api"
NAMES = sorted(p.stem for p in UI_DIR.glob("*.json"))
EXPECTED = {
    "sparse_kontext_edit_edge", "sparse_masked_edit", "sparse_flux2_klein_multi_reference",
    "sparse_qwen_image_edit_2509", "sparse_dense_vs_sparse", "sparse_train_lora", "sparse_calibrate_keep",
    "sparse_mage_flow_edit", "sparse_krea2_style_reference", "sparse_z_image_omni_edit", "sparse_joyimage_edit",
    "sparse_longcat_image_edit",
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


def shipped_prompt(name: str, object_info: dict) -> dict:
    """The committed API copy as this host's frontend queues the UI file (new widgets at their defaults)."""
    return with_widget_defaults(_load(API_DIR, name), object_info)


def saved_with_older_core(node: dict, host: str) -> bool:
    """A core node the file says an older ComfyUI saved (``properties``: cnr_id comfy-core, ver)."""
    props = node.get("properties") or {}
    return props.get("cnr_id") == "comfy-core" and version_key(str(props.get("ver", host))) < version_key(host)


def on_hosts_with_its_nodes(names) -> list:
    """``names`` as pytest params; one saved with a newer ComfyUI than this host is skipped, saying why."""
    reasons = {n: needs_newer_host(_load(UI_DIR, n), comfyui_version()) for n in names}
    return [pytest.param(n, marks=pytest.mark.skipif(reasons[n] is not None, reason=str(reasons[n]))) for n in names]


def test_the_workflows_ship_in_both_formats():
    assert set(NAMES) == EXPECTED
    assert {p.stem for p in API_DIR.glob("*.json")} == EXPECTED


# -- UI format against the real node definitions -------------------------------------------------------
def _problems(workflow: dict, info: dict, host: str = PINNED_VERSION) -> list[str]:
    """What is wrong with a UI workflow on ComfyUI ``host`` with node definitions ``info``.

    A node saved by this very version (or a pack node) must match its definition exactly. A core node saved
    by an older ComfyUI is loaded the way the frontend loads it: its widget values fill the widgets by
    position and widgets past them keep their defaults (more values than widgets is an error), its inputs
    are matched by name (each must still exist with its type; a required one it lacks is unconnected), and
    its outputs must be the first of the definition's (slots added since are appended)."""
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
        older = saved_with_older_core(node, host)
        slots = widget_slots(spec)
        values = node.get("widgets_values") or []
        if len(values) > len(slots) or (len(values) < len(slots) and not older):
            problems.append(f"{where}: {len(values)} widget values for {slots}")
            continue
        declared = {name: (k, opts) for name, k, opts, _ in _inputs(spec)}
        for name, value in zip(slots, values, strict=False):  # widgets past the values keep their defaults
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
        plain = [i for i in node["inputs"] if "widget" not in i]  # widget inputs driven by a link are checked below
        sockets = socket_inputs(spec, grown_sockets(spec, [i["name"] for i in plain]))
        saved = [(i["name"], i["type"]) for i in plain]
        if older:
            gone = [n for n, t in saved if (n, t) not in [(sn, st) for sn, st, _ in sockets]]
            if gone:
                problems.append(f"{where}: inputs {gone} are not inputs of {kind} (with that type) any more")
        elif saved != [(n, t) for n, t, _ in sockets]:
            problems.append(f"{where}: inputs {[n for n, _ in saved]} != {[n for n, _, _ in sockets]}")
        for inp in node["inputs"]:  # a widget driven by a link: a real widget of that type
            if "widget" in inp and (inp["widget"].get("name") != inp["name"] or inp["name"] not in slots
                                    or declared[inp["name"]][0] != inp["type"]):
                problems.append(f"{where}: widget input {inp['name']} ({inp['type']}) is not a widget of that type")
        links_in = {i["name"]: i.get("link") for i in plain}
        for name, _, optional in sockets:
            if not optional and links_in.get(name) is None and node["mode"] == 0:
                problems.append(f"{where}: required input {name} is not connected")
        outputs = [o["type"] for o in node["outputs"]]
        if outputs != (spec["output"][: len(outputs)] if older else spec["output"]):
            problems.append(f"{where}: outputs {outputs} != {spec['output']}")
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
@pytest.mark.parametrize("name", on_hosts_with_its_nodes(NAMES))
def test_ui_workflow_is_valid_for_the_real_server(name, object_info):
    workflow = _load(UI_DIR, name)
    assert _problems(workflow, object_info, comfyui_version()) == []
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
    evidence = json.loads((REPO / "experiments" / "natural" / "results" / "natural.json").read_text(encoding="utf-8"))["summary"]["recommended_keep"]
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


def _node(node_id: int, kind: str, values: list, outputs: list[str], inputs=(), ver: str = "0.3.75", pack="comfy-core"):
    return {"id": node_id, "type": kind, "mode": 0, "widgets_values": values,
            "inputs": [{"name": n, "type": t, "link": link} for n, t, link in inputs],
            "outputs": [{"name": t, "type": t, "links": None} for t in outputs],
            "properties": {"cnr_id": pack, "ver": ver}}


def test_validator_loads_older_core_nodes_like_the_frontend():
    """What a newer host accepts from a file an older ComfyUI saved, and what it still refuses."""
    info = {  # a newer host: "Scale" gained the widget `steps`, "Save" an IMAGE output, "Mix" a required `mask`
        "Scale": {"input": {"required": {"method": [["area", "lanczos"], {}], "mp": ["FLOAT", {"min": 0.1, "max": 4.0}],
                                         "steps": ["INT", {"default": 1, "min": 1, "max": 8}]}},
                  "input_order": {"required": ["method", "mp", "steps"]}, "output": ["IMAGE"], "output_name": ["IMAGE"]},
        "Save": {"input": {"required": {"prefix": ["STRING", {}]}}, "input_order": {"required": ["prefix"]},
                 "output": ["IMAGE"], "output_name": ["IMAGE"]},
        "Mix": {"input": {"required": {"image": ["IMAGE", {}], "mask": ["MASK", {}]}},
                "input_order": {"required": ["image", "mask"]}, "output": [], "output_name": []},
    }

    def problems(*nodes, host="0.30.0") -> str:
        return "\n".join(_problems({"version": 0.4, "nodes": list(nodes), "links": []}, info, host))

    scale, save = _node(1, "Scale", ["lanczos", 1.0], ["IMAGE"]), _node(2, "Save", ["x"], [])
    assert problems(scale, save) == ""  # saved by 0.3.75, loaded by 0.30.0: defaults and a new slot
    text = problems(scale, save, host="0.3.75")  # the version that saved them: exactly its definitions
    assert "2 widget values" in text and "outputs [] != ['IMAGE']" in text, text
    assert "2 widget values" in problems(_node(1, "Scale", ["lanczos", 1.0], ["IMAGE"], pack="sparse-context"))
    assert "4 widget values" in problems(_node(1, "Scale", ["lanczos", 1.0, 2, 3], ["IMAGE"]))
    assert "mp=9.0 outside" in problems(_node(1, "Scale", ["lanczos", 9.0], ["IMAGE"]))
    assert "outputs ['LATENT']" in problems(_node(1, "Scale", ["lanczos", 1.0], ["LATENT"]))
    mix = _node(3, "Mix", [], [], inputs=[("image", "IMAGE", None), ("latent", "LATENT", None)])
    text = problems(mix)
    assert "['latent'] are not inputs" in text and "required input image is not connected" in text, text
    assert "required input mask is not connected" in text, text


def test_converter_does_what_the_frontend_does_with_widgets():
    """New widgets keep their defaults; an INT named seed gets a control widget unless its input says no."""
    from sc_harness.workflow_convert import widget_default

    info = {"K": {"input": {"required": {"seed": ["INT", {"default": 0}], "mode": [["p", "q"], {}],
                                         "noise_seed": ["INT", {"control_after_generate": False}],
                                         "added": ["INT", {"default": 3}], "flag": ["BOOLEAN", {}]}},
                  "input_order": {"required": ["seed", "mode", "noise_seed", "added", "flag"]},
                  "output": [], "output_name": [], "display_name": "K node"}}
    assert widget_slots(info["K"]) == ["seed", None, "mode", "noise_seed", "added", "flag"]
    node = _node(1, "K", [5, "fixed", "q", 7], [])
    prompt = ui_to_api({"nodes": [node], "links": []}, info)
    assert prompt == {"1": {"class_type": "K", "inputs": {"seed": 5, "mode": "q", "noise_seed": 7, "added": 3, "flag": False},
                            "_meta": {"title": "K node"}}}
    older = {"1": {"class_type": "K", "inputs": {"seed": 5, "mode": "q", "noise_seed": 7}}}
    assert with_widget_defaults(older, info)["1"]["inputs"] == prompt["1"]["inputs"] and "added" not in older["1"]["inputs"]
    assert [widget_default(["a", "b"], {}), widget_default("FLOAT", {}), widget_default("STRING", {})] == ["a", 0.0, ""]


def _executable(prompt: dict) -> dict:
    """What the server runs of a prompt: class types and inputs (``_meta`` titles are the UI's)."""
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}


@pytest.mark.server
@pytest.mark.parametrize("name", on_hosts_with_its_nodes(NAMES))
def test_api_copy_matches_the_ui_workflow(name, object_info):
    """tests/workflows_api holds what the saving host's frontend queues for each UI file, checked exactly there.
    On a newer host the UI file must give the same graph once the widgets added since take their defaults
    (``shipped_prompt``); node titles come from each host's display names, so they are compared on the
    saving host only (``test_browser.py`` checks them against each host's frontend)."""
    queued = ui_to_api(_load(UI_DIR, name), object_info)
    if comfyui_version() == saved_with(_load(UI_DIR, name)):
        assert _load(API_DIR, name) == queued, (
            "tests/workflows_api is out of date: run `.venv/bin/python scripts/build_workflows.py`")
    else:
        assert _executable(shipped_prompt(name, object_info)) == _executable(queued)


@pytest.mark.server
def test_template_browser_lists_the_pack_workflows(server):
    listed = server.get("/workflow_templates")
    assert sorted(listed.get("sparse_context", [])) == sorted(EXPECTED), listed


# -- end to end on tiny models -----------------------------------------------------------------------------
#: UNETLoader file name -> tiny model family (most specific first)
FAMILY_KEYS = (("mage_flow", "mage_flow"), ("krea2", "krea2"), ("z_image", "z_image_omni"), ("joyai", "joyimage_edit"),
               ("longcat", "longcat_image_edit"), ("kontext", "flux1_kontext"), ("klein", "flux2_klein"),
               ("qwen", "qwen_image_edit"))
#: core text encoders that encode their images as references themselves (with a VAE)
REFERENCE_ENCODERS = {"TextEncodeQwenImageEditPlus", "TextEncodeQwenImageEdit", "TextEncodeZImageOmni",
                      "TextEncodeJoyImageEdit", "TextEncodeMageFlowEdit"}


def family_of(prompt: dict) -> str:
    names = " ".join(str(n["inputs"].get("unet_name", "")) for n in prompt.values() if n["class_type"] == "UNETLoader")
    for key, family in FAMILY_KEYS:
        if key in names:
            return family
    raise AssertionError(f"no known model in {names!r}")


def _image_inputs(inputs: dict) -> list[str]:
    """A reference encoder's connected image inputs, in order (``image``, ``image1..3``, Autogrow ``images.*``)."""
    return [k for k in inputs if (k == "image" or k.startswith(("image1", "image2", "image3", "images.")))
            and isinstance(inputs[k], list)]


def swap_for_tiny_models(prompt: dict) -> dict:
    """The shipped API prompt with real loaders, text encoders and VAE replaced by the test pack's tiny ones.

    UNETLoader -> SCTest_TinyModel of the workflow's family; LoRA loaders are bypassed (no tiny LoRA);
    CLIPTextEncode -> SCTest_Conditioning; a text encoder that encodes its images as references (Qwen-Image-Edit,
    Z-Image omni, JoyImage-Edit, Mage-Flow-Edit) -> SCTest_Conditioning + one core ReferenceLatent per connected
    image (what it does with a VAE), per conditioning output, and Mage-Flow-Edit's latent output ->
    SCTest_Latent(empty); VAEEncode -> SCTest_Latent (256 px); VAEDecode -> SCTest_LatentToImage; empty latents ->
    SCTest_Latent(empty); the loaders of CLIP and VAE disappear. Samplers run 2 steps. Apply Sparse Context:
    bucket 1 (a tiny reference has fewer tokens than one bucket of 64) and total_tokens scaled by tiny/real tokens
    (256/4096), so the kept SHARE is the shipped one. Everything else (LoadImage, scalers, selectors, preview,
    guiders, reference methods) runs as shipped.
    """
    family = family_of(prompt)
    p = copy.deepcopy(prompt)
    seed = iter(range(100, 10_000))
    rewire: dict[tuple[str, int], list] = {}  # (node, output) -> the output that replaces it

    def latent(empty: bool) -> dict:
        return {"class_type": "SCTest_Latent", "inputs": {"family": family, "seed": next(seed), "width": TINY_REF_PX,
                                                          "height": TINY_REF_PX, "batch_size": 1, "empty": empty}}

    def conditioning() -> dict:
        return {"class_type": "SCTest_Conditioning", "inputs": {"family": family, "seed": next(seed), "tokens": 8}}

    def with_references(node_id: str, images: list[str]) -> list:
        """Conditioning + one ReferenceLatent per image, chained; returns the chain's output."""
        out = [f"{node_id}_cond", 0]
        p[out[0]] = conditioning()
        for k in images:
            ref_id = f"{node_id}_{k}"
            p[f"{ref_id}_latent"] = latent(False)
            p[ref_id] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": out, "latent": [f"{ref_id}_latent", 0]}}
            out = [ref_id, 0]
        return out

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
        elif kind in REFERENCE_ENCODERS:
            del p[node_id]
            images = _image_inputs(inputs)
            outputs = 2 if kind == "TextEncodeMageFlowEdit" else 1  # positive and negative, both with the images
            for out in range(outputs):
                rewire[(node_id, out)] = with_references(f"{node_id}_{out}", images)
            if kind == "TextEncodeMageFlowEdit":
                p[f"{node_id}_latent"] = latent(True)
                rewire[(node_id, 2)] = [f"{node_id}_latent", 0]
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
            if isinstance(value, list) and (value[0], value[1]) in rewire:
                value = rewire[(value[0], value[1])]
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
@pytest.mark.parametrize("name", on_hosts_with_its_nodes(sorted(EXPECTED - {"sparse_dense_vs_sparse",
                                                                            "sparse_calibrate_keep"} - TRAINING)))
def test_shipped_workflow_runs_dense_and_sparse_on_tiny_models(server, object_info, name):
    _example_png(server.tmp / "input")
    sparse = swap_for_tiny_models(shipped_prompt(name, object_info))
    entry, log = _run(server, sparse)
    runs = _kept(log)
    assert runs, f"no SparseContext report in the server log:\n{log[-3000:]}"
    n_refs = {"sparse_flux2_klein_multi_reference": 3, "sparse_qwen_image_edit_2509": 3,
              "sparse_mage_flow_edit": 2}.get(name, 1)
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
def test_dense_vs_sparse_workflow_shows_both_branches(server, object_info):
    _example_png(server.tmp / "input")
    entry, log = _run(server, swap_for_tiny_models(shipped_prompt("sparse_dense_vs_sparse", object_info)))
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
def test_calibrate_workflow_drives_apply_with_the_calibrated_keep(server, object_info, min_psnr):
    _example_png(server.tmp / "input")
    prompt = swap_for_tiny_models(shipped_prompt("sparse_calibrate_keep", object_info))
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
