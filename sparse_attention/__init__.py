"""Sparse reference tokens inside the model: the patch (ComfyUI glue, imported lazily inside
functions, so this package loads without ComfyUI) and its pure token math."""

from .config import CACHE_MODES, DEFAULT_RULES, SparseContextConfig
from .patch import PATCH_KEY, RUN_KEY, apply_sparse_context, model_family, unsupported_reason
from .run import SparseContextPatch, SparseRun
from .selection import BINDING_KEY, ReferenceSelection, SelectionBinding

__all__ = [
    "BINDING_KEY",
    "CACHE_MODES",
    "DEFAULT_RULES",
    "PATCH_KEY",
    "RUN_KEY",
    "ReferenceSelection",
    "SelectionBinding",
    "SparseContextConfig",
    "SparseContextPatch",
    "SparseRun",
    "apply_sparse_context",
    "model_family",
    "unsupported_reason",
]
