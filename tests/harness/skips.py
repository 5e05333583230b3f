"""Skips for tests of a model family that a host's model detection does not have (one rule for every test file)."""

from __future__ import annotations

import pytest

from .host import comfyui_version


def needs_family(family: str):
    """Skip where this host's detection lacks the tiny ``family`` (the reason names what it reads instead); the
    test runs on the hosts that have it (scripts/compat.sh)."""
    import sc_testpack

    lacks = sc_testpack.host_lacks(family)
    return pytest.mark.skipif(lacks is not None, reason=f"ComfyUI {comfyui_version()}: {lacks}")


def family_param(family: str):
    """``family`` as a pytest parameter that skips where the host lacks it."""
    return pytest.param(family, marks=needs_family(family))
