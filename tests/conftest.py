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
