"""Apply Sparse Context: a MODEL whose reference images keep only a subset of their tokens.

The patch itself (``sparse_attention``) logs one report line per sampling run. This node also shows
that report, with the sampling time, on the node in the UI (``PromptServer.send_progress_text``,
used only where the running ComfyUI has it).
"""

from __future__ import annotations

import logging
import time

import comfy.patcher_extension
from comfy_api.latest import io

from ..selectors import Budget
from ..sparse_attention import (
    CACHE_MODES,
    DEFAULT_RULES,
    RUN_KEY,
    SparseContextConfig,
    apply_sparse_context,
    unsupported_reason,
)
from .common import SparseBudget, SparseNode, fail, user_errors

log = logging.getLogger("SparseContext")
REPORT_WRAPPER_KEY = "sparse_context_ui_report"


def format_report(report: dict | None, enabled: bool, seconds: float, dense_reason: str | None = None) -> str:
    """One line for the UI: kept tokens per reference, attention work, sampling time; or why references ran
    dense (``dense_reason``: the model is not one this pack thins)."""
    if not enabled:
        return f"Sparse Context off (dense references). Sampling took {seconds:.2f} s."
    if dense_reason:
        return f"References ran dense: {dense_reason}. Sampling took {seconds:.2f} s."
    if not report:
        return f"No reference images reached the model (nothing to thin). Sampling took {seconds:.2f} s."
    if report.get("dense_reason"):
        return f"References ran dense: {report['dense_reason']}. Sampling took {seconds:.2f} s."
    refs = ", ".join(f"#{i + 1} {r['kept']}/{r['tokens']} ({r['rule']})" for i, r in enumerate(report["references"]))
    kept = sum(r["kept"] for r in report["references"])
    total = sum(r["tokens"] for r in report["references"])
    share = 100.0 * kept / total if total else 100.0
    cache = (" Reference keys/values cached by core's Flux KV Cache (computed in step 1, reused after)."
             if report.get("kv_cache") else "")
    own = report.get("cache")
    if own and own.get("mode") != "off":
        hits = f"{own['hits']} hit(s), {own['misses']} miss(es)" if own["mode"] == "reference_only" else (
            f"{own['misses']} entr{'y' if own['misses'] == 1 else 'ies'} recorded in the first step")
        cache += (f" Reference cache ({own['mode']}): {hits}, {own['mib']:.1f} MiB (counted in ComfyUI's memory "
                  f"estimate: {own.get('estimate_mib', 0.0):.1f} MiB with the join buffer).")
    return (f"Kept {kept}/{total} reference tokens ({share:.0f}%): {refs}. Joint attention work "
            f"{100 * report['attention_work_ratio']:.0f}% of dense.{cache} Sampling took {seconds:.2f} s.")


def _send_to_ui(text: str, node_id: str | None) -> None:
    if node_id is None:
        return
    try:
        from server import PromptServer
    except ImportError:  # not inside a ComfyUI server (scripts, tests in-process)
        return
    instance = getattr(PromptServer, "instance", None)
    sender = getattr(instance, "send_progress_text", None)
    if sender is None:
        return
    try:
        sender(text, node_id)
    except Exception as err:  # a UI message must never fail a sampling run
        log.debug("SparseContext: could not send the report to the UI: %s", err)


def report_wrapper(node_id: str | None, enabled: bool, dense_reason: str | None = None):
    """OUTER_SAMPLE wrapper: time the sampling run and show the patch's report on the Apply node."""

    def wrapper(executor, *args, **kwargs):
        start = time.perf_counter()
        out = executor(*args, **kwargs)
        _synchronize()
        seconds = time.perf_counter() - start
        options = executor.class_obj.model_options.get("transformer_options", {})
        # this run's own report (set by the patch's outer wrapper around this one): never an older run's
        report = getattr(options.get(RUN_KEY), "report", None)
        text = format_report(report, enabled, seconds, dense_reason)
        log.info("SparseContext (node %s): %s", node_id, text)
        _send_to_ui(text, node_id)
        return out

    return wrapper


def _synchronize() -> None:
    try:
        import comfy.model_management as mm

        if mm.get_torch_device().type == "cuda":
            import torch

            torch.cuda.synchronize()
    except Exception:  # timing only; never fail the run for it  # noqa: S110
        pass


class SparseContextApply(SparseNode):
    NAME = "Apply Sparse Context"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SparseContextApply", display_name=cls.NAME, category="SparseContext/model",
            description="Makes reference-image models (FLUX.1 Kontext, FLUX.2, Qwen-Image-Edit) faster: each "
                        "reference image keeps only a subset of its tokens, at their original positions. References "
                        "with a selection (Sparse Reference Latent / Bind Sparse Selections) use it; the others use "
                        "`rule`. Reports kept tokens, attention work and sampling time on this node and in the log. "
                        "With `cache` the kept references' keys/values are computed once. Composes with core's Flux KV "
                        "Cache (ComfyUI 0.30+) in either order (with cache off): it then holds only the kept tokens, "
                        "and the start/end window is ignored (that cache reuses step 1's references).",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (FLUX.1 Kontext, FLUX.2 dev/klein or "
                                                "Qwen-Image-Edit); other models run unchanged."),
                io.Float.Input("keep_ratio", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Share of each reference's tokens kept when neither a budget input nor the "
                                       "reference's selection says otherwise. Start at 0.5: lower ratios are faster "
                                       "but lose visible detail unless the model was fine-tuned for sparse references "
                                       "(Train Sparse Context LoRA); check your model with Sparse Context Calibrate."),
                io.Combo.Input("rule", options=list(DEFAULT_RULES), default="grid",
                               tooltip="Rule for references without their own selection: grid = even coverage, "
                                       "detail = latent structure, random = seeded subset, attention = the tokens "
                                       "the model itself attends to most (measured in the first step, which then "
                                       "sees every token)."),
                io.Int.Input("total_tokens", default=0, min=0, max=262144, step=64,
                             tooltip="0 = each reference has its own budget. > 0 = one budget shared by all "
                                     "references of a step, split by score mass and weight."),
                io.Int.Input("bucket", default=64, min=1, max=4096,
                             tooltip="Kept counts are rounded up to a multiple of this (fewer distinct shapes for "
                                     "torch.compile and attention kernels), at most 1/16 of a reference's tokens. "
                                     "1 = exact."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Sampling progress where sparse references start (dense before)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Sampling progress where sparse references end (dense after)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seed of the random rule and of tie-breaking between equal scores."),
                io.Boolean.Input("enabled", default=True,
                                 tooltip="Off = dense references (the model is unchanged); handy for A/B tests."),
                io.Combo.Input("cache", options=list(CACHE_MODES), default="off", optional=True,
                               tooltip="Reference cache: the kept reference tokens' keys/values are computed once and "
                                       "later steps run only the target and text. reference_only = once per run (and "
                                       "reused across runs), references attending only to references at t=0: exact "
                                       "for models trained that way (FLUX.2 [klein] 9B-KV), an approximation for "
                                       "others. first_step = taken from the first step, as core's Flux KV Cache does, "
                                       "for cond and uncond separately. off = recomputed every step."),
                SparseBudget.Input("budget", optional=True,
                                   tooltip="Optional Sparse Budget; replaces keep_ratio as the default budget."),
                io.Float.Input("cache_mib", default=1024.0, min=0.0, max=65536.0, step=256.0, optional=True,
                               tooltip="reference_only: most MiB of cached keys/values kept across runs, in system "
                                       "memory (least recently used first out; freed when ComfyUI unloads the "
                                       "model). 0 = nothing kept across runs."),
            ],
            outputs=[io.Model.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, keep_ratio: float, rule: str, total_tokens: int, bucket: int, start_percent: float,
                end_percent: float, seed: int, enabled: bool, cache: str = "off", budget=None,
                cache_mib: float = 1024.0) -> io.NodeOutput:
        cls.check_inputs(locals())
        if budget is not None and not isinstance(budget, Budget):
            raise fail(cls.NAME, f"budget: expected a SPARSE_BUDGET from a Sparse Budget node, got {type(budget).__name__}")
        if start_percent > end_percent:
            raise fail(cls.NAME, f"start_percent: must be <= end_percent, got {start_percent} > {end_percent}")
        with user_errors(cls.NAME, {"ratio": "keep_ratio"}):
            config = SparseContextConfig(
                budget=budget if budget is not None else Budget(mode="ratio", ratio=keep_ratio),
                rule=rule, total_tokens=total_tokens or None, bucket=bucket, start_percent=start_percent,
                end_percent=end_percent, seed=seed, enabled=enabled, cache=cache, cache_mib=cache_mib,
            )
            patched = apply_sparse_context(model, config)
        node_id = getattr(getattr(cls, "hidden", None), "unique_id", None)
        outer = comfy.patcher_extension.WrappersMP.OUTER_SAMPLE
        patched.remove_wrappers_with_key(outer, REPORT_WRAPPER_KEY)
        patched.add_wrapper_with_key(outer, REPORT_WRAPPER_KEY, report_wrapper(node_id, enabled,
                                                                              unsupported_reason(model)))
        return io.NodeOutput(patched)
