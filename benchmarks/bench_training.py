"""Peak memory (and time) of one drop-robust LoRA training step: dense vs keep 0.25, gradient checkpointing
off / on, base weights in the compute dtype vs fp8.

Usage (run from anywhere; ``-P`` keeps the script's folder off sys.path):
    .venv/bin/python -P benchmarks/bench_training.py --json docs/bench_training_cpu.json       # CPU, ~5 min
    .venv/bin/python -P benchmarks/bench_training.py --world-size 1 2 --json docs/bench_training_dist_cpu.json
    python -P benchmarks/bench_training.py --device cuda --config kontext12b --json bench_training_kontext.json
    python -P benchmarks/bench_training.py --device cuda --config klein9b --json bench_training_klein.json

The model is ComfyUI's own ``Flux`` class built through the host's model detection (FLUX.1 Kontext or
FLUX.2 shaped), seeded random weights; one example = target + one reference of the same size, with text;
LoRA rank 16 on attention + MLP (``attention_mlp``), AdamW, trained by ``training.LoraTrainer`` exactly as
the node and the CLI train. fp8 = weights stored as ``float8_e4m3fn`` and cast per layer to the compute
dtype (what ComfyUI's ``weight_dtype`` fp8_e4m3fn does). Each cell runs ``--steps`` steps from the same seed;
the first one creates the optimizer state, the others are measured (memory: the largest; time: the fastest,
on the CPU from the steps after the one whose memory is counted).

Memory of a step:
* CUDA: ``torch.cuda.max_memory_allocated`` during the step (``peak_mb``) minus the memory allocated before
  it (weights, LoRA, optimizer state): ``act_mb``.
* ``estimate_mb``: what the trainer tells ComfyUI the step needs besides the weights
  (``LoraTrainer.training_memory``), to compare with ``act_mb``.
* CPU: PyTorch keeps no allocator statistics for the CPU, and the process's resident high-water mark
  counts what the C allocator keeps cached after earlier steps. So every storage an operator ALLOCATES
  during the step is counted from the op that creates it until it is freed (a ``TorchDispatchMode`` sees
  every op, the backward and the recompute included; a weak reference on each storage sees it freed); views
  and in-place results of existing tensors are not new memory. The high-water mark of that count is
  ``act_mb``: activations, saved tensors, gradients, per-layer weight casts and temporaries. ``peak_mb``
  adds the weights. (The resident-set high-water mark is no measure here: after the first step the C
  allocator serves a step from memory it kept, so VmHWM barely moves.)
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import pathlib
import platform
import resource
import socket
import sys
import time
import weakref
from dataclasses import asdict, dataclass

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))  # for packload only
from packload import load_pack, load_testpack  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
PINNED_COMFYUI = ROOT / ".comfyui" / "ComfyUI-0.3.75"


@dataclass(frozen=True)
class Size:
    """A FLUX-shaped model and its 1-reference example (``grid`` tokens per side for target and reference)."""

    image_model: str  # "flux" (FLUX.1 / Kontext) or "flux2" (FLUX.2 / klein)
    hidden: int
    heads: int
    depth: int
    single: int
    context_dim: int
    text_tokens: int
    grid: int


CONFIGS = {
    # CPU: a small Kontext-shaped model with enough blocks for checkpointing to matter.
    "kontext-small": Size("flux", hidden=128, heads=2, depth=4, single=8, context_dim=64, text_tokens=32, grid=24),
    "klein-small": Size("flux2", hidden=128, heads=2, depth=2, single=6, context_dim=64, text_tokens=32, grid=24),
    # FLUX.1 Kontext dev (12B): 19 double + 38 single blocks, hidden 3072 = 24 heads x 128, T5-XXL text (4096);
    # 1024 px target and reference = 64x64 tokens each.
    "kontext12b": Size("flux", hidden=3072, heads=24, depth=19, single=38, context_dim=4096, text_tokens=512, grid=64),
    # FLUX.2 [klein] 9B: 8 double + 24 single, hidden 4096 = 32 x 128, Qwen3-8B text width 12288 (as bench.py).
    "klein9b": Size("flux2", hidden=4096, heads=32, depth=8, single=24, context_dim=12288, text_tokens=512, grid=64),
}


def import_comfy(device: str) -> None:
    path = pathlib.Path(os.environ.get("COMFYUI_PATH") or PINNED_COMFYUI).resolve()
    if not (path / "comfy").is_dir():
        raise SystemExit(f"no ComfyUI at {path}: run `bash scripts/setup.sh` or set COMFYUI_PATH")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    import comfy.cli_args

    comfy.cli_args.args.use_pytorch_cross_attention = True
    comfy.cli_args.args.cpu = device == "cpu"
    comfy.cli_args.args.disable_api_nodes = True
    import comfy.model_management  # noqa: F401


def build_model(size: Size, device, compute_dtype, fp8: bool, seed: int = 0):
    """A ModelPatcher around ComfyUI's ``Flux`` of ``size``; weights made on ``device``, seeded."""
    import comfy.model_patcher
    import torch

    head = size.hidden // size.heads
    sizes = dict(image_model=size.image_model, in_channels=16 if size.image_model == "flux" else 128,
                 context_in_dim=size.context_dim, hidden_size=size.hidden, num_heads=size.heads, depth=size.depth,
                 depth_single_blocks=size.single, patch_size=2 if size.image_model == "flux" else 1)
    if size.image_model == "flux":
        sizes.update(vec_in_dim=768 if size.hidden >= 1024 else 32, guidance_embed=True,
                     axes_dim=[head // 8, 7 * head // 16, 7 * head // 16])
    else:
        sizes.update(axes_dim=[head // 4] * 4)
    config = load_testpack().host_config.config_for_sizes(sizes, compute_dtype)
    if fp8:
        config.set_inference_dtype(torch.float8_e4m3fn, compute_dtype)
    model = config.get_model({}, "", device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.diffusion_model.named_parameters(), key=lambda kv: kv[0]):
            if p.ndim <= 1:
                base = 1.0 if ("norm" in name or name.endswith("scale")) else 0.0
                v = base + 0.02 * torch.randn(p.shape, generator=gen, device=device, dtype=compute_dtype)
            else:
                v = torch.randn(p.shape, generator=gen, device=device, dtype=compute_dtype) / math.sqrt(p.shape[-1])
            p.copy_(v)
            p.requires_grad_(False)  # as newer ComfyUI loads them; 0.3.75's ops leave it on
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def example(size: Size, seed: int = 1):
    import sparse_context.training as tr
    import torch

    gen = torch.Generator().manual_seed(seed)
    if size.image_model == "flux":  # 16 channels at 1/8, patch 2: a token = 2x2 latent cells
        shape, pooled = (1, 16, 2 * size.grid, 2 * size.grid), torch.randn((1, 768 if size.hidden >= 1024 else 32), generator=gen)
    else:
        shape, pooled = (1, 128, size.grid, size.grid), None
    target, ref = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    context = torch.randn((1, size.text_tokens, size.context_dim), generator=gen)
    return tr.TrainingExample(target, [ref], context, pooled, guidance=2.5 if size.image_model == "flux" else None)


class AllocatedBytes:
    """Context manager: high-water mark of the bytes of storages allocated by operators inside it (CPU)."""

    def __init__(self, device_type: str = "cpu"):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._outputs(args, kwargs, out)
                return out

        self.device_type = device_type
        self.mode = Mode()
        self.live = self.peak = 0
        self.tracked: set[int] = set()

    def _outputs(self, args, kwargs, out) -> None:
        import torch
        from torch.utils._pytree import tree_leaves

        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != self.device_type:
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in inputs or key in self.tracked:  # a view or in-place result, or already counted
                continue
            size = storage.nbytes()
            self.tracked.add(key)
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key, size)

    def _freed(self, key: int, size: int) -> None:
        self.tracked.discard(key)
        self.live -= size

    def __enter__(self):
        self.live = self.peak = 0
        self.tracked.clear()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def measured_step(trainer, examples, device, memory: bool) -> dict:
    """One training step with its time and, if ``memory``, its memory (see the module docstring). On the CPU
    the allocation counter slows the step down, so its time is not reported."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        loss = trainer.train_step(examples)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated()
        return {"loss": loss, "s": seconds, "peak_mb": peak / 2**20, "act_mb": (peak - before) / 2**20}
    if not memory:
        start = time.perf_counter()
        loss = trainer.train_step(examples)
        return {"loss": loss, "s": time.perf_counter() - start}
    with AllocatedBytes("cpu") as counter:
        loss = trainer.train_step(examples)
    return {"loss": loss, "act_mb": counter.peak / 2**20}


def run_cell(size: Size, device, compute_dtype, keep: float, checkpointing: bool, fp8: bool, steps: int) -> dict:
    import sparse_context.training as tr
    import torch

    model = build_model(size, device, compute_dtype, fp8)
    weights = sum(t.numel() * t.element_size() for t in model.model.diffusion_model.state_dict().values())
    keeps = tr.DENSE_ONLY if keep >= 1.0 else tr.KeepRatioDistribution(kind="fixed", low=keep, dense_share=0.0)
    trainer = tr.LoraTrainer(model, tr.LoraConfig(rank=16, alpha=16.0, targets="attention_mlp"),
                             tr.TrainConfig(steps=steps, learning_rate=1e-4, keep_ratios=keeps, seed=0,
                                            gradient_checkpointing=checkpointing))
    ex = [example(size)]
    estimate = trainer.training_memory(ex[0])
    trainer.memory_required = float(estimate.total)  # what the session asks core for (as fit sets it)
    rows = []
    try:
        with trainer.session():
            rows.append({"loss": trainer.train_step(ex)})  # creates the optimizer state
            rows += [measured_step(trainer, ex, device, memory=i == 0) for i in range(steps - 1)]
    except torch.cuda.OutOfMemoryError as err:
        return {"keep": keep, "checkpointing": checkpointing, "fp8": fp8, "oom": str(err).split("\n")[0]}
    finally:
        del trainer, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    with_memory = [r for r in rows if "act_mb" in r]
    timed = [r["s"] for r in rows if "s" in r]
    cell = {"keep": keep, "checkpointing": checkpointing, "fp8": fp8, "weights_mb": weights / 2**20,
            "act_mb": max(r["act_mb"] for r in with_memory),
            "peak_mb": max(r.get("peak_mb", weights / 2**20 + r["act_mb"]) for r in with_memory),
            "s_per_step": min(timed) if timed else None, "losses": [r["loss"] for r in rows],
            "estimate_mb": estimate.total / 2**20,
            "estimate_parts_mb": {k: v / 2**20 for k, v in asdict(estimate).items() if k != "tokens"},
            "tokens": estimate.tokens}
    cell["estimate_over_act"] = cell["estimate_mb"] / cell["act_mb"]
    return cell


def _rank_main(rank: int, world_size: int, port: int, args, queue) -> None:
    """One process of a data-parallel run (Gloo on the CPU): ``args.steps`` steps of ``args.batch`` examples in all."""
    import_comfy("cpu")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(args.threads)  # per process: one thread each measures the processes, not thread contention
    load_pack()
    import sparse_context.training as tr

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if world_size > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        size = CONFIGS[args.config]
        device = torch.device("cpu")
        model = build_model(size, device, torch.float32, fp8=False)
        trainer = tr.LoraTrainer(model, tr.LoraConfig(rank=16, alpha=16.0, targets="attention_mlp"),
                                 tr.TrainConfig(steps=args.steps, grad_accumulation=args.batch, seed=0,
                                                keep_ratios=tr.KeepRatioDistribution(kind="fixed", low=0.25,
                                                                                     dense_share=0.0)))
        examples = [example(size, seed=1 + i) for i in range(args.batch)]
        with trainer.session():
            trainer.train_step(examples)  # creates the optimizer state; not timed
            with AllocatedBytes("cpu") as counter:
                trainer.train_step(examples)
            if world_size > 1:
                dist.barrier()
            start = time.perf_counter()
            for _ in range(args.steps - 2):
                trainer.train_step(examples)
            seconds = time.perf_counter() - start
        queue.put({"rank": rank, "seconds": seconds, "timed_steps": args.steps - 2, "act_mb": counter.peak / 2**20,
                   "weights_mb": sum(t.numel() * t.element_size()
                                     for t in model.model.diffusion_model.state_dict().values()) / 2**20,
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "losses": trainer.losses, "threads": torch.get_num_threads()})
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def run_world(args, world_size: int) -> dict:
    """A data-parallel run on ``world_size`` CPU processes (each its own interpreter, as torchrun starts them)."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    ranks = sorted((queue.get(timeout=1800) for _ in procs), key=lambda r: r["rank"])
    for p in procs:
        p.join()
    seconds = max(r["seconds"] for r in ranks)  # the step ends when the slowest rank ends it
    steps = ranks[0]["timed_steps"]
    return {"world_size": world_size, "examples_per_step": args.batch, "threads_per_rank": ranks[0]["threads"],
            "steps_per_s": steps / seconds, "examples_per_s": steps * args.batch / seconds,
            "peak_mb_per_rank": [r["weights_mb"] + r["act_mb"] for r in ranks],
            "act_mb_per_rank": [r["act_mb"] for r in ranks], "peak_rss_mb_per_rank": [r["peak_rss_mb"] for r in ranks],
            "losses": ranks[0]["losses"]}


def run_distributed(args) -> dict:
    size = CONFIGS[args.config]
    print(f"model {args.config}, data-parallel on the CPU (Gloo): {args.batch} examples per step (keep 0.25), "
          f"{args.steps} steps per run ({args.steps - 2} timed), {args.threads} thread(s) per process", flush=True)
    runs = []
    for n in args.world_size:
        r = run_world(args, n)
        runs.append(r)
        print(f"  world size {n}: {r['steps_per_s']:.3f} steps/s, {r['examples_per_s']:.3f} examples/s, peak per rank "
              f"{', '.join(f'{v:.1f}' for v in r['peak_mb_per_rank'])} MiB (weights + step allocations; resident "
              f"high-water {', '.join(f'{v:.0f}' for v in r['peak_rss_mb_per_rank'])} MiB), "
              f"losses {', '.join(f'{v:.6f}' for v in r['losses'])}", flush=True)
    info = {"config": args.config, "size": asdict(size), "device": "cpu", "backend": "gloo", "steps": args.steps,
            "examples_per_step": args.batch, "keep": 0.25, "torch": __import__("torch").__version__,
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "memory": "peak_mb = weights + bytes of storages allocated by operators during one step (TorchDispatchMode); "
                      "peak_rss_mb = the process's resident high-water mark",
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    info["comfyui"] = importlib.import_module("comfyui_version").__version__
    return {"meta": info, "runs": runs}


def run(args) -> dict:
    import torch

    device = torch.device(args.device)
    compute = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    size = CONFIGS[args.config]
    tokens = size.text_tokens + 2 * size.grid * size.grid
    print(f"model {args.config}: {size.image_model}, hidden {size.hidden}, {size.depth}+{size.single} blocks; "
          f"text {size.text_tokens} + target {size.grid}x{size.grid} + 1 reference {size.grid}x{size.grid} "
          f"= {tokens} tokens dense; {device}, compute {args.dtype}; {args.steps} steps per cell", flush=True)
    cells = []
    for fp8 in (False, True):
        for keep in (1.0, 0.25):
            for checkpointing in (False, True):
                cell = run_cell(size, device, compute, keep, checkpointing, fp8, args.steps)
                cells.append(cell)
                if "oom" in cell:
                    print(f"  fp8 {fp8!s:5} keep {keep:<4} checkpointing {checkpointing!s:5}: out of memory", flush=True)
                    continue
                print(f"  fp8 {fp8!s:5} keep {keep:<4} checkpointing {checkpointing!s:5}: act {cell['act_mb']:9.1f} MiB"
                      f"  peak {cell['peak_mb']:9.1f} MiB  estimate {cell['estimate_mb']:9.1f} MiB "
                      f"({cell['estimate_over_act']:.2f}x act)  {cell['s_per_step'] or float('nan'):.2f} s/step  "
                      f"losses {', '.join(f'{v:.6f}' for v in cell['losses'])}", flush=True)
                if args.json:
                    write_json(args.json, {"meta": dict(meta(args, size, device), partial=True), "cells": cells,
                                           "summary": summarize(cells)})
    return {"meta": meta(args, size, device), "cells": cells, "summary": summarize(cells)}


def summarize(cells: list[dict]) -> list[dict]:
    """Per (fp8, keep): activation memory off / on, the ratio, and whether the losses agree to 1e-5 relative."""
    out = []
    for fp8 in (False, True):
        for keep in (1.0, 0.25):
            pair = {c["checkpointing"]: c for c in cells if c["fp8"] == fp8 and c["keep"] == keep and "oom" not in c}
            if len(pair) != 2:
                continue
            off, on = pair[False], pair[True]
            rel = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(off["losses"], on["losses"], strict=True))
            out.append({"fp8": fp8, "keep": keep, "act_mb_off": off["act_mb"], "act_mb_on": on["act_mb"],
                        "act_ratio": off["act_mb"] / on["act_mb"], "max_rel_loss_diff": rel,
                        "equal_losses": rel <= 1e-5, "s_off": off["s_per_step"], "s_on": on["s_per_step"]})
    return out


def write_json(path: pathlib.Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


def meta(args, size: Size, device) -> dict:
    import torch

    info = {"config": args.config, "size": asdict(size), "device": str(device), "compute_dtype": args.dtype,
            "steps_per_cell": args.steps, "lora": "rank 16, alpha 16, attention_mlp, AdamW lr 1e-4, float32",
            "reference_tokens": size.grid * size.grid, "attention": "pytorch sdpa", "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "memory": ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                       else "bytes of storages allocated by operators during the step (TorchDispatchMode)"),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    info["gpu"] = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    info["comfyui"] = importlib.import_module("comfyui_version").__version__  # ComfyUI's root is on sys.path
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--config", default=None, choices=list(CONFIGS),
                    help="default: kontext-small on the CPU, kontext12b on a GPU")
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="compute dtype (default: fp32 CPU, bf16 GPU)")
    ap.add_argument("--steps", type=int, default=5, help="steps per cell (>= 3; the first is not measured)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (per process with --world-size; default 2, "
                    "with --world-size 1)")
    ap.add_argument("--json", type=pathlib.Path, default=None)
    ap.add_argument("--world-size", type=int, nargs="+", default=None,
                    help="data-parallel throughput instead: one run per world size (CPU processes, Gloo)")
    ap.add_argument("--batch", type=int, default=4, help="examples per step in all (with --world-size)")
    args = ap.parse_args(argv)
    args.config = args.config or ("kontext-small" if args.device == "cpu" else "kontext12b")
    args.dtype = args.dtype or ("fp32" if args.device == "cpu" else "bf16")
    import_comfy(args.device)
    import torch

    args.threads = args.threads or (1 if args.world_size else 2)
    if args.world_size:
        if args.device != "cpu" or args.steps < 3:
            raise SystemExit("--world-size: CPU processes (Gloo) and --steps >= 3")
        result = run_distributed(args)
        if args.json:
            write_json(args.json, result)
        return 0
    torch.set_num_threads(args.threads)
    load_pack()

    result = run(args)
    for s in result["summary"]:
        print(f"fp8 {s['fp8']!s:5} keep {s['keep']:<4}: checkpointing cuts activation memory {s['act_ratio']:.2f}x "
              f"({s['act_mb_off']:.1f} -> {s['act_mb_on']:.1f} MiB), {s['s_off']:.2f} -> {s['s_on']:.2f} s/step; "
              f"losses {'equal' if s['equal_losses'] else 'DIFFER'} (max rel diff {s['max_rel_loss_diff']:.1e})")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
