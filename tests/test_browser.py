"""The shipped workflows in the REAL ComfyUI frontend (headless Chromium), served by the real server.

Each ``workflows/*.json`` is fetched from the server's template route (as the template browser does)
and loaded into the UI; the frontend must not report missing nodes, every node must have a
registered class, and the prompt the frontend would queue must be the one ``ui_to_api`` computes (so the
converter the other tests trust does what the frontend of this ComfyUI does, new widgets' defaults
included). Each frontend version reports missing nodes its own way (a dialog up to 1.3x, the Errors tab
from 1.4x): ``ComfyPage.missing_nodes_report`` reads either. A screenshot per workflow goes to
``$SC_SCREENSHOT_DIR`` (default: a pytest tmp dir).
Regenerate the README picture with
``SC_SCREENSHOT_DIR=/tmp/shots .venv/bin/pytest tests/test_browser.py -q -x &&
cp /tmp/shots/sparse_flux2_klein_multi_reference.png docs/workflow_screenshot.png``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sc_harness.browser import ComfyPage, chromium_paths, read_workflow, start_chromium
from sc_harness.host import REPO, comfyui_version
from sc_harness.server import PACK_NAME
from sc_harness.workflow_convert import AUTOGROW, needs_newer_host, ui_to_api

pytestmark = [pytest.mark.browser, pytest.mark.server]

WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))


def _loadable(paths: list[Path]) -> list:
    """The workflows as params; one saved with a newer ComfyUI than this host is skipped (it lacks the nodes)."""
    reasons = {p: needs_newer_host(read_workflow(p), comfyui_version()) for p in paths}
    return [pytest.param(p, id=p.stem, marks=pytest.mark.skipif(reasons[p] is not None, reason=str(reasons[p])))
            for p in paths]
CORE_TEMPLATE = "image_flux2"  # the official FLUX.2 graph with two ReferenceLatent references


@pytest.fixture(scope="module")
def page(server):
    if chromium_paths() is None:
        pytest.fail("chromium + chromedriver are required: apt-get install -y chromium chromium-driver")
    driver = start_chromium()
    try:
        yield ComfyPage(driver, server.url).open()
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def object_info(server) -> dict:
    return server.object_info()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    env = os.environ.get("SC_SCREENSHOT_DIR")
    path = Path(env) if env else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def node_count(workflow: dict) -> int:
    """Nodes of the graph and of every subgraph definition it carries (newer official templates use subgraphs)."""
    subgraphs = (workflow.get("definitions") or {}).get("subgraphs") or []
    return len(workflow["nodes"]) + sum(len(sub["nodes"]) for sub in subgraphs)


def _check_loaded_cleanly(page: ComfyPage, name: str, expected_nodes: int) -> None:
    missing = page.missing_nodes_report()
    assert missing is None, f"{name}: the frontend reports missing nodes:\n{missing}"
    types = page.graph_node_types()
    assert types["unknown"] == [], f"{name}: node types unknown to the frontend: {types['unknown']}"
    assert types["count"] == expected_nodes, f"{name}: {types['count']} nodes in the UI, {expected_nodes} in the file"


def test_pack_ships_workflows():
    assert WORKFLOWS, "workflows/ has no *.json: the pack ships example workflows"
    for path in WORKFLOWS:
        data = read_workflow(path)
        assert isinstance(data.get("nodes"), list) and data["nodes"], f"{path.name}: not a UI-format workflow"


def test_workflow_templates_route_lists_the_packs_workflows(server):
    listed = server.get("/workflow_templates")
    assert PACK_NAME in listed, f"/workflow_templates does not list the pack: {listed}"
    assert sorted(listed[PACK_NAME]) == sorted(p.stem for p in WORKFLOWS)
    for path in WORKFLOWS:  # and serves each one unchanged
        served = server.get(f"/api/workflow_templates/{PACK_NAME}/{path.name}")
        assert served == read_workflow(path), f"{path.name}: the server serves different content"


@pytest.mark.parametrize("path", _loadable(WORKFLOWS))
def test_shipped_workflow_loads_in_the_ui_without_missing_nodes(page, shots, path):
    workflow = page.load_template(PACK_NAME, path.stem)
    _check_loaded_cleanly(page, path.name, node_count(workflow))
    # What else the frontend says (e.g. "Missing Models": no model files on a test machine) is not
    # about this pack; close it so that the screenshot shows the graph.
    page.close_dialogs()
    assert page.dialogs() == [], f"{path.name}: a dialog stays open: {page.dialogs()}"
    page.fit_view()
    shot = page.screenshot(shots / f"{path.stem}.png")
    assert shot.stat().st_size > 20_000, f"{shot}: suspiciously small screenshot"


@pytest.mark.parametrize("path", _loadable(WORKFLOWS))
def test_frontend_queues_the_prompt_the_converter_gives(page, object_info, path):
    """``ui_to_api`` (used by the server tests and the API copies) against the frontend's own ``graphToPrompt``."""
    workflow = page.load_template(PACK_NAME, path.stem)
    page.close_dialogs()
    queued = as_the_server_reads(page.queued_prompt(), object_info)
    converted = as_the_server_reads(ui_to_api(workflow, object_info), object_info)
    assert queued == converted, _prompt_diff(queued, converted)


def as_the_server_reads(prompt: dict, object_info: dict) -> dict:
    """Only the inputs each node declares (an Autogrow input's as ``<input>.<socket>``): the server reads no others,
    and frontend extensions add display-only widgets whose values it ignores (e.g. the text box of core's PreviewAny)."""
    out = {}
    for node_id, node in prompt.items():
        spec = object_info[node["class_type"]]["input"]
        declared = {name: kind for section in ("required", "optional") for name, (kind, *_) in spec.get(section, {}).items()}
        out[node_id] = {**node, "inputs": {k: v for k, v in node["inputs"].items()
                                           if k in declared or declared.get(k.split(".")[0]) == AUTOGROW}}
    return out


def _prompt_diff(a: dict, b: dict) -> list[str]:
    """Where two API prompts differ (node ids, class types, titles, inputs)."""
    out = [f"node {k}: only in {'the frontend' if k in a else 'ui_to_api'}" for k in sorted(set(a) ^ set(b))]
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        out += [f"node {k}: {key} {x.get(key)!r} != {y.get(key)!r}" for key in ("class_type", "_meta") if x.get(key) != y.get(key)]
        xi, yi = x.get("inputs", {}), y.get("inputs", {})
        out += [f"node {k} ({x.get('class_type')}): input {n}: {xi.get(n, '<none>')!r} (frontend) != {yi.get(n, '<none>')!r}"
                for n in sorted(set(xi) | set(yi)) if xi.get(n, "<none>") != yi.get(n, "<none>")]
    return out


def test_pack_nodes_are_registered_in_the_frontend(page, server):
    ours = sorted(k for k, v in server.object_info().items() if v.get("python_module", "").endswith(PACK_NAME))
    assert ours, "the server lists no node of the pack"
    known = page.js("return Object.keys(LiteGraph.registered_node_types)")
    assert [k for k in ours if k not in known] == []


def test_core_reference_template_loads_cleanly(page):
    """Control: the official FLUX.2 template (core nodes only) loads with the pack installed. It comes from
    the server's ``/templates`` route, as the template browser gets it (the package that holds it differs
    between ComfyUI versions); newer versions of it keep most nodes in subgraphs."""
    workflow = page.fetch_json(f"/templates/{CORE_TEMPLATE}.json")
    page.load_workflow(workflow, CORE_TEMPLATE)
    _check_loaded_cleanly(page, CORE_TEMPLATE, node_count(workflow))
    page.close_dialogs()


def test_a_missing_node_is_detected(page):
    """The checks above can fail: a graph with an unknown node type trips both of them."""
    node = {"id": 1, "type": "SparseContextNoSuchNode", "pos": [0, 0], "size": [200, 80], "flags": {}, "order": 0,
            "mode": 0, "inputs": [], "outputs": [], "properties": {}, "widgets_values": []}
    workflow = {"last_node_id": 1, "last_link_id": 0, "nodes": [node], "links": [], "groups": [], "config": {},
                "extra": {}, "version": 0.4}
    page.load_workflow(workflow, "missing")
    try:
        report = page.missing_nodes_report()
        assert report is not None and "SparseContextNoSuchNode" in report, f"no missing-nodes report; dialogs: {page.dialogs()}"
        assert page.graph_node_types()["unknown"] == ["SparseContextNoSuchNode"]
    finally:
        page.close_dialogs()
