"""Sparse Context Calibrate: the lowest keep ratio whose result stays within a threshold of dense, measured on
the user's own model, references, latent and seed with a short schedule of core's sampler."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from . import calibration
from .common import SparseNode, fail, user_errors

log = logging.getLogger("SparseContext")


class SparseContextCalibrate(SparseNode):
    NAME = "Sparse Context Calibrate"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SparseContextCalibrate", display_name=cls.NAME, category="SparseContext/model",
            description="Finds the keep ratio for your model and references: samples a short schedule dense and "
                        "at each candidate keep ratio (same seed, core's sampler), compares every sparse result with "
                        "the dense one (PSNR/SSIM on the decoded image, or on the latent without a VAE) and outputs "
                        "the lowest keep ratio that stays within your threshold, to wire into Apply Sparse Context's "
                        "keep_ratio, plus a plot of quality and step time against the keep ratio.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model, with or without Apply Sparse Context (its other "
                                                "settings are kept; only the keep ratio is varied)."),
                io.Conditioning.Input("positive", tooltip="The prompt's conditioning with its reference images "
                                                          "(ReferenceLatent / Sparse Reference Latent)."),
                io.Latent.Input("latent", tooltip="The latent to sample (e.g. Empty Latent at your output size)."),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate=False,
                             tooltip="Noise seed: dense and sparse runs use the same one."),
                io.Float.Input("min_psnr", default=30.0, min=0.0, max=100.0, step=0.5,
                               tooltip="Threshold: a keep ratio passes when the PSNR of its result against the dense "
                                       "result is at least this many dB (higher = stricter; at 30 dB differences are "
                                       "small)."),
                io.Vae.Input("vae", optional=True,
                             tooltip="Optional: compare decoded images (recommended). Not connected: the latents "
                                     "are compared."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Optional negative conditioning (needed with cfg > 1). Not connected: "
                                              "the positive one."),
                io.Float.Input("min_ssim", default=0.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Optional second threshold on SSIM against dense (0 = off)."),
                io.String.Input("keep_ratios", default="0.1, 0.25, 0.5, 0.75", optional=True,
                                tooltip="Candidate keep ratios, comma separated, each in (0, 1)."),
                io.Int.Input("steps", default=4, min=1, max=100, optional=True,
                             tooltip="Sampling steps of each calibration run (a short schedule keeps calibration "
                                     "cheap; use your KSampler's steps for the exact picture)."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, optional=True,
                               tooltip="Classifier-free guidance of the calibration runs (as in your KSampler)."),
                io.Combo.Input("sampler_name", options=_samplers(), default="euler", optional=True,
                               tooltip="Sampler of the calibration runs."),
                io.Combo.Input("scheduler", options=_schedulers(), default="simple", optional=True,
                               tooltip="Scheduler of the calibration runs."),
            ],
            outputs=[
                io.Float.Output(display_name="keep_ratio",
                                tooltip="The lowest candidate keep ratio within the threshold (1.0 if none is): wire "
                                        "it into Apply Sparse Context's keep_ratio."),
                io.Image.Output(display_name="plot", tooltip="Quality against dense and seconds per step vs keep."),
                io.String.Output(display_name="report", tooltip="Every candidate's PSNR, SSIM and step time."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, latent, seed: int, min_psnr: float, vae=None, negative=None,
                min_ssim: float = 0.0, keep_ratios: str = "0.1, 0.25, 0.5, 0.75", steps: int = 4, cfg: float = 1.0,
                sampler_name: str = "euler", scheduler: str = "simple") -> io.NodeOutput:
        cls.check_inputs(locals())
        with user_errors(cls.NAME):
            keeps = calibration.parse_keeps(keep_ratios)
        if not isinstance(latent, dict) or "samples" not in latent:
            raise fail(cls.NAME, "latent: expected a LATENT (e.g. from Empty Latent Image)")
        if not _has_references(positive):
            raise fail(cls.NAME, "positive: the conditioning carries no reference images; chain a ReferenceLatent "
                                 "(or Sparse Reference Latent) before this node")
        negative = positive if negative is None else negative
        space = "image" if vae is not None else "latent"

        def outcome(m) -> tuple:
            samples, seconds = calibration.run_sampler(m, positive, negative, latent, seed, steps, cfg,
                                                       sampler_name, scheduler)
            return (vae.decode(samples) if vae is not None else samples), seconds / steps

        dense_model = calibration.dense_model(model)
        dense, first = outcome(dense_model)  # includes loading and warm-up: timed again below
        results = []
        for keep in keeps:
            out, per_step = outcome(calibration.sparse_model(model, keep))
            psnr, ssim = calibration.quality(out, dense)
            results.append(calibration.KeepResult(keep, psnr, ssim, per_step))
        _, dense_per_step = outcome(dense_model)
        recommended = calibration.recommend(results, min_psnr, min_ssim)
        plot = calibration.draw_plot(results, dense_per_step, recommended, min_psnr, min_ssim, space)
        lines = [f"{cls.NAME} ({space}, {steps} steps, seed {seed}): recommended keep_ratio {recommended:g}",
                 f"dense: {dense_per_step:.4f} s/step (first run, with warm-up: {first:.4f} s/step)"]
        lines += [f"keep {r.keep:g}: PSNR {r.psnr:.2f} dB, SSIM {r.ssim:.4f}, {r.seconds_per_step:.4f} s/step "
                  f"({dense_per_step / max(r.seconds_per_step, 1e-9):.2f}x)" for r in results]
        if recommended >= 1.0:
            lines.append(f"no candidate stays within PSNR >= {min_psnr:g} dB (SSIM >= {min_ssim:g}): keep 1.0 (dense)")
        report = "\n".join(lines)
        log.info("%s", report)
        return io.NodeOutput(recommended, plot, report)


def _has_references(conditioning) -> bool:
    try:
        return any(entry[1].get("reference_latents") for entry in conditioning)
    except (TypeError, IndexError, AttributeError):
        return False


def _samplers() -> list[str]:
    import comfy.samplers

    return list(comfy.samplers.KSampler.SAMPLERS)


def _schedulers() -> list[str]:
    import comfy.samplers

    return list(comfy.samplers.KSampler.SCHEDULERS)
