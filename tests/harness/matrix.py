"""Rows of the compatibility matrix, recorded by the tests that decide them (``docs/compatibility.md`` is made
from them by ``scripts/compat_summary.py``).

A test fills its ``matrix`` fixture's row (pack, node order, mode, result, message); the fixture adds the test's
own outcome, so a failing test shows up as such, never as its intended result. With ``$SPARSECONTEXT_MATRIX_JSON``
set (``scripts/compat.sh`` sets it per host), the rows of the session are written there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MATRIX_ENV = "SPARSECONTEXT_MATRIX_JSON"

#: What a row's ``result`` may say.
RESULTS = ("composes", "refused", "dense", "pack fails by itself", "pack does not load", "not run")


class Row(dict):
    """One matrix row: ``set(pack=..., order=..., mode=..., result=..., message=...)``."""

    def set(self, **fields) -> Row:
        if "result" in fields and fields["result"] not in RESULTS:
            raise ValueError(f"matrix result must be one of {RESULTS}, got {fields['result']!r}")
        self.update(fields)
        return self


def write(rows: list[Row], comfyui: str) -> None:
    path = os.environ.get(MATRIX_ENV)
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"comfyui": comfyui, "rows": [dict(r) for r in rows if "pack" in r]},
                                     indent=1) + "\n", encoding="utf-8")
