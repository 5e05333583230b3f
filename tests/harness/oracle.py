"""An exactness oracle and probes for the model patch, through ComfyUI's own attention override."""

from __future__ import annotations

import torch


def joint_keep(text: int, target: int, plans) -> torch.Tensor:
    """(L,) bool over the joint [text, target, references] order: True for text, target and kept reference tokens."""
    parts = [torch.ones(text + target, dtype=torch.bool)]
    for p in plans:
        keep = torch.zeros(p.total, dtype=torch.bool)
        keep[p.indices] = True
        parts.append(keep)
    return torch.cat(parts)


class AttentionProbe:
    """``transformer_options["optimized_attention_override"]``: records every joint sequence length (and the
    reference token counts the model recorded) and, with ``key_keep`` (a (L,) bool over the joint [text, target,
    references] order), hides the other keys with an additive -inf mask: the dense forward with dropped tokens
    masked out as keys."""

    def __init__(self, key_keep: torch.Tensor | None = None, blocks_only: bool = False):
        self.key_keep = key_keep
        self.blocks_only = blocks_only  # pass through calls outside the transformer blocks (Krea 2's text fusion)
        self.lengths: list[int] = []  # keys per attention call
        self.query_lengths: list[int] = []
        self.reference_counts: list = []  # transformer_options["reference_image_num_tokens"] where the host records it

    def __call__(self, func, *args, **kwargs):
        q, k, v = args[:3]
        if self.blocks_only and "block_index" not in (kwargs.get("transformer_options") or {}):
            return func(*args, **kwargs)
        seq = 2 if kwargs.get("skip_reshape") else 1
        self.lengths.append(int(k.shape[seq]))
        self.query_lengths.append(int(q.shape[seq]))
        self.reference_counts.append((kwargs.get("transformer_options") or {}).get("reference_image_num_tokens"))
        if self.key_keep is None:
            return func(*args, **kwargs)
        heads = args[3] if len(args) > 3 else kwargs.pop("heads")  # JoyImage passes heads by name
        mask = args[4] if len(args) > 4 else kwargs.pop("mask", None)
        add = torch.zeros(self.key_keep.shape[0], dtype=q.dtype, device=q.device)
        add[~self.key_keep.to(q.device)] = float("-inf")
        add = add.view(1, 1, 1, -1)
        if mask is not None:
            add = add + mask
        return func(q, k, v, heads, mask=add, **kwargs)


class IdsProbe(torch.nn.Module):
    """Object patch for ``diffusion_model.pe_embedder`` (a module slot): records the ids it embeds."""

    def __init__(self, original: torch.nn.Module):
        super().__init__()
        self.inner = original
        self.ids: list[torch.Tensor] = []

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.ids.append(ids.detach().clone())
        return self.inner(ids)
