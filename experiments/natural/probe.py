"""Fine-tune probe (development aid): a full fine-tune of a finished run's base model with another learning rate,
dense share or length, then PSNR of the Grid selector at keep 1.0 / 0.5 / 0.25 on the run's held-out items.
It answers whether the fine-tune's cost in dense quality comes from the dropping or from fine-tuning at all
(``--dense-share 1`` = the same fine-tune without dropping).

    .venv/bin/python experiments/natural/probe.py /tmp/natural_long --lr 1e-4 --dense-share 0.25
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", type=Path, help="a finished run's --out folder (its base model is fine-tuned)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--dense-share", type=float, default=0.25, help="share of dense batches (1 = no dropping)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    sys.path.insert(0, str(HERE.parents[1] / "scripts"))  # for packload only
    from packload import load_experiment

    load_experiment("natural")
    import torch
    from sc_miniature import model
    from sc_miniature.train import train
    from sc_natural import run, tasks
    from sparse_context.training import KeepRatioDistribution

    torch.set_num_threads(args.threads)
    torch.manual_seed(run.SEED)
    ft = model.load_trained_model(model.ModelFiles(args.results, run.NAME).base)
    params = list(ft.model.diffusion_model.parameters())
    for p in params:
        p.requires_grad_(True)
    keep = KeepRatioDistribution(kind="uniform", low=run.FULL["keep_low"], high=1.0, dense_share=args.dense_share)
    t0 = time.time()
    train(ft, params, args.steps, task_list=tasks.TASKS, sigma_sampling="shifted", make_batch=tasks.make_batch,
          batch=args.batch, lr=args.lr, seed=run.SEED + 1, keep_ratios=keep, warmup=20, log=lambda _m: None,
          log_every=args.steps + 1)
    for p in params:
        p.requires_grad_(False)
    cfg = dict(run.LONG, ratios=(1.0, 0.5, 0.25), selectors=("grid",), extra=False)
    rows = run.evaluate_all({"ft": ft}, cfg, lambda _m: None)
    result = {"lr": args.lr, "dense_share": args.dense_share, "steps": args.steps, "batch": args.batch,
              "train_s": round(time.time() - t0),
              "psnr": {f"{r['task']} keep {r['keep_ratio']}": round(r["psnr"], 2) for r in rows if r["model"] == "ft"}}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    if sys.path and Path(sys.path[0]).resolve() == HERE:
        sys.path.pop(0)  # this folder is loaded as the package ``sc_natural``, never as top-level modules
    main()
