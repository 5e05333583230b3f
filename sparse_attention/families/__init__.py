"""Per-family adapters: one small module per diffusion-model class (see ``base.ReferenceFamily``).

The gate: a model's class is supported when it is an adapter's class, or a subclass that inherits the adapter's
hooked method unchanged (e.g. nunchaku's Qwen-Image class, which replaces ``_forward`` but keeps core's
``process_img``): plain thinning composes with it; the reference cache and the attention rule, which rely on the
model's own attention path, are refused for a subclass.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import DenseFamily, NeedsMethod, ReferenceFamily
from .dense import DENSE_FAMILIES
from .flux import FLUX
from .joyimage import JOYIMAGE
from .krea2 import KREA2
from .mage_flow import MAGE_FLOW
from .qwen_image import QWEN_IMAGE
from .z_image import Z_IMAGE

FAMILIES: tuple[ReferenceFamily, ...] = (FLUX, QWEN_IMAGE, MAGE_FLOW, KREA2, Z_IMAGE, JOYIMAGE)
_BY_CLASS = {f.class_path: f for f in FAMILIES}


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass(frozen=True)
class FamilyMatch:
    """A model's adapter; ``subclass`` names the model's own class when it is a subclass of the adapter's."""

    family: ReferenceFamily
    subclass: str | None = None


def match_family(diffusion_model) -> FamilyMatch | None:
    """The adapter of a diffusion model, or None (see the module docstring for subclasses)."""
    cls = type(diffusion_model)
    exact = _BY_CLASS.get(_path(cls))
    if exact is not None:
        return FamilyMatch(exact)
    for base in cls.__mro__[1:]:
        family = _BY_CLASS.get(_path(base))
        if family is not None and getattr(cls, family.hook, None) is getattr(base, family.hook, None):
            return FamilyMatch(family, _path(cls))
    return None


def why_dense(diffusion_model) -> str | None:
    """Why a known reference-conditioned family runs dense, or None for a model no table names."""
    for cls in type(diffusion_model).__mro__:
        for dense in DENSE_FAMILIES:
            if dense.class_path == _path(cls):
                return f"{dense.name}: {dense.reason}"
    return None


def cache_refusal(match: FamilyMatch) -> str | None:
    """Why the reference cache and the attention rule cannot run on this model, or None when they can."""
    if match.subclass is not None:
        return (f"{match.subclass} is a subclass of {match.family.class_path} that may replace the attention path "
                "the reference cache and the attention rule observe")
    if not match.family.cache_layout:
        return match.family.cache_refusal
    return None


__all__ = ["DENSE_FAMILIES", "FAMILIES", "DenseFamily", "FamilyMatch", "NeedsMethod", "ReferenceFamily",
           "cache_refusal", "match_family", "why_dense"]
