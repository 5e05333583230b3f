"""Import this pack (and the test harness) as packages by path, for scripts, benchmarks and tests.

Never by putting the repository root on sys.path: the pack's ``selectors/`` would shadow Python's
stdlib module of that name (which asyncio and subprocess import).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_package(name: str, folder: Path) -> ModuleType:
    """Import ``folder`` (with an ``__init__.py``) as the package ``name``, once."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py", submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_pack() -> ModuleType:
    """The pack as ``sparse_context`` (its nodes register only where ComfyUI is importable)."""
    return load_package("sparse_context", REPO)


def load_testpack() -> ModuleType:
    """The test node pack (tiny real models, host-derived model configs) as ``sc_testpack``; needs ComfyUI."""
    return load_package("sc_testpack", REPO / "tests" / "comfy_testpack")


def load_harness() -> ModuleType:
    """The tests' harness (ComfyUI host, server, sampling helpers) as ``sc_harness``."""
    return load_package("sc_harness", REPO / "tests" / "harness")


def load_experiment(name: str) -> ModuleType:
    """``experiments/<name>`` as ``sc_<name>``, after ComfyUI (CPU), the pack, the harness and what the experiments
    share (``sc_experiment``); the natural experiment also reuses the miniature's modules (``sc_miniature``)."""
    load_package("sc_experiment", REPO / "experiments" / "common")
    from sc_experiment.host import prepare

    prepare()
    if name != "miniature":
        load_package("sc_miniature", REPO / "experiments" / "miniature")
    return load_package(f"sc_{name}", REPO / "experiments" / name)
