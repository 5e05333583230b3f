"""The fine-tune's optimisation settings (validated once, when made)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .dropping import KeepRatioDistribution

TIMESTEP_SAMPLING = ("logit_normal", "uniform", "shifted")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings.

    Attributes:
        steps: optimizer steps.
        learning_rate: AdamW learning rate (after ``warmup_steps`` of linear warm-up).
        weight_decay: AdamW weight decay.
        grad_accumulation: examples per optimizer step (each example is its own forward; batch 1): the global
            batch, split over the ranks of a distributed job.
        max_grad_norm: gradient clipping (None = off).
        keep_ratios: distribution of the per-example keep ratio.
        timestep_sampling: ``"logit_normal"`` (sigma = sigmoid(N(0, 1)), as FLUX / SD3 trainers use),
            ``"uniform"`` (sigma ~ U(0, 1)) or ``"shifted"`` (uniform through the model's own sigma shift).
        seed: seeds the LoRA init and every per-step draw (example order, keep ratio, kept tokens, sigma,
            noise); a resumed run draws exactly what the uninterrupted run would have.
        lora_dtype: dtype of the LoRA parameters while training (float32 recommended).
        recommended_keep_ratio: written to the LoRA's metadata; the loader outputs it for Apply Sparse
            Context. Clamped into the trained range.
        gradient_checkpointing: keep only each transformer block's inputs between forward and backward and
            recompute the block in the backward (``training.checkpointing``): far less activation memory for
            about one more forward per step. Same gradients.
        memory_budget: bytes of device memory training may use (base weights + ``training_memory``); None = the
            device's total memory (on the CPU: no limit). A base that does not fit within it is loaded with core's
            training weight offload, or refused before step 1 (``training.loading``).
        weight_offload: use core's training weight offload (ComfyUI 0.30+) for a base that does not fit.
    """

    steps: int = 1000
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_accumulation: int = 1
    max_grad_norm: float | None = 1.0
    keep_ratios: KeepRatioDistribution = field(default_factory=KeepRatioDistribution)
    timestep_sampling: str = "logit_normal"
    seed: int = 0
    lora_dtype: torch.dtype = torch.float32
    recommended_keep_ratio: float = 0.25
    gradient_checkpointing: bool = True
    memory_budget: float | None = None
    weight_offload: bool = True

    def __post_init__(self) -> None:
        if self.memory_budget is not None and not self.memory_budget > 0:
            raise ValueError(f"memory_budget: expected bytes > 0 or None, got {self.memory_budget}")
        if self.steps < 0 or self.grad_accumulation < 1 or self.warmup_steps < 0:
            raise ValueError("steps >= 0, warmup_steps >= 0 and grad_accumulation >= 1 are required")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate: expected a finite value > 0, got {self.learning_rate}")
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"timestep_sampling: expected one of {TIMESTEP_SAMPLING}, got {self.timestep_sampling!r}")
        if not 0.0 < self.recommended_keep_ratio <= 1.0:
            raise ValueError(f"recommended_keep_ratio: expected a value in (0, 1], got {self.recommended_keep_ratio}")
