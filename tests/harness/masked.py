"""The masked-dense oracle as a forward input: the DENSE model with an additive ``attention_mask`` that hides the
dropped reference tokens as keys. The model passes the mask to its blocks itself (also blocks that packs such as
TeaCache call without ``transformer_options``, where the attention override cannot reach), so it is an oracle
next to any pack that keeps the model's block arguments."""

from __future__ import annotations

import inspect
import math

import torch

from .oracle import joint_keep


class MaskedReferences:
    """DIFFUSION_MODEL wrapper: every forward gets ``attention_mask`` = -inf on the columns of dropped reference
    tokens (joint order [text, target, references]); ``plans`` are the patch's plans of the references."""

    def __init__(self, plans, patch_size: int):
        self.plans = plans
        self.patch_size = patch_size
        self.forwards = 0

    def __call__(self, executor, *args, **kwargs):
        named = inspect.signature(executor.original).bind(*args, **kwargs).arguments
        named.update(named.pop("kwargs", {}))
        x, context, refs = named["x"], named.get("context"), named.get("ref_latents") or []
        text = int(context.shape[1]) if context is not None else 0
        p = self.patch_size
        target = math.ceil(x.shape[-2] / p) * math.ceil(x.shape[-1] / p)
        totals = [math.ceil(r.shape[-2] / p) * math.ceil(r.shape[-1] / p) for r in refs]
        assert totals == [plan.total for plan in self.plans], (totals, [plan.total for plan in self.plans])
        keep = joint_keep(text, target, self.plans)
        mask = torch.zeros(keep.shape[0], dtype=x.dtype, device=x.device)
        mask[~keep.to(x.device)] = float("-inf")
        self.forwards += 1
        kwargs["attention_mask"] = mask.view(1, 1, 1, -1).expand(1, 1, keep.shape[0], -1).contiguous()
        return executor(*args, **kwargs)
