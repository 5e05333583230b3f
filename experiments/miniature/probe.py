"""Short training probes (development aid): train on one task for a few hundred steps with given Flux
kwargs / lr / sigma sampling and report dense PSNR of 4-step ComfyUI sampling on held-out items.
Defaults = the shipped configuration (``model.FLUX_KWARGS``, shifted sigma), edit task only.

    .venv/bin/python experiments/miniature/probe.py --steps 900 --sigma uniform --save /tmp/probe_model
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--axes", default="16,24,24")
    ap.add_argument("--theta", type=float, default=4)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--single", type=int, default=2)
    ap.add_argument("--mlp", type=float, default=2.0)
    ap.add_argument("--sigma", default="shifted")
    ap.add_argument("--tasks", default="edit")
    ap.add_argument("--eval_tasks", default="edit")
    ap.add_argument("--n_eval", type=int, default=8)
    ap.add_argument("--log_every", type=int, default=100)
    ap.add_argument("--identity", action="store_true")
    ap.add_argument("--qk", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save", default="", help="folder to save the trained model in")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(HERE.parents[1] / "scripts"))  # for packload only
    from packload import load_experiment

    load_experiment("miniature")
    import kornia
    import torch
    from sc_miniature import evaluate, model, run, train

    torch.set_num_threads(a.threads)
    kw = dict(model.FLUX_KWARGS, hidden_size=a.hidden, num_heads=a.heads, axes_dim=[int(x) for x in a.axes.split(",")],
              theta=a.theta, depth=a.depth, depth_single_blocks=a.single, mlp_ratio=a.mlp)
    m = model.build_model(kw, seed=0, qk_norm_init=a.qk)
    params = list(m.model.diffusion_model.parameters())
    for p in params:
        p.requires_grad_(True)
    t0 = time.time()
    from sc_miniature import encoding, tasks
    if a.identity:  # diagnostic: target = reference (pure aligned copy)
        orig = tasks.make_batch

        def ident(*args, **kw):
            b = orig(*args, **kw)
            b.target = b.refs[0].clone()
            return b
        tasks.make_batch = ident
    probe_items = run.eval_items("edit", 8)

    def x0_images(items, sig: float, dm, options: dict) -> list:
        """The model's one-step x0 estimate (IMAGE) of each item at noise level ``sig`` (fixed noise)."""
        out = []
        with torch.no_grad():
            for it in items:
                x0 = train.model_latents(m, it.target)
                refs = [train.model_latents(m, r) for r in it.refs]
                noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
                xt = sig * noise + (1 - sig) * x0
                v = dm(xt, torch.tensor([sig]), it.context, y=it.pooled, ref_latents=refs, ref_latents_method="offset",
                       transformer_options=dict(options))
                out.append(encoding.decode(m.model.process_latent_out(xt - sig * v)))
        return out

    def psnr(image, it) -> float:
        return float(kornia.metrics.psnr(image.permute(0, 3, 1, 2), it.target.permute(0, 3, 1, 2), 1.0))

    def x0_psnr(sig: float = 1.0) -> float:
        vals = [psnr(x, it) for x, it in zip(x0_images(probe_items, sig, m.model.diffusion_model, {}), probe_items,
                                             strict=True)]
        return sum(vals) / len(vals)

    def log(msg: str) -> None:
        print(msg, f" x0@1 {x0_psnr(1.0):.2f}  x0@0.5 {x0_psnr(0.5):.2f}", flush=True)

    losses = train.train(m, params, a.steps, batch=a.batch, lr=a.lr, task_list=tuple(a.tasks.split(",")),
                         sigma_sampling=a.sigma, log=log, log_every=a.log_every)
    for p in params:
        p.requires_grad_(False)
    tt = time.time() - t0
    if a.save:
        model.save_model(m, model.ModelFiles(Path(a.save), "probe"), kw)
    from sc_harness.direct import patched_diffusion_model
    items = run.eval_items("edit", a.n_eval)
    with patched_diffusion_model(m) as (dm, opts):
        for sig in (1.0, 0.7, 0.4, 0.1):
            images = x0_images(items, sig, dm, opts)
            vals = [psnr(x, it) for x, it in zip(images, items, strict=True)]
            # share of the squared error inside the edited region, and the PSNR if only the outside erred
            e_in = e_out = n = 0.0
            for x, it in zip(images, items, strict=True):
                err = (x - it.target).pow(2).mean(-1)[0]
                inside = it.target_mask[0] > 0.5
                e_in, e_out, n = e_in + float(err[inside].sum()), e_out + float(err[~inside].sum()), n + err.numel()
            print(f"x0 psnr at sigma {sig}: {sum(vals) / len(vals):.2f}  error share inside the edit "
                  f"{e_in / max(e_in + e_out, 1e-12):.2f}; PSNR if only outside errors "
                  f"{10 * math.log10(n / max(e_out, 1e-9)):.2f}", flush=True)
    for task in a.eval_tasks.split(","):
        items = run.eval_items(task, a.n_eval)
        ps, ident, ious = [], [], []
        for i, it in enumerate(items):
            pred, _ = evaluate.generate(m, it, None, 4, seed=1000 + i)
            met = evaluate.metrics(pred, it)
            ps.append(met["psnr"])
            ious.append(met.get("iou", float("nan")))
            if task == "edit":
                ident.append(psnr(it.refs[0], it))
        msg = f"{task}: dense4 {sum(ps) / len(ps):.2f} dB  iou {sum(ious) / len(ious):.2f}"
        if ident:
            msg += f"  identity {sum(ident) / len(ident):.2f} dB"
        print(f"RESULT {vars(a)} params={sum(p.numel() for p in params)} train {tt:.0f}s "
              f"loss_last50 {sum(losses[-50:]) / len(losses[-50:]):.4f} {msg}", flush=True)


if __name__ == "__main__":
    if sys.path and Path(sys.path[0]).resolve() == HERE:
        sys.path.pop(0)
    main()
