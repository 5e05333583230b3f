"""Test setup: the pack is imported as the package ``sparse_context`` (never by putting its root on
sys.path: its ``selectors/`` would shadow the stdlib module), next to the real ComfyUI host."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_package(name: str, folder: Path):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py", submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


harness = load_package("sc_harness", ROOT / "tests" / "harness")
from sc_harness.host import import_comfy_on_cpu  # noqa: E402

import_comfy_on_cpu()
pack = load_package("sparse_context", ROOT)
testpack = load_package("sc_testpack", ROOT / "tests" / "comfy_testpack")


@pytest.fixture(scope="session")
def server():
    """One real ComfyUI server for the session, with this pack and the test node pack loaded."""
    from sc_harness.server import ComfyServer

    srv = ComfyServer().start()
    try:
        yield srv
    finally:
        srv.stop()
