"""The natural-image replication: the miniature's pipeline on real photographs shipped inside installed wheels.

Loaded as a package (``run.py`` and the tests use importlib, never sys.path); it reuses the miniature's pixel
"VAE" (``sc_miniature.encoding``), model builder and sampling helpers.
"""
