"""Sparse Budget: how many tokens a reference keeps (ratio, fixed count, or adaptive to the image)."""

from __future__ import annotations

from comfy_api.latest import io

from ..selectors import DEFAULT_COVERAGE, Budget
from .common import AutoCoverageBudget, SparseBudget, SparseNode, user_errors

_DEFAULTS = ", ".join(f"{k} {v:g}" for k, v in DEFAULT_COVERAGE.items())


class SparseContextBudget(SparseNode):
    NAME = "Sparse Budget"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SparseContextBudget", display_name=cls.NAME, category="SparseContext/selectors",
            description="How many tokens a reference keeps: a ratio, a fixed count, or adaptive (as many as hold "
                        "`mass` of the selector's score mass, clamped to [min_ratio, max_ratio]: busy images keep "
                        "more). Connect to a selector's budget (per reference) or to Apply Sparse Context (default).",
            inputs=[
                io.Combo.Input("mode", options=["ratio", "count", "adaptive"], default="ratio",
                               tooltip="ratio: keep_ratio of the tokens; count: token_count tokens; adaptive: "
                                       "enough tokens to hold `mass` of the score mass."),
                io.Float.Input("keep_ratio", default=0.25, min=0.0, max=1.0, step=0.01,
                               tooltip="ratio mode: share of the tokens kept (0.25 of a 1024 px reference = 1024 "
                                       "of 4096 tokens)."),
                io.Int.Input("token_count", default=1024, min=0, max=65536, step=16,
                             tooltip="count mode: tokens kept (capped at the reference's token count)."),
                io.Float.Input("mass", default=0.8, min=0.01, max=1.0, step=0.01,
                               tooltip="adaptive mode: share of the score mass the kept tokens must hold."),
                io.Float.Input("min_ratio", default=0.05, min=0.0, max=1.0, step=0.01,
                               tooltip="adaptive mode: keep at least this share of the tokens."),
                io.Float.Input("max_ratio", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="adaptive mode: keep at most this share of the tokens (>= min_ratio)."),
                io.Float.Input("coverage", default=-1.0, min=-1.0, max=0.95, step=0.05,
                               tooltip="Share of the kept tokens spread evenly over the image before the scores "
                                       f"pick the rest. -1 = the selector's recommended floor ({_DEFAULTS}; 0 when "
                                       "used on Apply Sparse Context)."),
            ],
            outputs=[SparseBudget.Output(display_name="budget")],
        )

    @classmethod
    def execute(cls, mode: str, keep_ratio: float, token_count: int, mass: float, min_ratio: float, max_ratio: float,
                coverage: float) -> io.NodeOutput:
        cls.check_inputs(locals())
        with user_errors(cls.NAME, {"ratio": "keep_ratio", "count": "token_count"}):
            kind = AutoCoverageBudget if coverage < 0 else Budget
            return io.NodeOutput(kind(mode=mode, ratio=keep_ratio, count=token_count, mass=mass, min_ratio=min_ratio,
                                      max_ratio=max_ratio, coverage=max(0.0, coverage)))
