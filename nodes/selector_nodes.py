"""Selector nodes: each scores a reference image's tokens and outputs a SPARSE_SELECTION.

The score math lives in ``selectors/``; these adapters pick batch item 0, attach the budget and
weight, and word errors for the user. Scores are computed at 16 px per token; the model patch maps
them onto the reference's real token grid at run time.
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..selectors import combine_scores, reference_scores, token_grid_shape
from ..sparse_attention import ReferenceSelection
from .common import (
    ITEM_NOTE,
    STRIDE,
    SparseNode,
    SparseSelection,
    budget_for,
    budget_input,
    fail,
    first_item,
    user_errors,
    weight_input,
)

CATEGORY = "SparseContext/selectors"


def _image_input(what: str) -> io.Input:
    return io.Image.Input("image", tooltip=f"The reference image {what}. {ITEM_NOTE}")


def _grid_of(image, node: str) -> tuple[int, int]:
    x = first_item(image, node)
    if x.ndim != 4:
        raise fail(node, f"image: expected an IMAGE (B, H, W, C), got shape {tuple(x.shape)}")
    return token_grid_shape(int(x.shape[1]), int(x.shape[2]), STRIDE)


class _RuleSelector(SparseNode):
    """A selector that scores one reference with a rule of ``selectors/``: its inputs are the reference image,
    the rule's own ``PARAMS``, a budget and a weight; its output the scores of batch item 0 with the budget and
    weight attached. The node id is the class name (saved workflows name it)."""

    RULE = ""
    DESCRIBE = ""  # the schema's description
    PARAMS: tuple[io.Input, ...] = ()
    SIZE_ONLY = False  # the rule reads only the image's size (its token grid), not its pixels

    @classmethod
    def source_input(cls) -> io.Input:
        return _image_input("(only its size is used)" if cls.SIZE_ONLY else "to score")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=cls.__name__, display_name=cls.NAME, category=CATEGORY, description=cls.DESCRIBE,
            inputs=[cls.source_input(), *cls.PARAMS, budget_input(), weight_input()],
            outputs=[SparseSelection.Output(display_name="selection")],
        )

    @classmethod
    def scores(cls, image, **params) -> torch.Tensor:
        if cls.SIZE_ONLY:
            return reference_scores(cls.RULE, grid=_grid_of(image, cls.NAME), **params)
        return reference_scores(cls.RULE, first_item(image, cls.NAME), stride=STRIDE, **params)

    @classmethod
    def execute(cls, *, budget=None, weight: float = 1.0, **inputs) -> io.NodeOutput:
        # by name only, as ComfyUI passes them: the rule's inputs differ per node
        cls.check_inputs({**inputs, "weight": weight})
        with user_errors(cls.NAME):
            scores = cls.scores(**inputs)[0]
            return io.NodeOutput(ReferenceSelection(scores=scores, budget=budget_for(budget, cls.RULE), rule=cls.RULE,
                                                    weight=weight))


class SparseContextEdgeSelector(_RuleSelector):
    NAME, RULE = "Sparse Edge Selector", "edge"
    DESCRIBE = ("Keeps the reference tokens with the most Canny edges (outlines, text, texture) first, plus an even "
                "coverage floor so shape interiors survive. The paper's rule for editing. " + ITEM_NOTE)
    PARAMS = (
        io.Float.Input("low_threshold", default=0.1, min=0.01, max=4.0, step=0.01,
                       tooltip="Canny low threshold (Sobel magnitude of the grey image in 0..1; about 4x the "
                               "contrast of a step). Lower = more faint edges."),
        io.Float.Input("high_threshold", default=0.2, min=0.01, max=4.0, step=0.01,
                       tooltip="Canny high threshold (>= low_threshold). Edges start at pixels above it."),
        io.Int.Input("spread", default=1, min=0, max=8,
                     tooltip="Tokens within this many tokens of an edge also score (half as much), so the "
                             "sides of an outline are kept too. 0 = edges only."),
    )


class SparseContextSaliencySelector(_RuleSelector):
    NAME, RULE = "Sparse Saliency Selector", "saliency"
    DESCRIBE = ("Keeps the tokens that stand out (colour contrast + spectral-residual saliency: the subject, not the "
                "plain background) first. For subject-driven generation from several references. " + ITEM_NOTE)
    PARAMS = (io.Float.Input("blur_tokens", default=1.0, min=0.0, max=8.0, step=0.1,
                             tooltip="Smoothing of the saliency map, in tokens. More = rounder, bigger regions."),)


class SparseContextMaskSelector(_RuleSelector):
    NAME, RULE = "Sparse Mask Selector", "mask"
    DESCRIBE = ("Keeps the tokens a MASK covers first (e.g. the edit region painted in Load Image's mask editor), for "
                "spatially aligned edits: by default half the budget still covers the rest evenly. For a subject "
                "mask, connect a Budget with coverage 0 to keep only the subject. Scores come from batch item 0 of "
                "the mask.")
    PARAMS = (
        io.Float.Input("inside", default=1.0, min=0.0, max=1.0, step=0.01, tooltip="Score of fully masked tokens."),
        io.Float.Input("outside", default=0.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Score of unmasked tokens. Swap inside/outside to keep the surroundings of the mask "
                               "instead."),
        io.Int.Input("dilate_tokens", default=1, min=0, max=32,
                     tooltip="Grow the mask by this many tokens (16 px each) before scoring."),
        io.Int.Input("feather_tokens", default=2, min=0, max=32,
                     tooltip="Linear falloff over this many tokens outside the (grown) mask."),
    )

    @classmethod
    def source_input(cls) -> io.Input:
        return io.Mask.Input("mask", tooltip="The mask, at the reference image's size or aspect ratio (Load Image: "
                                             "painted = 1). Batch item 0 is used.")

    @classmethod
    def scores(cls, mask, **params) -> torch.Tensor:
        m = first_item(mask, cls.NAME, "mask")
        if m.is_floating_point() and not bool(torch.isfinite(m).all()):
            raise fail(cls.NAME, "mask: contains NaN or infinite values; expected values in [0, 1]")
        if not bool((m > 0).any()):
            raise fail(cls.NAME, "mask: is empty (all zeros). Paint a mask on the reference (Load Image: right "
                                 "click > Open in MaskEditor) or use another selector.")
        return reference_scores("mask", mask=m, stride=STRIDE, **params)


class SparseContextRandomSelector(_RuleSelector):
    NAME, RULE, SIZE_ONLY = "Sparse Random Selector", "random", True
    DESCRIBE = ("A seeded uniform random subset of the tokens (the training-time rule; a baseline to compare the "
                "other selectors with). The image only sets the token grid.")
    PARAMS = (io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                           tooltip="Seed of the subset; the same seed gives the same tokens on every device."),)


class SparseContextGridSelector(_RuleSelector):
    NAME, RULE, SIZE_ONLY = "Sparse Grid Selector", "grid", True
    DESCRIBE = ("An even, stratified subset of the tokens (every region keeps some): content-blind, keeps the layout. "
                "The image only sets the token grid.")


class SparseContextCombineSelections(SparseNode):
    NAME = "Combine Sparse Selections"

    @classmethod
    def define_schema(cls) -> io.Schema:
        def sel(name: str, optional: bool) -> io.Input:
            return SparseSelection.Input(name, optional=optional, tooltip=f"Selection {name[-1]} to combine.")

        def w(name: str) -> io.Input:
            return io.Float.Input(name, default=1.0, min=0.0, max=10.0, step=0.05,
                                  tooltip=f"Weight of selection {name[-1]} (each map is first scaled to max 1).")

        return io.Schema(
            node_id="SparseContextCombineSelections", display_name=cls.NAME, category=CATEGORY,
            description="Combines selections of the same reference into one: mix = weighted mean of their score "
                        "maps, max = the strongest weighted score per token (e.g. the whole mask region plus edges "
                        "elsewhere). Budget: the budget input, else selection_a's.",
            inputs=[
                sel("selection_a", False), sel("selection_b", False), sel("selection_c", True),
                sel("selection_d", True),
                w("weight_a"), w("weight_b"), w("weight_c"), w("weight_d"),
                io.Combo.Input("mode", options=["mix", "max"], default="max",
                               tooltip="mix: weighted mean; max: per-token maximum of the weighted maps."),
                budget_input(), weight_input(),
            ],
            outputs=[SparseSelection.Output(display_name="selection")],
        )

    @classmethod
    def execute(cls, selection_a, selection_b, weight_a: float, weight_b: float, weight_c: float, weight_d: float,
                mode: str, selection_c=None, selection_d=None, budget=None, weight: float = 1.0) -> io.NodeOutput:
        cls.check_inputs(locals())
        picked = [(n, s, w) for n, s, w in (("selection_a", selection_a, weight_a), ("selection_b", selection_b, weight_b),
                                              ("selection_c", selection_c, weight_c), ("selection_d", selection_d, weight_d))
                  if s is not None]
        for name, s, _ in picked:
            if not isinstance(s, ReferenceSelection):
                raise fail(cls.NAME, f"{name}: expected a SPARSE_SELECTION, got {type(s).__name__}")
        if not any(w > 0 for _, _, w in picked):
            names = "/".join(f"weight_{n[-1]}" for n, _, _ in picked)
            raise fail(cls.NAME, f"{names}: all 0 for the connected selections; give at least one a weight above 0")
        with user_errors(cls.NAME):
            scores = combine_scores([s.scores for _, s, _ in picked], [w for _, _, w in picked], mode)
            rule = "+".join(dict.fromkeys(s.rule for _, s, _ in picked))
            chosen = budget if budget is not None else selection_a.budget
            return io.NodeOutput(ReferenceSelection(scores=scores[0], budget=budget_for(chosen, rule.split("+")[0]),
                                                    rule=rule, weight=weight,
                                                    attention=max(s.attention for _, s, _ in picked)))


class SparseContextAttentionSelector(SparseNode):
    NAME = "Sparse Attention Selector"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SparseContextAttentionSelector", display_name=cls.NAME, category=CATEGORY,
            description="Lets the model choose: keeps the reference tokens its target attends to most (measured in the "
                        "first step, which runs every token of this reference; ReCAST-style), plus a small even "
                        "coverage floor. Optionally mixed with another selection's scores. Training-free and model-"
                        "aware; combines with the reference cache (Apply Sparse Context: cache).",
            inputs=[
                io.Float.Input("attention", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="Share of the model's measured attention in the scores; the rest comes from "
                                       "the connected selection (1 = attention only)."),
                SparseSelection.Input("selection", optional=True,
                                      tooltip="Optional selection of the same reference (e.g. Edge) whose scores are "
                                              "mixed with the measured attention."),
                budget_input(), weight_input(),
            ],
            outputs=[SparseSelection.Output(display_name="selection")],
        )

    @classmethod
    def execute(cls, attention: float, selection=None, budget=None, weight: float = 1.0) -> io.NodeOutput:
        cls.check_inputs(locals())
        if selection is not None and not isinstance(selection, ReferenceSelection):
            raise fail(cls.NAME, f"selection: expected a SPARSE_SELECTION, got {type(selection).__name__}")
        if selection is None:
            scores, rule, chosen = torch.ones(1, 1), "attention", budget
        else:
            scores, rule = selection.scores, f"{selection.rule}+attention"
            chosen = budget if budget is not None else selection.budget
        with user_errors(cls.NAME):
            return io.NodeOutput(ReferenceSelection(scores=scores, budget=budget_for(chosen, "attention"), rule=rule,
                                                    weight=weight, attention=attention))


SELECTOR_NODES: list[type[io.ComfyNode]] = [
    SparseContextEdgeSelector,
    SparseContextSaliencySelector,
    SparseContextMaskSelector,
    SparseContextRandomSelector,
    SparseContextGridSelector,
    SparseContextCombineSelections,
    SparseContextAttentionSelector,
]
