"""Whole-forward time of a FLUX.2-shaped ComfyUI model with dense vs sparse references.

Usage (run from anywhere; ``-P`` keeps the script's folder off sys.path):
    .venv/bin/python -P benchmarks/bench.py --quick --json docs/bench_cpu.json      # ~2 min, 2 CPU cores
    .venv/bin/python -P benchmarks/bench.py                                        # "mid" model, CPU
    python -P benchmarks/bench.py --device cuda --json bench_gpu.json   # klein9b size, bf16: 74 s on an H200

The model is ComfyUI's own ``comfy.ldm.flux.model.Flux`` built through ``supported_models.Flux2`` (as a
loaded checkpoint is), with seeded random weights created directly on the target device and dtype.
Attention is PyTorch SDPA (``--use-pytorch-cross-attention``). Per number of references R and keep
ratio, one cell records the median forward time (warmup, then N timed repeats, interleaved across
the cell's variants so drift on a shared machine hits all of them alike) of:
    dense   the unpatched model with R full references;
    sparse  the model patched by ``apply_sparse_context`` (rule "grid", bucket=1 so the kept count is
            exactly round(keep * tokens));
    ideal   the unpatched model with each reference cropped to the kept token count (the best a token
            dropper can do; at keep 1.0 it is the dense run);
    noref   the unpatched model without references (the ceiling of any reference speed-up).
With ``--cache``, each cell also times the pack's reference cache on top of dropping (``cache`` modes
reference_only and first_step): ``cache_first_s`` = the first call of a run (reference_only: the fill forward of
the kept references + a cached step; first_step: a sparse step that records), ``cache_sparse_s`` = every later
(cached) step, ``cache_mib`` = the cached keys/values, and whole runs of 4 and 28 steps against dense
(``run4_speedup``, ``run28_speedup``: first call + the cached steps). Top-level fields are reference_only's;
``first_step`` holds the same fields for that mode.
With ``--kv-cache`` (hosts with core's Flux KV Cache node, ComfyUI 0.30+), each cell also times a cached step
(the cache filled by the warm-up call, as in every sampling step after the first):
    kv_dense   core's Flux KV Cache on the dense model (cache only);
    kv_sparse  Apply Sparse Context, then core's Flux KV Cache (drop + cache: only kept tokens are cached).
With ``--compile [BACKEND]`` (default inductor on CUDA, aot_eager on the CPU), each cell also times the dense
and the sparse model compiled through core's own wrapper (``set_torch_compile_wrapper``, what the TorchCompileModel
node does), called as a sampling step calls them (``BaseModel.apply_model``): ``compiled_dense_s``,
``compiled_sparse_s``, ``compile_first_call_s`` (the first call of each: tracing + compiling) and the graphs and
graph breaks dynamo reported. Every setting compiles static graphs (``automatic_dynamic_shapes`` off), as a
user running one setting gets them; dynamo's caches are reset per reference count.
Peak memory (``peak_mem_mb``): CUDA ``max_memory_allocated`` during one forward (dense, sparse) or one short run
(each cache mode: the first call and two cached steps, so the cache it holds is counted); on the CPU the peak of
the tensor memory allocated during the same calls (torch's profiler), which leaves out what was allocated
before (weights, inputs). ``act`` = the peak minus the memory allocated before the call.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))  # for packload only
from packload import load_harness, load_pack  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
PINNED_COMFYUI = ROOT / ".comfyui" / "ComfyUI-0.3.75"


@dataclass(frozen=True)
class ModelSize:
    """A FLUX.2-shaped size: hidden = heads * sum(axes_dim); 128 latent channels, patch 1."""

    hidden: int
    heads: int
    depth: int  # double-stream blocks
    single: int  # single-stream blocks
    context_dim: int  # text-encoder width fed to txt_in
    text_tokens: int
    grid: int  # target and each reference: grid x grid tokens (1 token = 16x16 pixels)


CONFIGS = {
    # CPU sizes. "small" is what --quick runs on a 2-core machine.
    "small": ModelSize(hidden=256, heads=4, depth=1, single=2, context_dim=256, text_tokens=64, grid=32),
    "mid": ModelSize(hidden=512, heads=8, depth=2, single=4, context_dim=512, text_tokens=128, grid=32),
    # FLUX.2 [klein] 9B: 8 double + 24 single blocks, hidden 4096 = 32 heads x 128, Qwen3-8B text width
    # 12288 (sizes from InvokeAI's public FLUX.2 presets); 1024x1024 target and references = 64x64 tokens.
    "klein9b": ModelSize(hidden=4096, heads=32, depth=8, single=24, context_dim=12288, text_tokens=512, grid=64),
}
KEEPS = (1.0, 0.5, 0.25, 0.1)
REFS = (1, 2, 4)




def import_comfy(device: str) -> pathlib.Path:
    """Put ComfyUI ($COMFYUI_PATH or the pinned copy) on sys.path with SDPA attention, then import it."""
    path = pathlib.Path(os.environ.get("COMFYUI_PATH") or PINNED_COMFYUI).resolve()
    if not (path / "comfy").is_dir():
        raise SystemExit(f"no ComfyUI at {path}: run `bash scripts/setup.sh` or set COMFYUI_PATH")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    import comfy.cli_args

    comfy.cli_args.args.use_pytorch_cross_attention = True  # = --use-pytorch-cross-attention
    comfy.cli_args.args.cpu = device == "cpu"
    comfy.cli_args.args.disable_api_nodes = True
    import comfy.model_management  # noqa: F401  (initialised with the flags above)

    return path


def build_model(size: ModelSize, device, dtype, seed: int = 0):
    """A ComfyUI ModelPatcher around a FLUX.2-shaped ``Flux`` with seeded weights made on ``device``."""
    import comfy.model_patcher
    import torch
    from packload import load_testpack

    head_dim = size.hidden // size.heads
    # FLUX.2's structure (theta, modulation, biases, text ids, ...) from this ComfyUI's own model detection
    config = load_testpack().host_config.config_for_sizes(dict(
        image_model="flux2", in_channels=128, context_in_dim=size.context_dim, hidden_size=size.hidden,
        num_heads=size.heads, depth=size.depth, depth_single_blocks=size.single, axes_dim=[head_dim // 4] * 4,
        patch_size=1,
    ), dtype)
    model = config.get_model({}, "", device=device)  # disable_weight_init ops: empty tensors, no CPU copy
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.diffusion_model.named_parameters(), key=lambda kv: kv[0]):
            if p.ndim == 1:  # norms/scales around 1, the rest around 0
                base = 1.0 if ("norm" in name or name.endswith("scale")) else 0.0
                p.copy_(base + 0.02 * torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype))
            else:
                p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype) / math.sqrt(p.shape[-1]))
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def crop_to(latent, k: int):
    """A reference latent (B, C, h, w) cut to exactly ``k`` tokens: the most square r x (k / r) block."""
    if k == latent.shape[-2] * latent.shape[-1]:
        return latent
    r = max(d for d in range(1, int(math.isqrt(k)) + 1) if k % d == 0)
    c = k // r
    if r <= latent.shape[-2] and c <= latent.shape[-1]:
        return latent[..., :r, :c]
    return latent.flatten(-2)[..., :k].unsqueeze(-2)  # (B, C, 1, k): same tokens, one row


class Timer:
    def __init__(self, device):
        import torch

        self.torch = torch
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def __call__(self, fn) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0


def peak_memory_mb(fn, device) -> tuple[float, float]:
    """(peak, peak minus before) in MiB of the tensor memory allocated over one call of ``fn``: CUDA's
    ``max_memory_allocated``; on the CPU, the live bytes of the allocations and frees torch's profiler records
    during the call (before = 0: memory allocated earlier, such as the weights, is not counted)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return peak / 2**20, (peak - before) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                            if e.name() == "[memory]"):
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20, peak / 2**20


class Bench:
    """Forward calls of one base model, dense or patched, on fixed seeded inputs."""

    def __init__(self, size: ModelSize, device, dtype, seed: int = 0):
        import torch

        self.size, self.device, self.dtype = size, device, dtype
        self.base = build_model(size, device, dtype, seed)
        gen = torch.Generator(device=device).manual_seed(seed + 1)
        g = size.grid

        def rnd(*shape):
            return torch.randn(shape, generator=gen, device=device, dtype=dtype)

        self.x = rnd(1, 128, g, g)
        self.refs = [rnd(1, 128, g, g) for _ in range(max(REFS))]
        self.context = rnd(1, size.text_tokens, size.context_dim)
        self.timestep = torch.full((1,), 0.6, device=device, dtype=dtype)
        self.timer = Timer(device)
        self._patched: dict[float, object] = {}
        self._runs: dict[int, tuple] = {}

    def run_for(self, model, fresh: bool = False):
        """The ``SparseRun`` that the calls of a patched ``model`` share (each benchmark variant is one sampling
        run: planned once, like a sampler's steps), or a fresh one; None for an unpatched model."""
        from sparse_context.sparse_attention import PATCH_KEY

        patch = model.model_options.get("transformer_options", {}).get(PATCH_KEY)
        if patch is None:
            return None
        if fresh or id(model) not in self._runs:
            self._runs[id(model)] = (model, patch.new_run())  # the model is kept alive with its id
        return self._runs[id(model)][1]

    def options(self, model, base: dict, run=None) -> dict:
        """A forward's transformer_options: ``base`` and the model's run."""
        from sparse_context.sparse_attention import RUN_KEY

        options = dict(base)
        run = run if run is not None else self.run_for(model)
        if run is not None:
            options[RUN_KEY] = run
        return options

    def patched(self, keep: float):
        from sparse_context.selectors import Budget
        from sparse_context.sparse_attention import SparseContextConfig, apply_sparse_context

        if keep not in self._patched:
            cfg = SparseContextConfig(budget=Budget(mode="ratio", ratio=keep), rule="grid", bucket=1)
            self._patched[keep] = apply_sparse_context(self.base, cfg)
        return self._patched[keep]

    def core_cached(self, model):
        """A fresh clone of ``model`` with core's Flux KV Cache (its cache starts empty), or None on older hosts."""
        try:
            from comfy_extras.nodes_flux import FluxKVCache
        except ImportError:
            return None
        return FluxKVCache.execute(model).result[0]

    def cached(self, keep: float, mode: str):
        """A fresh model with the pack's reference cache in ``mode`` (its own empty store and run)."""
        from sparse_context.selectors import Budget
        from sparse_context.sparse_attention import SparseContextConfig, apply_sparse_context

        cfg = SparseContextConfig(budget=Budget(mode="ratio", ratio=keep), rule="grid", bucket=1, cache=mode)
        return apply_sparse_context(self.base, cfg)

    def cache_cell(self, keep: float, mode: str, refs: list, repeats: int) -> dict:
        """(first call, median cached step, cache MiB, peak memory of a run) of ``mode``: each repeat is a fresh
        run (a benchmark run has no model identity, so it never uses the cross-run store)."""
        model = self.cached(keep, mode)
        first, steady, report = [], [], {}
        for _ in range(repeats + 1):  # the first repeat warms up
            run = self.run_for(model, fresh=True)
            first.append(self.call(model, refs, run)[0])
            for _ in range(2):
                seconds, report = self.call(model, refs, run)
                steady.append(seconds)
        run = self.run_for(model, fresh=True)
        peak, act = peak_memory_mb(lambda: [self.forward(model, refs, run) for _ in range(3)], self.device)
        cache = (report or {}).get("cache", {})
        return {"first_s": statistics.median(first[1:]), "step_s": statistics.median(steady[2:]),
                "mib": cache.get("mib"), "report": report, "peak_mb": peak, "act_mb": act}

    def compiled(self, model, backend: str):
        """A clone of ``model`` compiled through core's own wrapper (what the TorchCompileModel node does)."""
        from comfy_api.torch_helpers import set_torch_compile_wrapper

        m = model.clone()
        set_torch_compile_wrapper(m, backend=backend)
        return m

    def step_call(self, model, refs: list) -> float:
        """One timed model call as a sampling step makes it: ``BaseModel.apply_model`` (core's compile wrapper
        and the patch's planning wrapper run there)."""
        import torch
        from sc_harness.direct import patched_diffusion_model

        with patched_diffusion_model(model) as (_, options), torch.no_grad():
            return self.timer(lambda: model.model.apply_model(self.x, self.timestep, c_crossattn=self.context,
                                                              transformer_options=self.options(model, options),
                                                              ref_latents=refs or None))

    def forward(self, model, refs: list, run=None) -> None:
        """One forward of ``model`` in ``run`` (default: the model's shared run)."""
        import torch
        from sc_harness.direct import patched_diffusion_model

        with patched_diffusion_model(model) as (dm, options), torch.no_grad():
            dm(x=self.x, timestep=self.timestep, context=self.context, y=None, guidance=None,
               ref_latents=refs or None, transformer_options=self.options(model, options, run))

    def call(self, model, refs: list, run=None) -> tuple[float, object]:
        """One timed forward; returns (seconds, the run's report or None)."""
        import torch
        from sc_harness.direct import patched_diffusion_model

        run = run if run is not None else self.run_for(model)
        with patched_diffusion_model(model) as (dm, options), torch.no_grad():
            def fwd():
                dm(x=self.x, timestep=self.timestep, context=self.context, y=None, guidance=None,
                   ref_latents=refs or None, transformer_options=self.options(model, options, run))
            seconds = self.timer(fwd)
        return seconds, run.report if run is not None else None

    def memory(self, model, refs: list) -> tuple[float | None, float | None]:
        return peak_memory_mb(lambda: self.forward(model, refs), self.device)


def kept_count(keep: float, n: int) -> int:
    from sparse_context.selectors import Budget

    return Budget(mode="ratio", ratio=keep).token_count(n_tokens=n)


def measure_group(bench: Bench, variants: dict[str, tuple], warmup: int, repeats: int) -> dict[str, dict]:
    """Warm each variant up, then time them round-robin ``repeats`` times; median seconds + memory."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    reports: dict[str, object] = {}
    for model, refs in variants.values():
        for _ in range(warmup):
            bench.call(model, refs)
    for _ in range(repeats):
        for name, (model, refs) in variants.items():
            seconds, reports[name] = bench.call(model, refs)
            times[name].append(seconds)
    out = {}
    for name, (model, refs) in variants.items():
        peak, act = bench.memory(model, refs)
        out[name] = {"s": statistics.median(times[name]), "all_s": times[name], "peak_mb": peak, "act_mb": act,
                     "report": reports.get(name)}
    return out


def measure_compiled(bench: Bench, variants: dict[str, tuple], repeats: int) -> dict[str, dict]:
    """First call of each compiled variant (trace + compile) with dynamo's graph and graph-break counts, one warm
    call, then ``repeats`` round-robin timed calls; median seconds."""
    from torch._dynamo.utils import counters

    out: dict[str, dict] = {}
    for name, (model, refs) in variants.items():
        counters.clear()
        first = bench.step_call(model, refs)
        out[name] = {"first_s": first, "graphs": counters["stats"]["unique_graphs"],
                     "graph_breaks": sum(counters["graph_break"].values()), "all_s": []}
        bench.step_call(model, refs)
    for _ in range(repeats):
        for name, (model, refs) in variants.items():
            out[name]["all_s"].append(bench.step_call(model, refs))
    for value in out.values():
        value["s"] = statistics.median(value["all_s"])
    return out


def run(args) -> dict:
    import torch

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    size = CONFIGS[args.config]
    bench = Bench(size, device, dtype, args.seed)
    n_ref = size.grid * size.grid
    n_target = n_ref
    refs_list = [r for r in REFS if r <= args.max_refs]
    print(f"model {args.config}: hidden {size.hidden}, {size.heads} heads, {size.depth}+{size.single} blocks, "
          f"text {size.text_tokens}, target {size.grid}x{size.grid}, references {size.grid}x{size.grid} "
          f"({n_ref} tokens each); {device} {args.dtype}; warmup {args.warmup}, median of {args.repeats}", flush=True)

    if args.kv_cache and bench.core_cached(bench.base) is None:
        print("  --kv-cache: this ComfyUI has no Flux KV Cache node (0.30+); cache columns left out", flush=True)
    noref = measure_group(bench, {"noref": (bench.base, [])}, args.warmup, args.repeats)["noref"]
    print(f"  no references: {noref['s'] * 1000:.1f} ms", flush=True)
    records = []
    for r in refs_list:
        refs = bench.refs[:r]
        variants: dict[str, tuple] = {"dense": (bench.base, refs)}
        kv = args.kv_cache and bench.core_cached(bench.base) is not None
        if kv:  # fresh caches per cell: one per reference set
            variants["kv_dense"] = (bench.core_cached(bench.base), refs)
        for keep in args.keeps:
            variants[f"sparse@{keep}"] = (bench.patched(keep), refs)
            k = kept_count(keep, n_ref)
            if k != n_ref:
                variants[f"ideal@{keep}"] = (bench.base, [crop_to(x, k) for x in refs])
            if kv:
                variants[f"kv_sparse@{keep}"] = (bench.core_cached(bench.patched(keep)), refs)
        res = measure_group(bench, variants, max(1, args.warmup), args.repeats)
        dense = res["dense"]
        if args.compile:
            torch._dynamo.reset()  # each reference count compiles from scratch
            compiled = {"dense": (bench.compiled(bench.base, args.compile), refs)}
            for keep in args.keeps:
                compiled[f"sparse@{keep}"] = (bench.compiled(bench.patched(keep), args.compile), refs)
            cres = measure_compiled(bench, compiled, args.repeats)
        for keep in args.keeps:
            sparse = res[f"sparse@{keep}"]
            ideal = res.get(f"ideal@{keep}", dense)
            k = kept_count(keep, n_ref)
            report = sparse["report"] or {}
            kept = [ref["kept"] for ref in report.get("references", [])]
            if kept and kept != [k] * r:
                raise RuntimeError(f"the patch kept {kept} tokens, expected {k} per reference (bucket=1)")
            rec = {
                "model": args.config, "device": str(device), "dtype": args.dtype, "refs": r, "keep": keep,
                "kept_tokens_per_ref": k, "ref_tokens": n_ref, "target_tokens": n_target,
                "text_tokens": size.text_tokens,
                "seq_dense": size.text_tokens + n_target + r * n_ref, "seq_sparse": size.text_tokens + n_target + r * k,
                "dense_s": dense["s"], "sparse_s": sparse["s"], "ideal_s": ideal["s"], "noref_s": noref["s"],
                "speedup": dense["s"] / sparse["s"], "ideal_speedup": dense["s"] / ideal["s"],
                "sparse_over_ideal": sparse["s"] / ideal["s"],
                "peak_mem_mb": {"dense": dense["peak_mb"], "sparse": sparse["peak_mb"], "ideal": ideal["peak_mb"],
                                "noref": noref["peak_mb"]},
                "act_mem_mb": {"dense": dense["act_mb"], "sparse": sparse["act_mb"], "ideal": ideal["act_mb"],
                               "noref": noref["act_mb"]},
                "attention_work_ratio": report.get("attention_work_ratio"),
                "times_s": {"dense": dense["all_s"], "sparse": sparse["all_s"], "ideal": ideal["all_s"]},
            }
            if args.cache:
                for mode in ("reference_only", "first_step"):
                    c = bench.cache_cell(keep, mode, refs, args.repeats)
                    fields = {"cache_first_s": c["first_s"], "cache_sparse_s": c["step_s"], "cache_mib": c["mib"],
                              "cache_speedup": dense["s"] / c["step_s"],
                              "run4_speedup": 4 * dense["s"] / (c["first_s"] + 3 * c["step_s"]),
                              "run28_speedup": 28 * dense["s"] / (c["first_s"] + 27 * c["step_s"])}
                    rec["peak_mem_mb"][mode], rec["act_mem_mb"][mode] = c["peak_mb"], c["act_mb"]
                    if mode == "reference_only":
                        rec.update(fields)
                    else:
                        rec["first_step"] = fields
            if args.compile:
                cd, cs = cres["dense"], cres[f"sparse@{keep}"]
                rec.update(compile_backend=args.compile, compiled_dense_s=cd["s"], compiled_sparse_s=cs["s"],
                           compiled_speedup=cd["s"] / cs["s"],
                           compile_first_call_s={"dense": cd["first_s"], "sparse": cs["first_s"]},
                           compile_graphs={"dense": cd["graphs"], "sparse": cs["graphs"]},
                           compile_graph_breaks={"dense": cd["graph_breaks"], "sparse": cs["graph_breaks"]})
                rec["times_s"].update(compiled_dense=cd["all_s"], compiled_sparse=cs["all_s"])
            if kv:
                rec.update(kv_dense_s=res["kv_dense"]["s"], kv_sparse_s=res[f"kv_sparse@{keep}"]["s"],
                           kv_dense_speedup=dense["s"] / res["kv_dense"]["s"],
                           kv_sparse_speedup=dense["s"] / res[f"kv_sparse@{keep}"]["s"])
            records.append(rec)
            print(f"  refs {r} keep {keep:<4}: dense {rec['dense_s'] * 1000:8.1f} ms  sparse {rec['sparse_s'] * 1000:8.1f} ms"
                  f"  ideal {rec['ideal_s'] * 1000:8.1f} ms  speed-up {rec['speedup']:.2f}x"
                  f"  sparse/ideal {rec['sparse_over_ideal']:.3f}"
                  + (f"  | drop + cache {rec['cache_speedup']:.2f}x/step, 28 steps {rec['run28_speedup']:.2f}x"
                     if args.cache else "")
                  + (f"  | core cache {rec['kv_dense_speedup']:.2f}x, drop + core cache {rec['kv_sparse_speedup']:.2f}x"
                     if kv else "")
                  + (f"  | compiled {rec['compiled_speedup']:.2f}x ({rec['compiled_dense_s'] * 1000:.1f} -> "
                     f"{rec['compiled_sparse_s'] * 1000:.1f} ms; first call "
                     f"{rec['compile_first_call_s']['sparse']:.1f} s)" if args.compile else ""), flush=True)
        if args.json:  # partial results survive a run cut short (e.g. a lent GPU's time limit)
            write_json(args.json, {"meta": dict(meta(args, size, device), partial=True), "records": records})
    return {"meta": meta(args, size, device), "records": records}


def write_json(path: pathlib.Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


def meta(args, size: ModelSize, device) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info = {
        "config": args.config, "size": asdict(size), "device": str(device), "dtype": args.dtype,
        "warmup": args.warmup, "repeats": args.repeats, "bucket": 1, "rule": "grid", "attention": "pytorch sdpa",
        "compile": args.compile,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "cpu": cpu, "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        from comfyui_version import __version__ as comfy_version

        info["comfyui"] = comfy_version
    except ImportError:
        pass
    return info


def table(result: dict) -> str:
    """A markdown table of the records."""
    head = ("| refs | keep | kept/ref | seq dense -> sparse | dense ms | sparse ms | ideal ms | no-ref ms "
            "| speed-up | sparse/ideal | peak MiB dense -> sparse |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["records"]:
        pd, ps = r["peak_mem_mb"]["dense"], r["peak_mem_mb"]["sparse"]
        mem = f"{pd:.0f} -> {ps:.0f}" if pd is not None and ps is not None else "n/a"
        lines.append(
            f"| {r['refs']} | {r['keep']} | {r['kept_tokens_per_ref']} | {r['seq_dense']} -> {r['seq_sparse']} "
            f"| {r['dense_s'] * 1000:.1f} | {r['sparse_s'] * 1000:.1f} | {r['ideal_s'] * 1000:.1f} "
            f"| {r['noref_s'] * 1000:.1f} | {r['speedup']:.2f}x | {r['sparse_over_ideal']:.3f} | {mem} |"
        )
    return "\n".join(lines)


def _table(result: dict, field: str, header: str, row) -> str:
    """A markdown table with one ``row(record)`` per record that has ``field``, or "" when none has it."""
    rows = [r for r in result["records"] if field in r]
    if not rows:
        return ""
    return "\n".join([header, "|" + "---|" * (header.count("|") - 1)] + [row(r) for r in rows])


def cache_table(result: dict) -> str:
    """Markdown table of the ``--cache`` columns (speed-ups over dense), or "" without them."""
    def row(r: dict) -> str:
        f = r["first_step"]
        return (f"| {r['refs']} | {r['keep']} | {r['speedup']:.2f}x | {r['ideal_speedup']:.2f}x "
                f"| {r['cache_speedup']:.2f}x / {f['cache_speedup']:.2f}x "
                f"| {r['run4_speedup']:.2f}x / {f['run4_speedup']:.2f}x "
                f"| {r['run28_speedup']:.2f}x / {f['run28_speedup']:.2f}x | {r['dense_s'] / r['noref_s']:.2f}x "
                f"| {r['cache_mib']:.1f} | {_peaks(r['peak_mem_mb'])} |")

    return _table(result, "cache_sparse_s", "| refs | keep | drop only | ideal drop | drop + cache, per step "
                  "(reference_only / first_step) | 4-step run | 28-step run | no-ref ceiling | cache MiB "
                  "| peak MiB dense / drop / reference_only / first_step |", row)


def _peaks(peaks: dict) -> str:
    values = [peaks.get(k) for k in ("dense", "sparse", "reference_only", "first_step")]
    return " / ".join("n/a" if v is None else f"{v:.0f}" for v in values)


def kv_table(result: dict) -> str:
    """Markdown table of the ``--kv-cache`` columns (per cached step), or "" without them."""
    return _table(result, "kv_sparse_s",
                  "| refs | keep | dense ms | drop only | core cache only | drop + core cache | no-ref ceiling |",
                  lambda r: f"| {r['refs']} | {r['keep']} | {r['dense_s'] * 1000:.1f} | {r['speedup']:.2f}x "
                            f"| {r['kv_dense_speedup']:.2f}x | {r['kv_sparse_speedup']:.2f}x "
                            f"| {r['dense_s'] / r['noref_s']:.2f}x |")


def compile_table(result: dict) -> str:
    """Markdown table of the ``--compile`` columns, or "" without them."""
    return _table(result, "compiled_sparse_s",
                  "| refs | keep | eager speed-up | compiled dense ms | compiled sparse ms | compiled speed-up "
                  "| first call s (dense / sparse) | graphs / breaks (sparse) |",
                  lambda r: f"| {r['refs']} | {r['keep']} | {r['speedup']:.2f}x | {r['compiled_dense_s'] * 1000:.1f} "
                            f"| {r['compiled_sparse_s'] * 1000:.1f} | {r['compiled_speedup']:.2f}x "
                            f"| {r['compile_first_call_s']['dense']:.1f} / {r['compile_first_call_s']['sparse']:.1f} "
                            f"| {r['compile_graphs']['sparse']} / {r['compile_graph_breaks']['sparse']} |")


FAMILY_NAMES = ("flux1_kontext", "flux2_klein", "qwen_image_edit", "mage_flow", "krea2", "longcat_image_edit",
                "z_image_omni", "joyimage_edit")


def family_main(args) -> int:
    """``--family NAME``: dense vs sparse on that family's tiny real model (CPU)."""
    import torch
    from packload import load_harness, load_testpack

    if args.family not in FAMILY_NAMES:
        print(f"--family: expected one of {', '.join(FAMILY_NAMES)}, got {args.family!r}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    import_comfy("cpu")
    load_pack()
    load_harness()
    load_testpack()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from family_bench import family_table, run_family

    result = run_family(args.family, [k for k in args.keeps if k < 1.0] or [0.5], 1 if args.warmup is None else
                        args.warmup, args.repeats or (3 if args.quick else 7))
    print(family_table(result))
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--config", choices=sorted(CONFIGS), default=None,
                    help="model size (default: small with --quick, klein9b on cuda, else mid)")
    ap.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--quick", action="store_true", help="small model, fewer repeats (~2 min on 2 CPU cores)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed forwards per variant (default 1)")
    ap.add_argument("--repeats", type=int, default=None, help="timed forwards per variant (median; default 7, quick 5)")
    ap.add_argument("--max-refs", type=int, default=4, help="largest reference count of the grid (1, 2, 4)")
    ap.add_argument("--keeps", type=float, nargs="+", default=list(KEEPS), help="keep ratios")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=pathlib.Path, default=None, help="write the records here")
    ap.add_argument("--cache", action="store_true",
                    help="also time the pack's reference cache (reference_only and first_step) on top of dropping")
    ap.add_argument("--kv-cache", action="store_true",
                    help="also time core's Flux KV Cache alone and after the sparse patch (ComfyUI 0.30+)")
    ap.add_argument("--compile", nargs="?", const="auto", default=None, metavar="BACKEND",
                    help="also time both models compiled through core's torch.compile wrapper (default backend: "
                         "inductor on cuda, aot_eager on cpu)")
    ap.add_argument("--family", default=None, help="time one reference family's tiny real model instead (see "
                    "benchmarks/family_bench.py): " + ", ".join(FAMILY_NAMES))
    args = ap.parse_args(argv)
    if args.family is not None:
        return family_main(args)
    cuda = args.device.startswith("cuda")
    if args.compile == "auto":
        args.compile = "inductor" if cuda else "aot_eager"
    args.config = args.config or ("small" if args.quick else "klein9b" if cuda else "mid")
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.warmup = 1 if args.warmup is None else args.warmup
    args.repeats = args.repeats or (5 if args.quick else 7)

    import torch

    if cuda and not torch.cuda.is_available():
        print("--device cuda: no CUDA device available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile:  # a static graph per setting, as one user's setting gets; room for every cell's variants
        torch._dynamo.config.automatic_dynamic_shapes = False
        torch._dynamo.config.recompile_limit = 64
    import_comfy(args.device)
    load_pack()
    load_harness()  # sc_harness.direct: forwards outside a sampler with the model's patches active
    t0 = time.perf_counter()
    result = run(args)
    result["meta"]["wall_s"] = round(time.perf_counter() - t0, 1)
    print()
    print(table(result))
    if cache_table(result):
        print("\nReference cache (speed-up over dense):\n" + cache_table(result))
    if kv_table(result):
        print("\nPer cached step (core Flux KV Cache), speed-up over dense:\n" + kv_table(result))
    if compile_table(result):
        print(f"\ntorch.compile ({args.compile}, core's wrapper), per model call:\n" + compile_table(result))
    print(f"\n(wall {result['meta']['wall_s']} s; {result['meta']['cpu']}"
          f"{'; ' + result['meta']['gpu'] if 'gpu' in result['meta'] else ''})")
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
