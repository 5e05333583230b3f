"""Train a drop-robust Sparse Context LoRA from the command line (long runs, validation, checkpoints, resume).

Data (``--data``, and ``--validation`` for held-out examples): a folder of example sub-folders, each with
``target.png`` (the wanted result), ``ref.png`` (or ``ref1.png``, ``ref2.png``, ...) and ``caption.txt``,
and/or ``.safetensors`` examples written by the node "Save Sparse Context Training Example" (already
encoded). Image examples are encoded with the model's VAE (``--vae``) and text encoder(s)
(``--text-encoder``), the files a ComfyUI graph of that model loads; they are unloaded before training.

Example (FLUX.1 Kontext dev on one 24 GB GPU: fp8 base, gradient checkpointing on by default)::

    python scripts/train_lora.py --model models/diffusion_models/flux1-kontext-dev.safetensors --dtype fp8_e4m3fn \\
        --vae models/vae/ae.safetensors --text-encoder models/text_encoders/clip_l.safetensors \\
        models/text_encoders/t5xxl_fp16.safetensors --data my_examples --validation my_held_out \\
        --out loras/kontext_drop_robust.safetensors --steps 2000 --validate-every 100 --checkpoint-every 250

Several GPUs (one LoRA, data-parallel; each process runs its share of every step's ``--grad-accum`` examples)::

    torchrun --nproc_per_node 4 scripts/train_lora.py ... --grad-accum 8

Several machines: torchrun's own rendezvous, the same command on every node (the checkpoint folder on storage every
node reads, for ``--resume``)::

    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 --rdzv_id my_run \
        scripts/train_lora.py ...

Rank 0 alone writes checkpoints, the curves and the LoRA; losses and validation are those of the whole job.

Resume: the same command with ``--resume latest`` (or a checkpoint path), with any number of processes. Output: the LoRA, its curves
(``<out>.curves.png``: loss, and validation PSNR dense vs sparse) and checkpoints. ComfyUI is found through
``--comfyui``, ``$COMFYUI_PATH``, the pack's pinned dev copy, or the ComfyUI this pack is installed in.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from packload import load_pack  # scripts/ is on sys.path when this file runs

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp8_e4m3fn": "float8_e4m3fn",
          "fp8_e5m2": "float8_e5m2"}
CLIP_TYPES = {"flux1": "flux", "flux2": "flux2", "qwen_image": "qwen_image"}  # CLIPLoader's type per family


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
    p.add_argument("--model", required=True, help="diffusion model file (.safetensors), as Load Diffusion Model loads it")
    p.add_argument("--data", required=True, help="folder of training examples (see above)")
    p.add_argument("--out", required=True, help="output LoRA path (.safetensors)")
    p.add_argument("--validation", default=None, help="folder of held-out examples for the validation")
    p.add_argument("--validate-every", type=int, default=100, help="steps between validations (0 = none)")
    p.add_argument("--vae", default=None, help="the model's VAE file (needed for image examples)")
    p.add_argument("--text-encoder", nargs="+", default=None,
                   help="the model's text encoder file(s) (FLUX.1: clip_l and t5xxl; needed for image examples)")
    p.add_argument("--resolution", type=int, default=1024, help="images are scaled to about this many pixels squared")
    p.add_argument("--guidance", type=float, default=2.5, help="FLUX.1 guidance written into encoded examples")
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
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES),
                   help="base model weights (fp8_*: stored in fp8, computed in bf16, as weight_dtype fp8 in ComfyUI)")
    p.add_argument("--lora-dtype", default="fp32", choices=["fp32", "bf16"], help="LoRA parameters while training")
    p.add_argument("--no-gradient-checkpointing", action="store_true",
                   help="keep all activations (faster, far more memory)")
    p.add_argument("--memory-budget", type=float, default=None,
                   help="GiB of device memory training may use (default: the GPU's total memory); a base that does "
                        "not fit is loaded with ComfyUI's training weight offload (0.30+) or refused")
    p.add_argument("--no-weight-offload", action="store_true",
                   help="never offload base weights while training (a base that does not fit is refused)")
    p.add_argument("--save-dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--checkpoint-every", type=int, default=250, help="0 = only the final LoRA")
    p.add_argument("--checkpoint-dir", default=None, help="default: <out without suffix>_checkpoints")
    p.add_argument("--resume", default=None, help="checkpoint file, or 'latest' (newest in --checkpoint-dir)")
    p.add_argument("--comfyui", default=None, help="ComfyUI folder (with main.py)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (tests; far too slow for real models)")
    return p.parse_args(argv)


def comfy_encoder(args, training, family: str):
    """The model's VAE + text encoder(s) as an ``ExampleEncoder`` (loaded only when image examples exist)."""
    if not args.vae or not args.text_encoder:
        sys.exit("image examples need the model's VAE and text encoder: pass --vae and --text-encoder")
    import comfy.sd
    import comfy.utils
    import folder_paths

    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(args.vae, safe_load=True))
    clip_type = getattr(comfy.sd.CLIPType, CLIP_TYPES[family].upper(), comfy.sd.CLIPType.STABLE_DIFFUSION)
    clip = comfy.sd.load_clip(ckpt_paths=list(args.text_encoder), clip_type=clip_type,
                              embedding_directory=folder_paths.get_folder_paths("embeddings"))
    return training.ComfyEncoder(vae, clip, family, guidance=args.guidance)


def load_examples(args, training, family: str, make_encoder) -> tuple[list, list]:
    """(training examples, validation examples); image examples are encoded, then the encoder is released."""
    folders = [Path(args.data)] + ([Path(args.validation)] if args.validation else [])
    needs_encoder = any(training.find_image_examples(f) for f in folders if f.is_dir())
    encoder = make_encoder(family) if needs_encoder else None
    try:
        train = training.load_example_folder(args.data, encoder, args.resolution)
        held_out = training.load_example_folder(args.validation, encoder, args.resolution) if args.validation else []
    except ValueError as err:
        sys.exit(str(err))
    del encoder
    import comfy.model_management as mm

    mm.cleanup_models_gc()  # the VAE and text encoder are unreferenced now: their memory goes back
    mm.soft_empty_cache()
    return train, held_out


def train(args, training, model, make_encoder) -> Path:
    """Everything after loading the diffusion model: data, trainer, resume, fit, outputs."""
    import torch

    group = training.distributed.init_from_env(model.load_device)
    say = print if group.is_main else (lambda *a, **k: None)
    family = training.family.base_family(model)[0]
    examples, held_out = load_examples(args, training, family, make_encoder)
    say(f"{len(examples)} training examples from {args.data}"
        + (f", {len(held_out)} validation examples from {args.validation}" if held_out else ""))
    if group.world_size > 1:
        say(f"{group.world_size} processes: {args.grad_accum} examples per step in all "
            f"({args.grad_accum / group.world_size:g} per process)")
        if args.grad_accum < group.world_size:
            say(f"warning: --grad-accum {args.grad_accum} < {group.world_size} processes: some processes idle; "
                f"use --grad-accum {group.world_size} or more")
    trainer = training.LoraTrainer(
        model,
        training.LoraConfig(rank=args.rank, alpha=float(args.alpha if args.alpha is not None else args.rank),
                            targets=args.targets),
        training.TrainConfig(steps=args.steps, learning_rate=args.lr, warmup_steps=args.warmup,
                             grad_accumulation=args.grad_accum, seed=args.seed,
                             keep_ratios=training.KeepRatioDistribution(low=args.keep_min, high=args.keep_max,
                                                                        dense_share=args.dense_share),
                             timestep_sampling=args.timestep_sampling, recommended_keep_ratio=args.recommended_keep,
                             lora_dtype=getattr(torch, DTYPES[args.lora_dtype]),
                             gradient_checkpointing=not args.no_gradient_checkpointing,
                             memory_budget=None if args.memory_budget is None else args.memory_budget * 2**30,
                             weight_offload=not args.no_weight_offload),
    )
    say(f"{trainer.family_name}: LoRA rank {args.rank} on {len(trainer.lora.deltas)} layers "
          f"({trainer.lora.num_parameters() / 1e6:.1f} M parameters); {trainer.config.keep_ratios.describe()}; "
          f"gradient checkpointing {'on' if trainer.config.gradient_checkpointing else 'off'}")
    out = Path(args.out)
    ckpt_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else out.with_name(out.stem + "_checkpoints")
    if args.resume:
        resume = training.latest_checkpoint(ckpt_dir) if args.resume == "latest" else Path(args.resume)
        if resume is None:
            sys.exit(f"--resume latest: no checkpoint in {ckpt_dir}")
        trainer.load_checkpoint(resume)
        say(f"resumed from {resume} at step {trainer.step}")
    trainer.fit(examples, checkpoint_every=args.checkpoint_every, checkpoint_dir=ckpt_dir,
                validation=held_out, validate_every=args.validate_every)
    if not group.is_main:
        return out
    path = trainer.save(out, dtype=getattr(torch, DTYPES[args.save_dtype]))
    from sparse_context.training.plot import curves_image

    curves = out.with_name(out.stem + ".curves.png")
    curves_image(trainer.losses, trainer.validation).save(curves)
    (out.with_name(out.stem + ".log.json")).write_text(json.dumps(
        {"losses": trainer.losses, "validation": trainer.validation}, indent=1), encoding="utf-8")
    print(f"saved {path} (curves: {curves.name}): {trainer.metadata().summary()}")
    if trainer.validation:
        first, last = trainer.validation[0], trainer.validation[-1]
        print(f"validation one-step x0 PSNR: dense {first['dense_psnr']:.2f} -> {last['dense_psnr']:.2f} dB, "
              f"keep {last['keep']:g} {first['sparse_psnr']:.2f} -> {last['sparse_psnr']:.2f} dB")
    return path


def run(args, training, model, make_encoder) -> int:
    """``train`` as a process of a job: a failed step (this rank's or another's) ends it with its one-line message
    and exit status 1 on every rank (the newest checkpoint stays the one to ``--resume`` from)."""
    try:
        train(args, training, model, make_encoder)
    except (training.distributed.StepFailed, training.distributed.RankFailed) as err:
        print(f"train_lora.py: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        training.distributed.shutdown()
    return 0


def pin_cuda_device_for_rank() -> None:
    """Before CUDA starts: this process sees only its local rank's GPU (what ComfyUI's own ``--cuda-device``
    does), so ComfyUI's model management uses that one."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    os.environ["CUDA_VISIBLE_DEVICES"] = visible[local] if visible else str(local)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    comfy_path = find_comfyui(args.comfyui)
    if str(comfy_path) not in sys.path:
        sys.path.insert(0, str(comfy_path))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not args.cpu:
        pin_cuda_device_for_rank()
    import comfy.cli_args

    comfy.cli_args.args.cpu = args.cpu
    import comfy.sd
    import torch

    training = import_pack()
    model = comfy.sd.load_diffusion_model(args.model, model_options={"dtype": getattr(torch, DTYPES[args.dtype])})
    return run(args, training, model, lambda family: comfy_encoder(args, training, family))


if __name__ == "__main__":
    sys.exit(main())
