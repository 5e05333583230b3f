"""Which share of each reference's tokens a training example keeps (pure torch, no ComfyUI).

Training with random reference-token dropping draws, for every example, one keep ratio from a
distribution; the patch then keeps that share of every reference's tokens, picked at random, with their
original position ids. A share of fully dense examples keeps the model good at the dense case too.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch

KINDS = ("uniform", "fixed")


@dataclass(frozen=True)
class KeepRatioDistribution:
    """Distribution of the per-example keep ratio.

    Attributes:
        kind: ``"uniform"`` (ratio ~ U[low, high]) or ``"fixed"`` (always ``low``).
        low, high: range of the ratio, ``0 < low <= high <= 1``.
        dense_share: probability that an example keeps every token (ratio 1.0), in [0, 1].
    """

    kind: str = "uniform"
    low: float = 0.1
    high: float = 1.0
    dense_share: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {self.kind!r}")
        if not 0.0 < self.low <= self.high <= 1.0:
            raise ValueError(f"low/high: expected 0 < low <= high <= 1, got {self.low}, {self.high}")
        if not 0.0 <= self.dense_share <= 1.0:
            raise ValueError(f"dense_share: expected a value in [0, 1], got {self.dense_share}")

    def sample(self, generator: torch.Generator) -> float:
        """One keep ratio in (0, 1]; 1.0 means the example runs dense."""
        u = torch.rand((2,), generator=generator, dtype=torch.float64)
        if float(u[0]) < self.dense_share:
            return 1.0
        if self.kind == "fixed":
            return self.low
        return self.low + (self.high - self.low) * float(u[1])

    def mean(self) -> float:
        """Expected keep ratio (dense examples included)."""
        body = self.low if self.kind == "fixed" else 0.5 * (self.low + self.high)
        return self.dense_share + (1.0 - self.dense_share) * body

    def largest(self) -> float:
        """The largest keep ratio an example can draw (what the memory of a step is sized for)."""
        if self.dense_share > 0.0:
            return 1.0
        return self.low if self.kind == "fixed" else self.high

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def describe(self) -> str:
        body = f"{self.low:g}" if self.kind == "fixed" else f"U[{self.low:g}, {self.high:g}]"
        return f"keep {body}, {100 * self.dense_share:g}% dense"


#: No dropping at all (a plain dense fine-tune, the baseline the drop-robust LoRA is compared with).
DENSE_ONLY = KeepRatioDistribution(kind="fixed", low=1.0, high=1.0, dense_share=1.0)
