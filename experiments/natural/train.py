"""Full-weight flow-matching training through ComfyUI's Flux forward: the base model (dense) and the
drop-robust full fine-tune (every batch keeps a random share of each reference's tokens through the pack's
own patch, ``sparse_context.training.sparse_run_for``, exactly as the LoRA trainer does).

Loss and gradients as in the miniature (``sc_miniature.train``): ComfyUI's CONST rectified flow, sigma through
the model's own shift, the graph recorded under saved-tensor cloning (ComfyUI's blocks add residuals in place).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from . import tasks


def train(model, steps: int, *, batch: int, lr: float, seed: int, task_list: tuple[str, ...] = tasks.TASKS,
          keep_ratios=None, warmup: int = 50, log: Callable[[str], None] = print, log_every: int = 100) -> list[float]:
    """Train every weight of ``model`` (a ComfyUI ModelPatcher) for ``steps`` AdamW steps (cosine decay after
    ``warmup``), one task per batch in turn. ``keep_ratios`` (a ``KeepRatioDistribution``): drop-robust
    training, one random keep ratio and subset per batch; None = dense. Returns the loss per step."""
    from sc_miniature.train import _sigmas, model_latents
    from sparse_context.sparse_attention import RUN_KEY, SparseContextConfig, apply_sparse_context
    from sparse_context.sparse_attention.direct import patched_diffusion_model
    from sparse_context.training import sparse_run_for

    params = list(model.model.diffusion_model.parameters())
    for p in params:
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
    runner = model if keep_ratios is None else apply_sparse_context(model, SparseContextConfig(rule="random", bucket=1))
    losses: list[float] = []
    t0 = time.time()
    with patched_diffusion_model(runner) as (dm, base_options):
        dm.train()
        for step in range(steps):
            task = task_list[step % len(task_list)]
            b = tasks.make_batch(task, batch, seed=seed * 1_000_003 + step)
            x0 = model_latents(model, b.target)
            refs = [model_latents(model, r) for r in b.refs]
            noise = torch.randn(x0.shape, generator=gen)
            sigma = _sigmas("shifted", batch, gen, model)
            s = sigma.view(-1, 1, 1, 1)
            options = dict(base_options)
            if keep_ratios is not None:
                options[RUN_KEY] = sparse_run_for(keep_ratios.sample(gen), seed * 7_000_003 + step)
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
                pred = dm(s * noise + (1 - s) * x0, sigma, b.context, y=b.pooled, ref_latents=refs,
                          ref_latents_method="offset", transformer_options=options)
            loss = torch.nn.functional.mse_loss(pred, noise - x0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if log_every and ((step + 1) % log_every == 0 or step == steps - 1):
                recent = losses[-log_every:]
                log(f"  step {step + 1}/{steps}  loss {sum(recent) / len(recent):.4f}  ({time.time() - t0:.0f} s)")
        dm.eval()
    for p in params:
        p.requires_grad_(False)
        p.grad = None
    return losses
