"""Reference-token selectors: which tokens of a reference image to keep (pure torch, no ComfyUI).

Shapes and conventions:

* images: ComfyUI IMAGE, float (B, H, W, C) in [0, 1]; masks: ComfyUI MASK, (B, H, W) or (H, W) in [0, 1].
* token grid of an H x W picture at ``stride`` px per token: :func:`token_grid_shape`
  (``((H // (stride // 2)) + 1) // 2``, 64 x 64 for 1024 x 1024 at stride 16).
* score maps: float (B, h_tok, w_tok) >= 0, higher = keep first; :func:`resize_scores` maps one
  onto any other grid (area mean when shrinking, bilinear when growing).
* selections: LongTensor (k,) of sorted unique flat row-major indices into h_tok * w_tok.

Selectors (each returns scores): :func:`random_scores`, :func:`grid_scores`, :func:`edge_scores`,
:func:`saliency_scores`, :func:`mask_scores`; :func:`combine_scores` mixes them; :func:`reference_scores`
scores by a selector's name (one wiring for nodes, experiments and benchmarks). Budgets:
:class:`Budget` (ratio / count / adaptive, with a stratified coverage floor), :func:`pick_tokens`,
:func:`select`, :func:`share_budget`. Invalid input raises ``ValueError`` naming the argument.
"""

from .budget import Budget, pick_tokens, select, share_budget
from .by_name import SELECTOR_NAMES, default_coverage, reference_scores
from .combine import combine_scores, normalize_scores
from .coverage import grid_ranking, grid_scores, random_scores
from .edges import edge_scores
from .masks import mask_scores
from .saliency import saliency_scores
from .tokens import resize_scores, token_grid_shape

# Recommended Budget.coverage per selector. Edge: a prototype's pure top-k Canny pick lost to random
# on a recolouring edit (it needs shape interiors), so a quarter of its budget goes to even coverage.
# Mask (meant for edits, whose target is mostly unedited picture to copy): half goes to coverage. In the
# miniature replication (experiments/miniature/results/miniature.json) the floor helped edits (keep 0.1 with the LoRA: -11.7 vs
# -13.3 dB) and hurt a subject mask (keep 0.25: -15.5 vs -1.3 dB): for subjects set coverage to 0.
DEFAULT_COVERAGE: dict[str, float] = {
    "random": 0.0,
    "grid": 0.0,
    "edge": 0.25,
    "saliency": 0.1,
    "mask": 0.5,
    "attention": 0.1,  # the model's own attention is sharp: a small even floor keeps the layout
}

__all__ = [
    "DEFAULT_COVERAGE",
    "SELECTOR_NAMES",
    "Budget",
    "combine_scores",
    "default_coverage",
    "edge_scores",
    "grid_ranking",
    "grid_scores",
    "mask_scores",
    "normalize_scores",
    "pick_tokens",
    "random_scores",
    "reference_scores",
    "resize_scores",
    "saliency_scores",
    "select",
    "share_budget",
    "token_grid_shape",
]
