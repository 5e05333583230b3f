"""Flow-matching training of the miniature model through ComfyUI's own Flux forward.

Targets follow ComfyUI's CONST (rectified flow) sampling: ``x_t = sigma * noise + (1 - sigma) * x0``,
the model predicts ``noise - x0`` at timestep ``sigma``. The graph is recorded under
``saved_tensors_hooks(pack=clone)`` because ComfyUI's Flux blocks add residuals in place (a plain
backward fails and checkpointing gives wrong gradients; see docs/notes).

This trains the BASE model from scratch (all weights, batches of one task at a time). The drop-robust
LoRA fine-tune is the pack's own ``training.LoraTrainer`` (see ``run.py``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from . import encoding, tasks


def model_latents(model, images: torch.Tensor) -> torch.Tensor:
    """IMAGE (B, H, W, 3) -> the latent as the diffusion model sees it (after ``process_latent_in``)."""
    return model.model.process_latent_in(encoding.encode(images))


def _sigmas(kind: str, n: int, gen: torch.Generator, model=None) -> torch.Tensor:
    """(n,) training noise levels in (0, 1)."""
    if kind == "shifted":  # where ComfyUI's sampler goes: U(0, 1) through the model's sigma shift
        ms = model.get_model_object("model_sampling")
        return ms.sigma(ms.timestep(torch.rand(n, generator=gen).clamp(1e-3, 1.0))).float()
    if kind == "uniform":
        return torch.rand(n, generator=gen).clamp(1e-3, 1.0)
    if kind == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=gen))
    if kind == "sqrt":
        return torch.rand(n, generator=gen).sqrt()
    raise ValueError(f"sigma_sampling: expected shifted, uniform, logit_normal or sqrt, got {kind!r}")


def train(model, params: list[torch.nn.Parameter], steps: int, *, batch: int = 8, lr: float = 2e-3, seed: int = 0,
          task_list: tuple[str, ...] = tasks.TASKS, warmup: int = 50, sigma_sampling: str = "uniform",
          log: Callable[[str], None] = print, log_every: int = 100, make_batch: Callable | None = None,
          keep_ratios=None) -> list[float]:
    """Train ``params`` of ``model`` (a ComfyUI ModelPatcher) for ``steps`` AdamW steps (cosine decay after
    ``warmup``); the tasks of ``task_list`` take turns, one task per batch (repeat a task name to weight it).
    ``sigma_sampling``: "uniform" (U(0, 1)), "logit_normal" (sigmoid(N(0, 1))) or "sqrt" (sqrt(U), density
    2 sigma). ``make_batch(task, batch, seed)``: the batches (default: this folder's tasks). ``keep_ratios`` (a
    ``KeepRatioDistribution``): drop-robust training, one random keep ratio and subset per batch through the pack's
    own patch (``training.sparse_run_for``, as the LoRA trainer does); None = dense. Returns the loss per step."""
    from sc_harness.direct import patched_diffusion_model
    from sparse_context.sparse_attention import RUN_KEY, SparseContextConfig, apply_sparse_context
    from sparse_context.training import sparse_run_for
    from sparse_context.training.rope_autograd import differentiable_rope

    make_batch = make_batch or tasks.make_batch
    runner = model if keep_ratios is None else apply_sparse_context(model, SparseContextConfig(rule="random", bucket=1))
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
    losses: list[float] = []
    t0 = time.time()
    with patched_diffusion_model(runner) as (dm, base_options):
        dm.train()
        for step in range(steps):
            task = task_list[step % len(task_list)]
            b = make_batch(task, batch, seed=seed * 1_000_003 + step)
            x0 = model_latents(model, b.target)
            refs = [model_latents(model, r) for r in b.refs]
            noise = torch.randn(x0.shape, generator=gen)
            sigma = _sigmas(sigma_sampling, batch, gen, model)
            s = sigma.view(-1, 1, 1, 1)
            x_t = s * noise + (1 - s) * x0
            options = dict(base_options)
            if keep_ratios is not None:
                options[RUN_KEY] = sparse_run_for(keep_ratios.sample(gen), seed * 7_000_003 + step)
            # ComfyUI 0.10+ runs RoPE through fused kernels without a backward: the pack's training switch
            with differentiable_rope(), torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
                pred = dm(x_t, sigma, b.context, y=b.pooled, ref_latents=refs, ref_latents_method="offset",
                          transformer_options=options)
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
        p.grad = None
    return losses


def thin_curve(xs: list[float], n: int = 200) -> list[float]:
    """A loss curve averaged down to about ``n`` points (for the results JSON)."""
    step = max(1, len(xs) // n)
    return [round(sum(xs[i:i + step]) / len(xs[i:i + step]), 5) for i in range(0, len(xs), step)]
