"""Train a drop-robust Sparse Context LoRA from the command line (long runs, checkpoints, resume).

Data: a folder of ``*.safetensors`` examples (``target``, ``ref_0``.., ``context``[, ``pooled``]; see
``training/examples.py``), written by the ComfyUI node "Save Sparse Context Training Example" (VAE-encoded
target + ReferenceLatent conditioning) or by ``training.save_example``.

Example (FLUX.2 klein 9B on one GPU)::

    .venv/bin/python scripts/train_lora.py --model /models/diffusion_models/flux-2-klein-9b.safetensors \\
        --data output/sparse_context_examples --out loras/klein_drop_robust.safetensors \\
        --steps 2000 --rank 16 --lr 1e-4 --checkpoint-every 250

Resume: the same command with ``--resume latest`` (or a checkpoint path). ComfyUI is found through
``--comfyui``, ``$COMFYUI_PATH``, the pack's pinned dev copy, or the ComfyUI this pack is installed in.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from packload import load_pack  # scripts/ is on sys.path when this file runs

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def find_comfyui(given: str | None) -> Path:
    candidates = [given, os.environ.get("COMFYUI_PATH"), REPO / ".comfyui" / "ComfyUI-0.3.75", REPO.parents[1]]
    for c in candidates:
        if c and (Path(c) / "comfy").is_dir() and (Path(c) / "main.py").is_file():
            return Path(c).resolve()
    sys.exit("ComfyUI not found: pass --comfyui /path/to/ComfyUI (the folder with main.py) or set COMFYUI_PATH")


def import_pack():
    """The pack's trainer (the pack is imported as the package ``sparse_context``, see packload)."""
    load_pack()
    import sparse_context.training as training

    return training


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="diffusion model file (.safetensors), as UNETLoader loads it")
    p.add_argument("--data", required=True, help="folder of training example .safetensors files")
    p.add_argument("--out", required=True, help="output LoRA path (.safetensors)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=50, help="linear warm-up steps")
    p.add_argument("--grad-accum", type=int, default=1, help="examples per optimizer step")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=None, help="default: = rank")
    p.add_argument("--targets", default="attention_mlp",
                   help="attention | attention_mlp | image_stream, or comma-separated module globs")
    p.add_argument("--keep-min", type=float, default=0.1)
    p.add_argument("--keep-max", type=float, default=1.0)
    p.add_argument("--dense-share", type=float, default=0.1)
    p.add_argument("--recommended-keep", type=float, default=0.25, help="keep ratio written into the metadata")
    p.add_argument("--timestep-sampling", default="logit_normal", choices=["logit_normal", "uniform", "shifted"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="base model weights / compute dtype")
    p.add_argument("--save-dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--checkpoint-every", type=int, default=250, help="0 = only the final LoRA")
    p.add_argument("--checkpoint-dir", default=None, help="default: <out without suffix>_checkpoints")
    p.add_argument("--resume", default=None, help="checkpoint file, or 'latest' (newest in --checkpoint-dir)")
    p.add_argument("--comfyui", default=None, help="ComfyUI folder (with main.py)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (tests; far too slow for real models)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    comfy_path = find_comfyui(args.comfyui)
    if str(comfy_path) not in sys.path:
        sys.path.insert(0, str(comfy_path))
    import comfy.cli_args

    comfy.cli_args.args.cpu = args.cpu
    import comfy.sd
    import torch

    training = import_pack()
    dtype = getattr(torch, DTYPES[args.dtype])
    examples = training.load_example_folder(args.data)
    print(f"{len(examples)} examples from {args.data}")
    model = comfy.sd.load_diffusion_model(args.model, model_options={"dtype": dtype})
    trainer = training.LoraTrainer(
        model,
        training.LoraConfig(rank=args.rank, alpha=float(args.alpha if args.alpha is not None else args.rank),
                            targets=args.targets),
        training.TrainConfig(steps=args.steps, learning_rate=args.lr, warmup_steps=args.warmup,
                             grad_accumulation=args.grad_accum, seed=args.seed,
                             keep_ratios=training.KeepRatioDistribution(low=args.keep_min, high=args.keep_max,
                                                                        dense_share=args.dense_share),
                             timestep_sampling=args.timestep_sampling, recommended_keep_ratio=args.recommended_keep),
    )
    print(f"{trainer.family_name}: LoRA rank {args.rank} on {len(trainer.lora.deltas)} layers "
          f"({trainer.lora.num_parameters() / 1e6:.1f} M parameters); {trainer.config.keep_ratios.describe()}")
    out = Path(args.out)
    ckpt_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else out.with_name(out.stem + "_checkpoints")
    if args.resume:
        resume = Path(args.resume)
        if args.resume == "latest":
            found = sorted(ckpt_dir.glob("checkpoint_*.safetensors"))
            if not found:
                sys.exit(f"--resume latest: no checkpoint in {ckpt_dir}")
            resume = found[-1]
        trainer.load_checkpoint(resume)
        print(f"resumed from {resume} at step {trainer.step}")
    trainer.fit(examples, checkpoint_every=args.checkpoint_every, checkpoint_dir=ckpt_dir)
    path = trainer.save(out, dtype=getattr(torch, DTYPES[args.save_dtype]))
    print(f"saved {path}: {trainer.metadata().summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
