"""SparseContext for ComfyUI: sparse reference tokens for reference-conditioned image models.

Registration only. The pure modules (``selectors``, ``sparse_attention``'s token math) import
without ComfyUI; the nodes are registered only when ComfyUI's V3 API is importable.
"""

try:
    from comfy_api.latest import ComfyExtension  # noqa: F401  (present only inside ComfyUI)
except ImportError:  # imported by tools or tests without ComfyUI: nothing to register
    pass
else:
    from .nodes import comfy_entrypoint  # noqa: F401
