"""Other packs next to this one, recognised from ComfyUI's official model state (no ComfyUI import here).

What is read: the diffusion-model object (its class, or a ``torch.compile`` wrapper around it, as core's and
WaveSpeed's / TeaCache's compile nodes put it in an object patch of ``diffusion_model``) and the single-slot
``model_function_wrapper`` (TeaCache and WaveSpeed's first-block cache install theirs there). Packs that replace
the FLUX model's ``forward_orig`` call its blocks without ``transformer_options``: the attention override that the
reference cache and the ``attention`` rule rely on never runs, so those modes are refused before sampling.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .errors import SparseContextBypassed

log = logging.getLogger("SparseContext")


def compiled_inner(module) -> torch.nn.Module | None:
    """The module a ``torch.compile(module)`` wrapper (dynamo's ``OptimizedModule``) compiles, else None.

    The wrapper forwards attribute reads and writes to that module, so object patches of
    ``diffusion_model.<attr>`` reach the real model through it."""
    if type(module).__name__ != "OptimizedModule":
        return None
    # the wrapper's own module slots (packs patch its attribute lookup to answer with the compiled module's)
    inner = object.__getattribute__(module, "_modules").get("_orig_mod")
    return inner if isinstance(inner, torch.nn.Module) else None


def unwrap_compiled(module):
    """``module`` without the ``torch.compile`` wrappers around it."""
    inner = compiled_inner(module)
    while inner is not None:
        module, inner = inner, compiled_inner(inner)
    return module


def class_name(obj) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass(frozen=True)
class Neighbor:
    """A pack recognised next to this one."""

    name: str
    bypasses_attention: bool  # the model's blocks run without transformer_options (no attention override)


#: ``model_function_wrapper`` functions of packs that replace a FLUX model's ``forward_orig`` while they run:
#: (module name fragment, function name) -> pack name.
_FORWARD_REPLACING = {
    ("teacache", "unet_wrapper_function"): "TeaCache",
    ("fbcache_nodes", "model_unet_function_wrapper"): "WaveSpeed's first-block cache (Apply First Block Cache)",
}


def function_wrapper_pack(model_options: dict) -> str | None:
    """The pack whose ``model_function_wrapper`` is set, when it is one that replaces ``forward_orig``."""
    wrapper = model_options.get("model_function_wrapper")
    if wrapper is None:
        return None
    module = (getattr(wrapper, "__module__", "") or "").lower()
    qualname = getattr(wrapper, "__qualname__", "") or ""
    for (fragment, function), name in _FORWARD_REPLACING.items():
        if fragment in module and qualname.split(".")[-1] == function:
            return name
    return None


def neighbors(model_options: dict, diffusion_model) -> list[Neighbor]:
    """Packs recognised around a model (its ``model_options`` and its ``diffusion_model`` object)."""
    found = []
    pack = function_wrapper_pack(model_options)
    if pack is not None:
        # they replace forward_orig for FLUX's class only; other classes keep core's blocks (WaveSpeed swaps the
        # block list for one that passes every keyword argument through)
        inner = unwrap_compiled(diffusion_model)
        found.append(Neighbor(pack, type(inner).__name__ == "Flux"))
    return found


def bypass_message(pack: str, config) -> str:
    """What ``SparseContextBypassed`` says when ``pack`` makes the chosen cache mode / rule impossible."""
    what = [f"cache={config.cache}"] if config.cache != "off" else []
    if config.rule == "attention":
        what.append("rule=attention")
    return (f"{' and '.join(what)} cannot work next to {pack}: it replaces the FLUX model's forward_orig and calls "
            "the blocks without transformer_options, so the attention override these modes rely on never runs "
            f"(the references would be silently lost, or chosen without measured attention); with {pack} use "
            "cache=off and another rule")


def check_neighbors(model_options: dict, diffusion_model, config) -> None:
    """Refuse settings that a recognised neighbour makes impossible (before any step runs)."""
    if not config.enabled or (config.cache == "off" and config.rule != "attention"):
        return
    for n in neighbors(model_options, diffusion_model):
        if n.bypasses_attention:
            raise SparseContextBypassed(bypass_message(n.name, config))


def dense_reason(diffusion_model, supported: str) -> str:
    """Why a diffusion model's references run dense (its class is not one this pack thins)."""
    return f"the diffusion model {class_name(diffusion_model)} is not a supported model (supported: {supported})"
