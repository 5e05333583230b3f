"""Test harness: the real ComfyUI host, its server, and graph helpers. Loaded by conftest as ``sc_harness``."""
