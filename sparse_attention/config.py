"""The model patch's settings (pure data, validated once when the patch is made)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..selectors import Budget

#: Rules the patch can apply by itself to references that carry no selection of their own: "grid" (uniform
#: coverage), "random" (seeded), "detail" (latent structure), "attention" (the tokens the target's queries attend
#: to most, measured by the model in the first step that sees every token of the reference).
DEFAULT_RULES = ("grid", "random", "detail", "attention")
#: Reference cache modes (``reference_cache``): off, reference_only (t=0, references attend to references; reused
#: across runs), first_step (the first sparse step's keys/values, per conditioning entry).
CACHE_MODES = ("off", "reference_only", "first_step")


@dataclass(frozen=True)
class SparseContextConfig:
    """How the patch thins each reference's tokens.

    Attributes:
        budget: tokens to keep per reference without a budget of its own.
        rule: default rule for references without a selection (see ``DEFAULT_RULES``).
        total_tokens: if set, ONE budget shared by all references of a forward, in proportion to their
            score mass and weights (overrides per-reference budgets' counts).
        bucket: kept counts are rounded UP to a multiple of this (fewer distinct shapes for
            torch.compile and attention kernels), at most 1/16 of a reference's tokens; 1 = exact.
        start_percent, end_percent: sampling-progress window in which references are sparse; dense
            outside it.
        seed: seed of the random rule and of deterministic tie-breaking.
        enabled: False = the patch does nothing (handy for A/B in a graph).
        cache: reference cache mode (see ``CACHE_MODES``).
        cache_mib: bound of the cross-run store of ``reference_only`` keys/values (MiB).
    """

    budget: Budget = field(default_factory=lambda: Budget(mode="ratio", ratio=0.5))
    rule: str = "grid"
    total_tokens: int | None = None
    bucket: int = 64
    start_percent: float = 0.0
    end_percent: float = 1.0
    seed: int = 0
    enabled: bool = True
    cache: str = "off"
    cache_mib: float = 1024.0

    def __post_init__(self) -> None:
        if not isinstance(self.budget, Budget):
            raise ValueError(f"budget: expected a Budget, got {type(self.budget).__name__}")
        if self.rule not in DEFAULT_RULES:
            raise ValueError(f"rule: expected one of {DEFAULT_RULES}, got {self.rule!r}")
        if self.total_tokens is not None and (not isinstance(self.total_tokens, int) or self.total_tokens < 0):
            raise ValueError(f"total_tokens: expected an int >= 0 or None, got {self.total_tokens!r}")
        if not isinstance(self.bucket, int) or not 1 <= self.bucket <= 4096:
            raise ValueError(f"bucket: expected an int in [1, 4096], got {self.bucket!r}")
        if self.cache not in CACHE_MODES:
            raise ValueError(f"cache: expected one of {CACHE_MODES}, got {self.cache!r}")
        if not (isinstance(self.cache_mib, (int, float)) and 0 <= self.cache_mib < float("inf")):
            raise ValueError(f"cache_mib: expected a finite number >= 0, got {self.cache_mib!r}")
        if not 0.0 <= self.start_percent <= self.end_percent <= 1.0:
            raise ValueError(
                f"start_percent/end_percent: expected 0 <= start <= end <= 1, got {self.start_percent}, {self.end_percent}"
            )
