"""The shipped workflows in the REAL ComfyUI frontend (headless Chromium), served by the real server.

Each ``workflows/*.json`` is fetched from the server's template route (as the template browser does)
and loaded into the UI; the frontend must not report missing nodes and every node must have a
registered class. A screenshot per workflow goes to ``$SC_SCREENSHOT_DIR`` (default: a pytest tmp dir).
Regenerate the README picture with
``SC_SCREENSHOT_DIR=/tmp/shots .venv/bin/pytest tests/test_browser.py -q -x &&
cp /tmp/shots/sparse_flux2_klein_multi_reference.png docs/workflow_screenshot.png``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from sc_harness.browser import ComfyPage, chromium_paths, read_workflow, start_chromium
from sc_harness.host import REPO
from sc_harness.server import PACK_NAME

pytestmark = [pytest.mark.browser, pytest.mark.server]

WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
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
def shots(tmp_path_factory) -> Path:
    env = os.environ.get("SC_SCREENSHOT_DIR")
    path = Path(env) if env else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _check_loaded_cleanly(page: ComfyPage, name: str, expected_nodes: int) -> None:
    missing = page.missing_nodes_dialog()
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


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_shipped_workflow_loads_in_the_ui_without_missing_nodes(page, shots, path):
    workflow = page.load_template(PACK_NAME, path.stem)
    _check_loaded_cleanly(page, path.name, len(workflow["nodes"]))
    # What else the frontend says (e.g. "Missing Models": no model files on a test machine) is not
    # about this pack; close it so that the screenshot shows the graph.
    page.close_dialogs()
    assert page.dialogs() == [], f"{path.name}: a dialog stays open: {page.dialogs()}"
    page.fit_view()
    shot = page.screenshot(shots / f"{path.stem}.png")
    assert shot.stat().st_size > 20_000, f"{shot}: suspiciously small screenshot"


def test_pack_nodes_are_registered_in_the_frontend(page, server):
    ours = sorted(k for k, v in server.object_info().items() if v.get("python_module", "").endswith(PACK_NAME))
    assert ours, "the server lists no node of the pack"
    known = page.js("return Object.keys(LiteGraph.registered_node_types)")
    assert [k for k in ours if k not in known] == []


def test_core_reference_template_loads_cleanly(page):
    """Control: the official FLUX.2 template (core nodes only) loads with the pack installed."""
    import comfyui_workflow_templates_media_image as media

    path = Path(media.__file__).parent / "templates" / f"{CORE_TEMPLATE}.json"
    workflow = json.loads(path.read_text(encoding="utf-8"))
    page.load_workflow(workflow, CORE_TEMPLATE)
    _check_loaded_cleanly(page, CORE_TEMPLATE, len(workflow["nodes"]))
    page.close_dialogs()


def test_a_missing_node_is_detected(page):
    """The checks above can fail: a graph with an unknown node type trips both of them."""
    node = {"id": 1, "type": "SparseContextNoSuchNode", "pos": [0, 0], "size": [200, 80], "flags": {}, "order": 0,
            "mode": 0, "inputs": [], "outputs": [], "properties": {}, "widgets_values": []}
    workflow = {"last_node_id": 1, "last_link_id": 0, "nodes": [node], "links": [], "groups": [], "config": {},
                "extra": {}, "version": 0.4}
    page.load_workflow(workflow, "missing")
    try:
        assert page.missing_nodes_dialog() is not None, f"no missing-nodes dialog; dialogs: {page.dialogs()}"
        assert page.graph_node_types()["unknown"] == ["SparseContextNoSuchNode"]
    finally:
        page.close_dialogs()
