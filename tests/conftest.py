"""Test setup: the pack is imported as the package ``sparse_context`` (never by putting its root on
sys.path: its ``selectors/`` would shadow the stdlib module), next to the real ComfyUI host."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # packload (the repo root itself never goes on sys.path)
from packload import load_harness, load_pack, load_testpack  # noqa: E402

load_harness()
from sc_harness.host import import_comfy_on_cpu  # noqa: E402

import_comfy_on_cpu()
pack = load_pack()
testpack = load_testpack()


@pytest.fixture(scope="session")
def server():
    """One real ComfyUI server for the session, with this pack and the test node pack loaded."""
    from sc_harness.server import ComfyServer

    srv = ComfyServer().start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls on a shared 2-core machine: one thread is ~100x faster than two contending ones
    (modules that train use it: ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Each phase's report on the test item (the matrix fixture reads the test's outcome from it)."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


@pytest.fixture(scope="session")
def matrix_rows():
    from sc_harness.host import comfyui_version
    from sc_harness.matrix import write

    rows: list = []
    yield rows
    write(rows, comfyui_version())


@pytest.fixture
def matrix(request, matrix_rows):
    """This test's row of the compatibility matrix (see ``sc_harness.matrix``)."""
    from sc_harness.host import comfyui_version
    from sc_harness.matrix import Row

    row = Row(test=request.node.nodeid, comfyui=comfyui_version())
    yield row
    report = getattr(request.node, "report_call", None)
    row["outcome"] = report.outcome if report is not None else "error"
    if report is not None and report.skipped:
        row.setdefault("result", "not run")
        row["message"] = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else row.get("message", "")
    matrix_rows.append(row)
