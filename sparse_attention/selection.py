"""What the graph tells the model patch about each reference: a score map and a budget.

Pure data, no ComfyUI import. A ``ReferenceSelection`` travels from a selector node to the model
inside the conditioning (``model_conds``, see ``binding_key``), wrapped in a ``SelectionBinding``
that says which reference (by its position in ``reference_latents``) each selection belongs to.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import torch

from ..selectors import Budget

#: The conditioning's ``model_conds`` key (and the forward kwarg) that carries a ``SelectionBinding``.
BINDING_KEY = "sparse_context_selection"


@dataclass(frozen=True, eq=False)
class ReferenceSelection:
    """One reference's selection: scores on any grid (mapped onto the real token grid at run time).

    Attributes:
        scores: (h, w) float, >= 0, any resolution; higher = keep first. Kept on the CPU.
        budget: how many tokens to keep; None = the model patch's own budget.
        rule: a short name for reports ("edge", "mask", ...).
        weight: share of a total budget split across references (relative).
        attention: weight in [0, 1] of the attention the model itself gives each token (measured in the first
            step that sees them all, see ``DEFAULT_RULES["attention"]``), mixed into ``scores``; 0 = scores only.
    """

    scores: torch.Tensor
    budget: Budget | None = None
    rule: str = "custom"
    weight: float = 1.0
    attention: float = 0.0
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        s = self.scores
        if not isinstance(s, torch.Tensor) or s.ndim != 2 or s.numel() == 0:
            raise ValueError(f"scores: expected a non-empty (h, w) tensor, got {getattr(s, 'shape', type(s))}")
        if not torch.isfinite(s).all() or (s < 0).any():
            raise ValueError("scores: must be finite and >= 0")
        if not self.weight > 0:
            raise ValueError(f"weight: must be > 0, got {self.weight}")
        if not 0.0 <= self.attention <= 1.0:
            raise ValueError(f"attention: must be in [0, 1], got {self.attention}")
        object.__setattr__(self, "scores", s.detach().float().cpu())

    def __eq__(self, other: object) -> bool:  # identity of content, cheap (no tensor compare)
        return isinstance(other, ReferenceSelection) and other.uid == self.uid

    def __hash__(self) -> int:
        return hash(self.uid)


@dataclass(frozen=True, eq=False)
class SelectionBinding:
    """Selections bound to references by position: ``selections[i]`` belongs to reference ``i``.

    Compared by content identity, so a positive and a negative conditioning that carry the same
    binding can still be batched together by ComfyUI (``CONDConstant.can_concat`` compares with ``!=``).
    """

    selections: tuple[ReferenceSelection | None, ...] = ()

    def with_selection(self, index: int, selection: ReferenceSelection | None) -> SelectionBinding:
        items = list(self.selections) + [None] * max(0, index + 1 - len(self.selections))
        items[index] = selection
        return SelectionBinding(tuple(items))

    def get(self, index: int) -> ReferenceSelection | None:
        return self.selections[index] if 0 <= index < len(self.selections) else None

    def truncated(self, count: int) -> SelectionBinding:
        """The selections of the first ``count`` references (for a conditioning with fewer references)."""
        return self if len(self.selections) <= count else SelectionBinding(self.selections[:count])

    def key(self) -> tuple[str | None, ...]:
        return tuple(s.uid if s is not None else None for s in self.selections)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SelectionBinding) and other.key() == self.key()

    def __hash__(self) -> int:
        return hash(self.key())
