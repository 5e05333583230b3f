"""The repository's scripts and benchmarks as modules (they are files, not packages): loaded once per session."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from .host import REPO


def load_script(relative: str, name: str) -> ModuleType:
    """The file ``REPO/relative`` as the module ``name`` (e.g. ``benchmarks/bench_training.py``)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / relative)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
