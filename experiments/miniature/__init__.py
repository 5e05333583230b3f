"""A miniature replication of "Keep The Essentials" with the pack's own code, trained here on CPU.

Loaded as a package (``run.py`` and the tests use importlib, never sys.path): tiny Kontext-shaped
ComfyUI ``Flux`` trained from scratch on generated tasks, a drop-robust LoRA fine-tune, and an
evaluation through ``apply_sparse_context`` with selections from ``sparse_context.selectors``.
"""
