"""Third-party custom-node packs for the compatibility matrix: found in the folders named by
``$SPARSECONTEXT_NODES`` (``scripts/compat.sh --nodes DIR...`` sets it; os.pathsep-separated) and imported as
ComfyUI would import them, under fixed package names.

Packs are never part of this repository: they come from their public snapshots (see ``PACKS``), exported into
folders outside the checkout. A test that needs a pack that was not given skips with a reason naming it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path

NODES_ENV = "SPARSECONTEXT_NODES"


@dataclass(frozen=True)
class Pack:
    name: str  # the repository's folder name
    repo: str  # owner/name of its public repository
    snapshot: str  # the commit the matrix was made with
    marker: str  # a file only this pack has, and a string in it
    marker_text: str
    module: str | None  # import only this module of the pack (None: the whole pack, as ComfyUI does)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.repo}@{self.snapshot})"


PACKS = {
    "gguf": Pack("ComfyUI-GGUF", "city96/ComfyUI-GGUF", "795e451", "dequant.py", "def dequantize_tensor", None),
    # its __init__ also imports the diffusers nodes (diffusers is not a dependency here): the ComfyUI nodes alone
    "teacache": Pack("ComfyUI-TeaCache", "welltop-cn/ComfyUI-TeaCache", "91dff8e", "nodes.py",
                     "def teacache_flux_forward", "nodes"),
    "wavespeed": Pack("Comfy-WaveSpeed", "chengzeyi/Comfy-WaveSpeed", "8253745", "first_block_cache.py",
                      "def create_patch_flux_forward_orig", None),
}


class PackUnavailable(Exception):
    """The pack was not given, or does not import on this host (the message says which)."""


def node_folders() -> list[Path]:
    """The custom-node folders given to the suite: each a pack's folder, or a folder of packs."""
    return [Path(p) for p in os.environ.get(NODES_ENV, "").split(os.pathsep) if p.strip()]


def _is(pack: Pack, folder: Path) -> bool:
    marker = folder / pack.marker
    return marker.is_file() and pack.marker_text in marker.read_text(encoding="utf-8", errors="replace")


def find(key: str) -> Path | None:
    pack = PACKS[key]
    for folder in node_folders():
        for candidate in (folder, *sorted(p for p in folder.glob("*") if p.is_dir())):
            if _is(pack, candidate):
                return candidate.resolve()
    return None


_LOADED: dict[str, types.ModuleType] = {}


def load(key: str) -> types.ModuleType:
    """The pack's module (its package, or ``Pack.module`` of it), imported once; raises ``PackUnavailable``."""
    if key in _LOADED:
        return _LOADED[key]
    pack = PACKS[key]
    folder = find(key)
    if folder is None:
        raise PackUnavailable(f"{pack.label} not given: pass its folder with scripts/compat.sh --nodes DIR")
    name = f"sc_pack_{key}"
    try:
        if pack.module is None:
            spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                          submodule_search_locations=[str(folder)])
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        else:
            package = types.ModuleType(name)
            package.__path__ = [str(folder)]
            sys.modules[name] = package
            module = importlib.import_module(f"{name}.{pack.module}")
    except Exception as err:  # whatever the pack raises on this host is the finding
        sys.modules.pop(name, None)
        raise PackUnavailable(f"{pack.label} does not load on this ComfyUI: {type(err).__name__}: {err}") from err
    _LOADED[key] = module
    return module


def submodule(key: str, name: str) -> types.ModuleType:
    load(key)
    return importlib.import_module(f"sc_pack_{key}.{name}")
