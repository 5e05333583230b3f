"""Preview Sparse Tokens: the reference image with the tokens a selection keeps bright, the rest dimmed."""

from __future__ import annotations

import cv2
import numpy as np
import torch
from comfy_api.latest import io, ui

from ..selectors import Budget, token_grid_shape
from ..sparse_attention import SparseContextConfig
from ..sparse_attention.planning import plan_selection
from .common import ITEM_NOTE, STRIDE, SparseBudget, SparseNode, SparseSelection, fail, first_item, user_errors

DIM = 0.25  # brightness of dropped tokens
GRID_DARKEN = 0.6  # token borders


def kept_mask(selection, height: int, width: int, config: SparseContextConfig, reference: int = 1) -> torch.Tensor:
    """(h_tok, w_tok) bool: the tokens Apply Sparse Context with ``config`` keeps of an H x W reference bound
    to ``selection`` at position ``reference`` (1-based; its seed offset): the patch's own planning code.

    A shared total budget (total_tokens) is not modelled here (it depends on the other references).
    """
    grid = token_grid_shape(height, width, STRIDE)
    plan = plan_selection(reference - 1, grid, selection, config)
    keep = torch.zeros(plan.total, dtype=torch.bool)
    keep[plan.indices] = True
    return keep.view(grid)


def draw_tokens(image: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(1, H, W, C) image + (h, w) kept tokens -> (1, H, W, 3): dropped dimmed, thin token grid, count text."""
    rgb = image[0, :, :, :3] if image.shape[-1] >= 3 else image[0, :, :, :1].expand(-1, -1, 3)
    h_px, w_px = rgb.shape[:2]
    tok = keep.float().repeat_interleave(STRIDE, 0).repeat_interleave(STRIDE, 1)[:h_px, :w_px]
    if tok.shape != (h_px, w_px):  # picture smaller than whole tokens: pad the map
        tok = torch.nn.functional.pad(tok, (0, w_px - tok.shape[1], 0, h_px - tok.shape[0]), value=1.0)
    shade = DIM + (1.0 - DIM) * tok
    lines = torch.ones(h_px, w_px)
    lines[::STRIDE, :] = GRID_DARKEN
    lines[:, ::STRIDE] = GRID_DARKEN
    out = (rgb.float().cpu() * (shade * lines).unsqueeze(-1)).clamp(0, 1)
    kept, total = int(keep.sum()), keep.numel()
    text = f"kept {kept}/{total} tokens ({100.0 * kept / total:.0f}%)"
    arr = np.ascontiguousarray((out.numpy() * 255).astype(np.uint8))
    scale = max(0.35, min(w_px, h_px) / 700)
    thick = max(1, round(scale * 2))
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    pad = max(2, th // 3)
    cv2.rectangle(arr, (0, 0), (min(w_px - 1, tw + 2 * pad), min(h_px - 1, th + base + 2 * pad)), (0, 0, 0), -1)
    cv2.putText(arr, text, (pad, pad + th), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick, cv2.LINE_AA)
    return torch.from_numpy(arr).float().div(255).unsqueeze(0)


class SparseContextPreview(SparseNode):
    NAME = "Preview Sparse Tokens"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SparseContextPreview", display_name=cls.NAME, category="SparseContext/preview",
            description="Shows which tokens of a reference Apply Sparse Context keeps for a selection: kept tokens "
                        "bright, dropped ones dimmed, a 16 px token grid and the kept count. Set reference, seed, "
                        "keep_ratio/budget and bucket as on Apply Sparse Context to see exactly its tokens (a shared "
                        "total_tokens budget is not shown). " + ITEM_NOTE,
            inputs=[
                io.Image.Input("image", tooltip="The reference image the selection was made from."),
                SparseSelection.Input("selection", tooltip="The selection to show."),
                SparseBudget.Input("budget", optional=True,
                                   tooltip="The budget connected to Apply Sparse Context, if any. As there, a selection's "
                                           "own budget wins; this one (else keep_ratio) applies to selections without."),
                io.Int.Input("bucket", default=64, min=1, max=4096,
                             tooltip="The bucket of Apply Sparse Context (kept counts rounded up to it)."),
                io.Int.Input("reference", default=1, min=1, max=64, optional=True,
                             tooltip="Which reference of the conditioning the selection is bound to (1 = first): each "
                                     "reference has its own tie-break seed."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False, optional=True,
                             tooltip="The seed of Apply Sparse Context."),
                io.Float.Input("keep_ratio", default=0.25, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="The keep_ratio of Apply Sparse Context (used when neither the selection nor the "
                                       "budget input has a budget)."),
            ],
            outputs=[io.Image.Output(display_name="preview")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, image, selection, bucket: int, reference: int = 1, seed: int = 0, keep_ratio: float = 0.25,
                budget=None) -> io.NodeOutput:
        cls.check_inputs(locals())
        if not hasattr(selection, "scores"):
            raise fail(cls.NAME, f"selection: expected a SPARSE_SELECTION, got {type(selection).__name__}")
        if budget is not None and not isinstance(budget, Budget):
            raise fail(cls.NAME, f"budget: expected a SPARSE_BUDGET, got {type(budget).__name__}")
        with user_errors(cls.NAME, {"ratio": "keep_ratio"}):
            img = first_item(image, cls.NAME)
            if img.ndim != 4:
                raise fail(cls.NAME, f"image: expected an IMAGE (B, H, W, C), got shape {tuple(img.shape)}")
            config = SparseContextConfig(budget=budget if budget is not None else Budget(mode="ratio", ratio=keep_ratio),
                                         bucket=bucket, seed=seed)
            keep = kept_mask(selection, int(img.shape[1]), int(img.shape[2]), config, reference)
            out = draw_tokens(img, keep)
        return io.NodeOutput(out, ui=ui.PreviewImage(out, cls=cls))
