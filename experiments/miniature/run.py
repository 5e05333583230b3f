"""The miniature replication, end to end, in one seeded command:

    bash scripts/setup.sh > /dev/null                             # once, from the repo root
    .venv/bin/python experiments/miniature/run.py --smoke         # pipeline check (seconds), into out/experiments/
    .venv/bin/python experiments/miniature/run.py                 # full run (21 min on 2 CPU cores), the same
    .venv/bin/python experiments/miniature/run.py --publish       # full run into results/ (the committed files)

1. trains a tiny FLUX.1-Kontext-shaped ComfyUI ``Flux`` from scratch on three generated tasks
   (``tasks.py``: recolouring edit, a subject on a new background, multi-reference composition);
2. fine-tunes it with the pack's drop-robust LoRA trainer (``sparse_context.training.LoraTrainer``:
   random reference-token dropping through the pack's own patch);
3. evaluates base and base + LoRA on held-out items through ``apply_sparse_context`` with selections from
   the pack's selectors, for every keep ratio x selector, sampling with ComfyUI's own sampler;
4. writes ``miniature.json`` (with the sha256 of each model file), ``miniature.png`` and the model
   (``miniature_flux*.safetensors`` + ``miniature_flux.json``) to the scratch folder, ``--out`` or, with
   ``--publish``, ``results/``.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
NAME = "miniature"

FULL = dict(base_steps=3000, batch=8, lr=3e-3, base_tasks=("edit", "subject", "multi"), sigma_sampling="shifted",
            lora_steps=800, lora_accum=4, lora_lr=2e-3, lora_rank=8,
            pool=400, n_eval=16, sample_steps=4, ratios=(1.0, 0.5, 0.25, 0.1), selectors=None)
SMOKE = dict(base_steps=4, batch=2, lr=3e-3, base_tasks=("edit", "subject", "multi"), sigma_sampling="shifted",
             lora_steps=2, lora_accum=1, lora_lr=2e-3, lora_rank=4,
             pool=2, n_eval=1, sample_steps=2, ratios=(1.0, 0.25), selectors=("random", "grid", "saliency", "edge+mask"))
SEED = 0
EVAL_SEED = 10**8  # held out: training batches use seeds < 10**7, the LoRA's example pool 5 * 10**7 + i


def _bootstrap():
    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))  # for packload only (the repo root never goes on sys.path)
    from packload import load_experiment

    return load_experiment(NAME)


def eval_items(task: str, n: int) -> list:
    """Held-out one-item batches; multi-reference items alternate 2 and 3 references."""
    from sc_miniature import tasks

    t = tasks.TASKS.index(task)
    return [tasks.make_batch(task, 1, EVAL_SEED + 7919 * t + i, n_refs=2 + i % 2 if task == "multi" else None)
            for i in range(n)]


def lora_examples(n_per_task: int) -> list:
    """The LoRA's training examples (``sparse_context.training.TrainingExample``, latents as VAEEncode gives them)."""
    from sc_miniature import encoding, tasks
    from sparse_context.training import TrainingExample

    out = []
    for t, task in enumerate(tasks.TASKS):
        for i in range(n_per_task):
            b = tasks.make_batch(task, 1, 5 * 10**7 + 100_003 * t + i)
            out.append(TrainingExample(encoding.encode(b.target), [encoding.encode(r) for r in b.refs], b.context,
                                       b.pooled, reference_method="offset", meta={"task": task}))
    return out


def evaluate_all(models: dict, cfg: dict, log) -> list[dict]:
    """Every (task, model, keep ratio, selector) through the patch; returns one row per configuration."""
    from sc_experiment.stats import patch_fields, result_row
    from sc_miniature import evaluate, tasks
    from sparse_context.selectors import Budget
    from sparse_context.sparse_attention import PATCH_KEY, SparseContextConfig, apply_sparse_context

    selectors = evaluate.selectors()
    names = list(cfg["selectors"] or selectors)
    rows = []
    for task in tasks.TASKS:
        items = eval_items(task, cfg["n_eval"])
        for model_name, model in models.items():
            configs = [(1.0, "dense", model)]
            for ratio in cfg["ratios"]:
                if ratio < 1.0:
                    # bucket 1: exact kept counts (the default 64 would round 10 % of 256 tokens up to 25 %)
                    patched = apply_sparse_context(model, SparseContextConfig(budget=Budget(mode="ratio", ratio=ratio),
                                                                              rule="grid", bucket=1, seed=SEED))
                    configs += [(ratio, name, patched) for name in names]
            t0 = time.time()
            dense_items: list[dict] = []
            for ratio, name, m in configs:
                per_item, seconds, report = [], [], None
                for i, item in enumerate(items):
                    binding = None if name == "dense" else evaluate.binding_for(item, selectors[name], ratio, seed=i)
                    pred, sec = evaluate.generate(m, item, binding, cfg["sample_steps"], seed=1000 + i)
                    per_item.append(evaluate.metrics(pred, item))
                    seconds.append(sec / cfg["sample_steps"])
                    if name != "dense" and report is None:
                        report = m.model_options["transformer_options"][PATCH_KEY].last_report
                key = {"task": task, "model": model_name, "selector": name, "keep_ratio": ratio}
                if name == "dense":
                    dense_items = per_item
                rows.append(result_row(key, per_item, None if name == "dense" else dense_items,
                                       **patch_fields(seconds, report)))
            log(f"  evaluated {task} / {model_name}: {len(configs)} configurations x {len(items)} items "
                f"({time.time() - t0:.0f} s)")
    return rows


def summarize(rows: list[dict], ratios: tuple) -> dict:
    """Per task and model: dense, the default selector vs random, the best selector per ratio, target checks."""
    from sc_miniature.evaluate import DEFAULT_SELECTOR

    def get(task, model, sel, ratio):
        return next((r for r in rows if (r["task"], r["model"], r["selector"], r["keep_ratio"]) == (task, model, sel, ratio)), None)

    out: dict = {}
    for task in sorted({r["task"] for r in rows}):
        out[task] = {}
        for model in sorted({r["model"] for r in rows}):
            dense = get(task, model, "dense", 1.0)
            d = {"dense_psnr": dense["psnr"], "dense_ssim": dense["ssim"], "default_selector": DEFAULT_SELECTOR[task]}
            for ratio in ratios:
                if ratio >= 1.0:
                    continue
                cands = [r for r in rows if (r["task"], r["model"], r["keep_ratio"]) == (task, model, ratio)]
                best = max(cands, key=lambda r: r["psnr"])
                default, rnd = get(task, model, DEFAULT_SELECTOR[task], ratio), get(task, model, "random", ratio)
                d[f"keep_{ratio}"] = {
                    "best_selector": best["selector"], "best_psnr": best["psnr"],
                    "default_psnr": default["psnr"] if default else None,
                    "default_ssim": default["ssim"] if default else None,
                    "random_psnr": rnd["psnr"] if rnd else None,
                    "default_minus_dense_psnr": round(default["psnr"] - dense["psnr"], 3) if default else None,
                    "default_minus_dense_ssim": round(default["ssim"] - dense["ssim"], 4) if default else None,
                    "default_minus_random_psnr": round(default["psnr"] - rnd["psnr"], 3) if default and rnd else None,
                }
            out[task][model] = d
    checks = {}
    if "edit" in out and "base" in out["edit"]:
        checks["edit_dense_psnr_at_least_25dB"] = out["edit"]["base"]["dense_psnr"] >= 25.0
    for task, models in out.items():
        lora = models.get("lora", {}).get("keep_0.25")
        if lora and lora["default_psnr"] is not None:
            checks[f"{task}_lora_default_keep0.25_within_0.5dB_of_dense"] = lora["default_minus_dense_psnr"] >= -0.5
            checks[f"{task}_lora_default_keep0.25_within_0.01_ssim_of_dense"] = lora["default_minus_dense_ssim"] >= -0.01
        for ratio in (0.25, 0.1):
            for model, d in models.items():
                k = d.get(f"keep_{ratio}")
                if k and k["default_minus_random_psnr"] is not None:
                    checks[f"{task}_{model}_default_not_worse_than_random_keep{ratio}"] = k["default_minus_random_psnr"] >= 0.0
    return {"per_task": out, "checks": checks}


def main(argv: list[str] | None = None) -> dict:
    _bootstrap()
    from sc_experiment import cli

    args = cli.parser(__doc__, threads=2).parse_args(argv)
    out = cli.results_folder(args, NAME)
    if args.resummarize:
        return resummarize(out)
    cfg = dict(SMOKE if args.smoke else FULL)
    t_start = time.time()
    log = cli.stage_logger()

    import torch
    from sc_experiment.lora import train_lora
    from sc_miniature import evaluate, model, tasks, train
    from sparse_context.training import KeepRatioDistribution

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    out.mkdir(parents=True, exist_ok=True)
    files = model.ModelFiles(out, NAME)

    # 1. base model from scratch
    base = model.build_model(seed=SEED)
    params = list(base.model.diffusion_model.parameters())
    n_params = sum(p.numel() for p in params)
    log(f"base model: {n_params} parameters; training {cfg['base_steps']} steps x batch {cfg['batch']}")
    for p in params:
        p.requires_grad_(True)
    base_losses = train.train(base, params, cfg["base_steps"], batch=cfg["batch"], lr=cfg["lr"], seed=SEED,
                              task_list=tuple(cfg["base_tasks"]), sigma_sampling=cfg["sigma_sampling"], log=log, log_every=max(1, cfg["base_steps"] // 10))
    for p in params:
        p.requires_grad_(False)
    t_base = time.time() - t_start
    model.save_model(base, files, metadata={"trained_steps": cfg["base_steps"], "tasks": list(tasks.TASKS)})

    # 2. drop-robust LoRA with the pack's trainer
    keep = KeepRatioDistribution(kind="uniform", low=0.05, high=1.0, dense_share=0.15)
    lora_losses, lora_cfg = train_lora(base, lora_examples(cfg["pool"]), cfg, keep, seed=SEED, recommended_keep=0.25,
                                       path=files.lora, log=log)
    t_lora = time.time() - t_start - t_base

    # 3. evaluation through the patch (models loaded back from the saved files, as the demo does)
    models = {"base": model.load_trained_model(files.base), "lora": model.load_trained_model(files.base, lora=True)}
    rows = evaluate_all(models, cfg, log)
    t_eval = time.time() - t_start - t_base - t_lora
    summary = summarize(rows, cfg["ratios"])
    # reference line: the edit target vs its own reference (a model that just copies the reference)
    import kornia
    edits = eval_items("edit", cfg["n_eval"])
    summary["edit_identity_psnr"] = round(sum(float(kornia.metrics.psnr(e.refs[0].permute(0, 3, 1, 2),
                                                                        e.target.permute(0, 3, 1, 2), 1.0))
                                              for e in edits) / len(edits), 4)

    result = {
        "schema": "sparse_context.miniature/1",
        "smoke": args.smoke,
        "command": ".venv/bin/python experiments/miniature/run.py " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        "model": {"class": "comfy.ldm.flux.model.Flux via comfy.supported_models.Flux", "flux_kwargs": model.FLUX_KWARGS,
                  "parameters": n_params, "reference_method": "offset", "image_px": tasks.SIZE,
                  "px_per_token": evaluate.STRIDE,
                  "files": cli.file_hashes(out, [files.base.name, files.lora.name, files.config.name])},
        "lora": {"trainer": "sparse_context.training.LoraTrainer", "rank": lora_cfg.rank, "alpha": lora_cfg.alpha,
                 "targets": lora_cfg.targets, "keep_ratios": json.loads(keep.to_json()),
                 "steps": cfg["lora_steps"], "examples_per_step": cfg["lora_accum"], "timestep_sampling": "shifted"},
        "sampling": {"how": "ComfyUI comfy.sample.sample (sc_harness.sampling.sample), one item at a time",
                     "sampler": "euler", "scheduler": "simple", "steps": cfg["sample_steps"], "cfg": 1.0},
        "selectors": {name: {"coverage": s.coverage} for name, s in evaluate.selectors().items()},
        "default_selector": evaluate.DEFAULT_SELECTOR,
        "timing_s": {"train_base": round(t_base, 1), "train_lora": round(t_lora, 1), "evaluate": round(t_eval, 1),
                     "total": round(time.time() - t_start, 1)},
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "torch": torch.__version__, "python": platform.python_version()},
        "losses": {"base": train.thin_curve(base_losses), "lora": train.thin_curve(lora_losses)},
        "results": rows,
        "summary": summary,
    }
    write_results(result, out)
    log(f"done: {out / 'miniature.json'}; checks: {summary['checks']}")
    return result


def write_results(result: dict, out: Path) -> None:
    """``miniature.json`` + ``miniature.png`` in ``out``."""
    from sc_experiment.figure import psnr_vs_keep
    from sc_miniature import plot

    (out / "miniature.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    psnr_vs_keep(result, out / "miniature.png", tasks=("edit", "subject", "multi"), model_titles=plot.MODEL_TITLES,
                 title="Miniature replication", dpi=110)
    print(plot.markdown_table(result), flush=True)


def resummarize(out: Path) -> dict:
    """Recompute the summary and the figure of an earlier run in ``out`` with today's ``DEFAULT_SELECTOR``
    (the measured rows are kept: choosing a default needs no new training)."""
    from sc_miniature.evaluate import DEFAULT_SELECTOR

    result = json.loads((out / "miniature.json").read_text(encoding="utf-8"))
    identity = result["summary"].get("edit_identity_psnr")
    result["default_selector"] = DEFAULT_SELECTOR
    result["summary"] = summarize(result["results"], tuple(result["config"]["ratios"]))
    if identity is not None:
        result["summary"]["edit_identity_psnr"] = identity
    write_results(result, out)
    print(f"re-summarized {out / 'miniature.json'}; checks: {result['summary']['checks']}")
    return result


if __name__ == "__main__":
    if sys.path and Path(sys.path[0]).resolve() == HERE:
        sys.path.pop(0)  # this folder is loaded as the package ``sc_miniature``, never as top-level modules
    main()
