"""What every SparseContext node shares: the custom socket types, common inputs, and user-facing errors."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
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
def user_errors(node: str) -> Iterator[None]:
    """Turn the pure code's ``ValueError("<argument>: ...")`` into ``"<node>: <argument>: ..."``.

    ComfyUI shows the message in the UI as an execution error; the server keeps running.
    """
    try:
        yield
    except SparseContextInputError:
        raise
    except ValueError as err:
        raise SparseContextInputError(f"{node}: {err}") from err


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


def range_problem(schema: io.Schema, node: str, values: dict) -> str | None:
    """The first number input outside its schema range, worded for the user; None if all are in range."""
    for inp in schema.inputs or []:
        value = values.get(inp.id)
        low, high = getattr(inp, "min", None), getattr(inp, "max", None)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if low is not None and value < low:
            return f"{node}: {inp.id}: {value} is below its minimum {low}"
        if high is not None and value > high:
            return f"{node}: {inp.id}: {value} is above its maximum {high}"
    return None


class SparseNode(io.ComfyNode):
    """Base of the pack's nodes: number inputs are range-checked when the prompt is queued.

    ComfyUI 0.3.75 skips its own min/max check for V3 nodes (they all have ``validate_inputs``), so an
    out-of-range value from the API would otherwise reach ``execute``.
    """

    NAME = "SparseContext"

    @classmethod
    def validate_inputs(cls, **kwargs) -> bool | str:
        return range_problem(cls.define_schema(), cls.NAME, kwargs) or True
