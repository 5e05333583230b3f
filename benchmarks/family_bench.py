"""``bench.py --family NAME``: dense vs sparse forward time of one reference family's model.

The model is the tests' tiny real model of the family (``tests/comfy_testpack``: the host's own model detection on
the real checkpoint key names) at a bench resolution: a 512x512 target and two 512x512 references, 32x32 tokens
each (every supported family has 16 pixels per token). Small widths, so the rows show what the sequence length
costs on the CPU, not a full-size model's speed-up. Per keep ratio: the median of ``repeats`` forwards, dense and
sparse interleaved (rule "grid", bucket 1).
"""

from __future__ import annotations

import statistics
import time

#: Bench name -> (tiny model family, reference method or None).
FAMILIES = {
    "flux1_kontext": ("flux1_kontext", None),
    "flux2_klein": ("flux2_klein", None),
    "qwen_image_edit": ("qwen_image_edit", None),
    "mage_flow": ("mage_flow", None),
    "krea2": ("krea2", "index_timestep_zero"),
    "longcat_image_edit": ("longcat_image_edit", None),
    "z_image_omni": ("z_image_omni", None),
    "joyimage_edit": ("joyimage_edit", None),
}
PIXELS = 512


def run_family(name: str, keeps: list[float], warmup: int, repeats: int) -> dict:
    """Timings of family ``name`` (see ``FAMILIES``) per keep ratio; raises SystemExit if this host lacks it."""
    import sc_testpack
    import torch
    from sc_harness.direct import patched_diffusion_model
    from sc_harness.forward import forward_inputs
    from sparse_context.selectors import Budget
    from sparse_context.sparse_attention import PATCH_KEY, RUN_KEY, SparseContextConfig, apply_sparse_context

    family, method = FAMILIES[name]
    lacks = sc_testpack.host_lacks(family)
    if lacks is not None:
        raise SystemExit(f"--family {name}: {lacks}")
    base = sc_testpack.build_model_patcher(family, seed=0)
    inputs = forward_inputs(family, 1, (PIXELS, PIXELS), [(PIXELS, PIXELS)] * 2)
    extra = {"ref_latents_method": method} if method else {}

    def timed(model):
        patch = model.model_options["transformer_options"].get(PATCH_KEY)
        with patched_diffusion_model(model) as (dm, options), torch.no_grad():
            options = dict(options)
            if patch is not None:  # a run of its own per call: plans are made once per run, as in sampling
                options[RUN_KEY] = patch.new_run()
            t0 = time.perf_counter()
            dm(**inputs, transformer_options=options, **extra)
            return time.perf_counter() - t0, (options.get(RUN_KEY).report if patch is not None else None)

    models = {"dense": base}
    for keep in keeps:
        cfg = SparseContextConfig(budget=Budget(mode="ratio", ratio=keep), rule="grid", bucket=1)
        models[keep] = apply_sparse_context(base, cfg)
    for model in models.values():
        for _ in range(warmup):
            timed(model)
    times: dict = {k: [] for k in models}
    reports: dict = {}
    for _ in range(repeats):
        for key, model in models.items():
            seconds, reports[key] = timed(model)
            times[key].append(seconds)
    dense = statistics.median(times["dense"])
    rows = []
    for keep in keeps:
        sparse = statistics.median(times[keep])
        report = reports[keep] or {}
        kept = sum(r["kept"] for r in report.get("references", [])) or None
        rows.append({"keep": keep, "dense_s": dense, "sparse_s": sparse, "speedup": dense / sparse,
                     "kept_tokens": kept, "attention_work_ratio": report.get("attention_work_ratio")})
    model_cls = type(base.model.diffusion_model)
    return {"family": name, "class": f"{model_cls.__module__}.{model_cls.__qualname__}", "pixels": PIXELS,
            "references": 2, "rows": rows}


def family_table(result: dict) -> str:
    lines = [f"{result['family']} ({result['class']}), {result['references']} references of "
             f"{result['pixels']}x{result['pixels']} px:", "| keep | dense s | sparse s | speed-up | kept tokens |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['keep']:.2f} | {r['dense_s']:.3f} | {r['sparse_s']:.3f} | {r['speedup']:.2f}x | "
                     f"{r['kept_tokens']} |")
    return "\n".join(lines)
