"""What every SparseContext node shares: the custom socket types, common inputs, and user-facing errors.

Where bad input is refused (read from ``execution.py`` of ComfyUI 0.3.75, 0.10.0 and 0.30.0):

* Queue time (``POST /prompt``): core converts every widget value to its type and checks it against the
  schema (min/max, required inputs, link types; combo options on 0.10.0 and later, while 0.3.75 reads only
  V1-style option lists and so never checks a V3 ``io.Combo``), reporting each bad input once. Core does this
  only for inputs that the node's ``validate_inputs`` does not take as arguments: an override that takes
  ``**kwargs`` turns off all these checks, and core repeats the override's message once for each input it
  takes. So ``SparseNode`` has no ``validate_inputs``; a node overrides it only to check ONE input that core
  cannot check (an output path: ``prefix_problem``) and takes only that input.
* Execution: every ``execute`` starts with ``cls.check_inputs(locals())``, which checks its number and combo
  arguments against the schema before the node does any work. It refuses what core lets through: NaN
  (every comparison with NaN is false, so it passes min/max; an API client sends it as the JSON literal
  ``NaN`` or the string "nan"), values that arrive over a link (core checks widget values only) and, on
  0.3.75, unknown combo values. ``inf`` never gets this far: every number input has a finite min and max, so
  core refuses it at queue time.

Each message starts with the node's display name and then names the input as the user sees it
(``user_errors`` renames the pure code's argument names where they differ).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from comfy_api.latest import io

from ..selectors import DEFAULT_COVERAGE, Budget

#: A ``sparse_attention.ReferenceSelection``: one reference's token scores (+ budget, weight).
SparseSelection = io.Custom("SPARSE_SELECTION")
#: A ``selectors.Budget``: how many tokens a reference keeps.
SparseBudget = io.Custom("SPARSE_BUDGET")

STRIDE = 16  # pixels per token for FLUX.1, FLUX.2 and Qwen-Image (the patch remaps to the real grid anyway)
ITEM_NOTE = "Scores come from batch item 0 of the image."


class SparseContextInputError(ValueError):
    """A bad input, worded for the user: starts with the node's display name and names the input."""


@contextmanager
def user_errors(node: str, names: Mapping[str, str] | None = None) -> Iterator[None]:
    """Turn the pure code's ``ValueError("<argument>: ...")`` into ``"<node>: <input>: ..."``.

    ``names`` maps argument names of the pure code to the node's input names where they differ (Budget's
    ``ratio`` is the node's ``keep_ratio``). ComfyUI shows the message in the UI as an execution error; the
    server keeps running.
    """
    try:
        yield
    except SparseContextInputError:
        raise
    except ValueError as err:
        text = str(err)
        head, sep, rest = text.partition(": ")
        if names and sep:
            text = "/".join(names.get(part, part) for part in head.split("/")) + sep + rest
        raise SparseContextInputError(f"{node}: {text}") from err


def fail(node: str, message: str) -> SparseContextInputError:
    return SparseContextInputError(f"{node}: {message}")


def budget_input(optional: bool = True) -> io.Input:
    return SparseBudget.Input(
        "budget", optional=optional,
        tooltip="Optional Sparse Budget for this reference (ratio, count or adaptive). Not connected: the "
                "keep_ratio of Apply Sparse Context is used.",
    )


def weight_input() -> io.Input:
    return io.Float.Input(
        "weight", default=1.0, min=0.01, max=100.0, step=0.01,
        tooltip="Share of a total budget (Apply Sparse Context: total_tokens > 0) this reference gets, relative "
                "to the others. Ignored when each reference has its own budget.",
    )


@dataclasses.dataclass(frozen=True)
class AutoCoverageBudget(Budget):
    """A Budget whose coverage floor is left to the selector it is given to (``DEFAULT_COVERAGE``)."""


def budget_for(budget: Budget | None, rule: str) -> Budget | None:
    """The budget a selector stores in its selection: an auto-coverage budget gets the rule's default floor."""
    if isinstance(budget, AutoCoverageBudget):
        fields = {f.name: getattr(budget, f.name) for f in dataclasses.fields(Budget)}
        fields["coverage"] = DEFAULT_COVERAGE.get(rule, 0.0)
        return Budget(**fields)
    return budget


def first_item(image, node: str, name: str = "image"):
    """Batch item 0 of an IMAGE/MASK tensor, as a batch of one; a clear error for anything else."""
    import torch

    if not isinstance(image, torch.Tensor) or image.ndim < 2 or image.numel() == 0:
        raise fail(node, f"{name}: expected a non-empty tensor, got {getattr(image, 'shape', type(image).__name__)}")
    return image[:1] if image.ndim >= 3 else image


def number_problem(inp: io.Input, value) -> str | None:
    """What is wrong with ``value`` for the Int/Float input ``inp`` (None if nothing)."""
    is_int = isinstance(inp, io.Int.Input)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"expected {'a whole number' if is_int else 'a number'}, got {type(value).__name__} {value!r}"
    if math.isnan(value):
        return "NaN is not a number"
    low, high = getattr(inp, "min", None), getattr(inp, "max", None)
    bounds = f"[{low}, {high}]" if low is not None and high is not None else ""
    if math.isinf(value):
        return f"{value} is not a finite number" + (f"; expected a value in {bounds}" if bounds else "")
    if is_int and value != int(value):
        return f"{value} is not a whole number"
    if low is not None and value < low:
        return f"{value:g} is below its minimum {low}"
    if high is not None and value > high:
        return f"{value:g} is above its maximum {high}"
    return None


_MAX_NAME_BYTES = 200  # a file or folder name, plus the counter and suffix core adds, stays under 255 bytes


def prefix_problem(prefix, folder: str, what: str) -> str | None:
    """Why ``filename_prefix`` cannot save ``what`` in ``folder`` (None if it can).

    Core's rule from ``folder_paths.get_save_image_path`` (the folder the prefix names must lie inside
    ``folder``), checked before any work and worded for the node, plus names no file system takes.
    ``None`` (a linked input, at queue time) is left for execution.
    """
    if prefix is None:
        return None
    if not isinstance(prefix, str) or not prefix.strip():
        return "filename_prefix: is empty; give a file name (a folder in front is allowed: folder/name)"
    if any(ord(c) < 32 for c in prefix):
        return f"filename_prefix: {prefix!r} contains control characters, which a file name cannot have"
    normal = os.path.normpath(prefix)
    base = os.path.abspath(folder)
    if os.path.commonpath((base, os.path.abspath(os.path.join(base, os.path.dirname(normal))))) != base:
        return (f"filename_prefix: {prefix!r} would save the {what} outside the output folder; use a path inside "
                "it (no '..')")
    if any(len(part.encode("utf-8")) > _MAX_NAME_BYTES for part in normal.split(os.sep)):
        return f"filename_prefix: a file or folder name in it is longer than {_MAX_NAME_BYTES} bytes"
    return None


class SparseNode(io.ComfyNode):
    """Base of the pack's nodes: a display name for messages and the execution-time number check.

    No ``validate_inputs`` here on purpose (see the module docstring): core then checks every widget value
    at queue time and reports each bad one once.
    """

    NAME = "SparseContext"

    @classmethod
    def check_inputs(cls, values: Mapping[str, object]) -> None:
        """Refuse NaN, out-of-range numbers and unknown combo values among ``values`` (input name -> value),
        naming the first bad input in schema order.

        Call it first in ``execute`` as ``cls.check_inputs(locals())``; names that are not number or combo
        inputs, and optional inputs not connected, are skipped.
        """
        for inp in cls.define_schema().inputs or []:
            value = values.get(inp.id)
            if value is None:
                continue
            problem = None
            if isinstance(inp, (io.Int.Input, io.Float.Input)):
                problem = number_problem(inp, value)
            elif isinstance(inp, io.Combo.Input) and value not in inp.options:
                problem = (f"{value!r} is not one of {', '.join(map(repr, inp.options))}" if len(inp.options) <= 10
                           else f"{value!r} is not among its {len(inp.options)} choices")
            if problem:
                raise fail(cls.NAME, f"{inp.id}: {problem}")
