"""Train Sparse Context LoRA (and Save Training Example): the drop-robust fine-tune inside ComfyUI.

The training node runs ``training.LoraTrainer`` for N steps on examples given as LATENT (targets) +
CONDITIONING (text + ReferenceLatent references), writes the LoRA to ``<output>/loras/`` (which ComfyUI
lists as a loras folder), and outputs the model with the LoRA applied by core's LoRA code, the file name,
the recommended keep ratio and the training curves. While it trains, ComfyUI's progress bar advances per
step and its preview shows the curves; checkpoints (optional) let a later run resume. For long runs on a
folder of examples use ``scripts/train_lora.py``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import comfy.model_management
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..training import (
    PRESET_NAMES,
    KeepRatioDistribution,
    LoraConfig,
    LoraTrainer,
    TrainConfig,
    apply_lora,
    examples_from_comfy,
    load_lora_file,
    save_example,
)
from ..training.plot import curves_image, image_tensor
from ..training.resume import latest_checkpoint
from .common import SparseNode, fail, prefix_problem, user_errors

SAVE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: Training examples validated when no held-out examples are connected.
TRAIN_EXAMPLES_VALIDATED = 4
CHECKPOINTS = "sparse_context_checkpoints"  # under the output folder; not under loras (not a LoRA file)


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) else value


def _loras_dir() -> str:
    return os.path.join(folder_paths.get_output_directory(), "loras")


def _latent_channels(model) -> int | None:
    fmt = getattr(getattr(model, "model", None), "latent_format", None)
    return getattr(fmt, "latent_channels", None)


def example_names(latent_input: str) -> dict[str, str]:
    """``TrainingExample``'s field names -> the node inputs they come from."""
    names = {"target": latent_input, "context": "conditioning", "pooled": "conditioning", "guidance": "conditioning"}
    return names | {f"ref_{i}": "conditioning" for i in range(64)}


def _pair_examples(node: str, latents: list, conditionings: list) -> list:
    """Examples from lists of LATENTs and CONDITIONINGs: pairwise, or one conditioning for all latents."""
    if len(conditionings) not in (1, len(latents)):
        raise fail(node, f"conditioning: {len(conditionings)} conditionings for {len(latents)} latents; give one "
                         "conditioning, or one per latent")
    examples = []
    with user_errors(node, example_names("latents")):
        for i, latent in enumerate(latents):
            examples += examples_from_comfy(latent, conditionings[i if len(conditionings) > 1 else 0])
    return examples


def _check_trained(node: str, trainer: LoraTrainer, params: dict) -> None:
    """A LoRA with NaN/inf weights would make every image NaN: say why and save nothing."""
    bad_step = next((i + 1 for i, loss in enumerate(trainer.losses) if not math.isfinite(loss)), None)
    if bad_step is not None:
        raise fail(node, f"learning_rate: training diverged (the loss became NaN or inf at step {bad_step}); nothing "
                         f"was saved. Lower learning_rate (now {params['learning_rate']:g}).")
    weights = trainer.lora_state_dict(SAVE_DTYPES[params["save_dtype"]]).values()
    if not all(bool(torch.isfinite(w).all()) for w in weights if w.is_floating_point()):
        raise fail(node, f"save_dtype: the trained weights do not fit in {params['save_dtype']} (they would be saved "
                         "as inf); nothing was saved. Use bf16 or fp32, or lower learning_rate.")


class SparseContextTrainLora(SparseNode):
    NAME = "Train Sparse Context LoRA"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SparseContextTrainLora", display_name=cls.NAME, category="SparseContext/training",
            description="Fine-tunes a LoRA with random reference-token dropping (the drop-robust training of Sparse "
                        "Context) on target latents + conditionings that carry reference latents, through the same "
                        "patch inference uses. Writes the LoRA to output/loras and returns the patched model.",
            is_input_list=True, is_output_node=True, is_experimental=True,
            inputs=[
                io.Model.Input("model", tooltip="Base model to fine-tune (FLUX.1 Kontext, FLUX.2, Qwen-Image-Edit)."),
                io.Latent.Input("latents", tooltip="Target latents (VAE Encode of the wanted results); a batch or a "
                                                   "list, one example per row."),
                io.Conditioning.Input("conditioning", tooltip="Text conditioning with the reference latents attached "
                                                              "(ReferenceLatent); one for all latents, or one per latent."),
                io.Int.Input("steps", default=500, min=1, max=100000, tooltip="Optimizer steps."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-6,
                               tooltip="AdamW learning rate."),
                io.Int.Input("rank", default=16, min=1, max=256, tooltip="LoRA rank."),
                io.Float.Input("alpha", default=16.0, min=0.01, max=1024.0, step=0.01,
                               tooltip="LoRA alpha; the update is scaled by alpha / rank."),
                io.Combo.Input("targets", options=list(PRESET_NAMES), default="attention_mlp",
                               tooltip="Layers that get a LoRA: attention projections, + the MLPs, or only the image "
                                       "stream (single blocks included)."),
                io.Float.Input("keep_min", default=0.1, min=0.01, max=1.0, step=0.01,
                               tooltip="Smallest keep ratio drawn per example (share of reference tokens kept)."),
                io.Float.Input("keep_max", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="Largest keep ratio drawn per example."),
                io.Float.Input("dense_share", default=0.1, min=0.0, max=1.0, step=0.01,
                               tooltip="Share of examples that keep every reference token."),
                io.Float.Input("recommended_keep_ratio", default=0.25, min=0.01, max=1.0, step=0.01,
                               tooltip="Keep ratio written into the LoRA's metadata for the loader to output."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Seeds the LoRA init, example order, keep ratios, kept tokens, noise and sigmas."),
                io.Combo.Input("save_dtype", options=list(SAVE_DTYPES), default="bf16",
                               tooltip="dtype of the saved LoRA weights."),
                io.String.Input("filename_prefix", default="sparse_context/drop_robust_lora",
                                tooltip="File name prefix under output/loras (a counter and .safetensors are added)."),
                io.Boolean.Input("gradient_checkpointing", default=True, optional=True,
                                 tooltip="Recompute each transformer block during the backward instead of keeping its "
                                         "activations: far less memory, about one more forward per step, same result."),
                io.Int.Input("validate_every", default=50, min=0, max=100000, optional=True,
                             tooltip="Every N steps, measure the PSNR of the one-step x0 estimate, dense and at the "
                                     "recommended keep ratio, and draw it in the curves (0 = never)."),
                io.Latent.Input("validation_latents", optional=True,
                                tooltip="Held-out target latents for the validation (not trained on). Not connected: "
                                        f"the first {TRAIN_EXAMPLES_VALIDATED} training examples are measured."),
                io.Conditioning.Input("validation_conditioning", optional=True,
                                      tooltip="Conditioning (with reference latents) of the held-out latents; one for "
                                              "all, or one per latent."),
                io.Int.Input("checkpoint_every", default=0, min=0, max=100000, optional=True,
                             tooltip=f"Every N steps (and when the run is cancelled), save a resumable checkpoint to "
                                     f"output/{CHECKPOINTS}/<filename_prefix>/ (0 = none)."),
                io.Boolean.Input("resume", default=False, optional=True,
                                 tooltip="Continue from the newest checkpoint of this filename_prefix (same LoRA "
                                         "settings), up to `steps` in total."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the trained LoRA applied (core LoRA code)."),
                io.String.Output(display_name="lora_name", tooltip="The saved file, relative to output/loras."),
                io.Float.Output(display_name="keep_ratio", tooltip="The recommended keep ratio for Apply Sparse Context."),
                io.Image.Output(display_name="curves", tooltip="Training loss per step (and its running mean) and, if "
                                                             "validated, PSNR dense vs sparse per validation."),
            ],
        )

    @classmethod
    def validate_inputs(cls, filename_prefix=None) -> bool | str:
        """Queue time: the output path (the one input core cannot check; see nodes/common.py)."""
        problem = prefix_problem(_first(filename_prefix), _loras_dir(), "LoRA")
        return f"{cls.NAME}: {problem}" if problem else True

    @classmethod
    def execute(cls, model, latents, conditioning, steps, learning_rate, rank, alpha, targets, keep_min, keep_max,
                dense_share, recommended_keep_ratio, seed, save_dtype, filename_prefix, gradient_checkpointing=(True,),
                validate_every=(50,), validation_latents=None, validation_conditioning=None, checkpoint_every=(0,),
                resume=(False,)) -> io.NodeOutput:
        model = _first(model)
        params = {k: _first(v) for k, v in dict(
            steps=steps, learning_rate=learning_rate, rank=rank, alpha=alpha, targets=targets, keep_min=keep_min,
            keep_max=keep_max, dense_share=dense_share, recommended_keep_ratio=recommended_keep_ratio, seed=seed,
            save_dtype=save_dtype, filename_prefix=filename_prefix, gradient_checkpointing=gradient_checkpointing,
            validate_every=validate_every, checkpoint_every=checkpoint_every, resume=resume).items()}
        # The whole configuration, the output path and the dtype are checked before the first step.
        cls.check_inputs(params)
        if params["keep_min"] > params["keep_max"]:
            raise fail(cls.NAME, f"keep_min: {params['keep_min']} is above keep_max {params['keep_max']}")
        loras_dir = _loras_dir()
        problem = prefix_problem(params["filename_prefix"], loras_dir, "LoRA")
        if problem:
            raise fail(cls.NAME, problem)
        examples = _pair_examples(cls.NAME, list(latents), list(conditioning))
        if (validation_latents is None) != (validation_conditioning is None):
            raise fail(cls.NAME, "validation_latents: connect validation_latents and validation_conditioning together")
        held_out = validation_latents is not None
        validation = (_pair_examples(cls.NAME, list(validation_latents), list(validation_conditioning)) if held_out
                      else examples[:TRAIN_EXAMPLES_VALIDATED])
        channels = _latent_channels(model)
        for what, group in (("latents", examples), ("validation_latents", validation if held_out else [])):
            for i, example in enumerate(group):
                got = int(example.target.shape[1])
                if channels is not None and got != channels:
                    raise fail(cls.NAME, f"{what}: example {i + 1} has {got} latent channels, but the model takes "
                                         f"{channels}; encode the targets with this model's VAE")
        total = int(params["steps"])
        with user_errors(cls.NAME, {"low/high": "keep_min/keep_max"}):
            trainer = LoraTrainer(
                model, LoraConfig(rank=int(params["rank"]), alpha=float(params["alpha"]), targets=params["targets"]),
                TrainConfig(steps=total, learning_rate=float(params["learning_rate"]),
                            keep_ratios=KeepRatioDistribution(low=params["keep_min"], high=params["keep_max"],
                                                              dense_share=params["dense_share"]),
                            seed=int(params["seed"]), recommended_keep_ratio=float(params["recommended_keep_ratio"]),
                            gradient_checkpointing=bool(params["gradient_checkpointing"])))
        root = os.path.join(folder_paths.get_output_directory(), CHECKPOINTS)
        folder, filename, _, _, _ = folder_paths.get_save_image_path(params["filename_prefix"], root)  # stays inside
        checkpoints = Path(folder) / filename
        resumed = latest_checkpoint(checkpoints) if params["resume"] else None
        if resumed is not None:
            with user_errors(cls.NAME):
                trainer.load_checkpoint(resumed)
        bar = comfy.utils.ProgressBar(total)
        bar.update_absolute(min(trainer.step, total), total)
        preview_every = max(1, total // 50)

        def progress(step: int, loss: float) -> None:  # ComfyUI's bar; raises if the user cancels the run
            preview = None
            if step % preview_every == 0 or step == total:
                preview = ("PNG", curves_image(trainer.losses, trainer.validation), 640)
            bar.update_absolute(step, total, preview)

        every = int(params["checkpoint_every"])
        try:
            with user_errors(cls.NAME):
                trainer.fit(examples, callback=progress, checkpoint_every=every, checkpoint_dir=checkpoints,
                            validation=validation, validate_every=int(params["validate_every"]))
        except comfy.model_management.InterruptProcessingException:
            if every:
                trainer.save_checkpoint(checkpoints / f"checkpoint_{trainer.step:06d}.safetensors")
            raise
        _check_trained(cls.NAME, trainer, params)

        folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(params["filename_prefix"], loras_dir)
        name = f"{filename}_{counter:05}_.safetensors"
        path = trainer.save(os.path.join(folder, name), dtype=SAVE_DTYPES[params["save_dtype"]])
        sd, meta = load_lora_file(path)  # the model output uses exactly what the loader will read
        patched = apply_lora(model, sd, 1.0)
        lora_name = os.path.join(subfolder, name) if subfolder else name
        curves = image_tensor(curves_image(trainer.losses, trainer.validation))
        text = (f"Saved output/loras/{lora_name} after {trainer.step} steps"
                + (f" (resumed from {resumed.name})" if resumed is not None else "")
                + (f"; loss {trainer.losses[0]:.4f} -> {trainer.losses[-1]:.4f}" if trainer.losses else ""))
        if trainer.validation:
            first, last = trainer.validation[0], trainer.validation[-1]
            text += (f". Validation ({'held-out' if held_out else 'training'} examples), one-step x0 PSNR dense "
                     f"{first['dense_psnr']:.2f} -> {last['dense_psnr']:.2f} dB, keep {last['keep']:g} "
                     f"{first['sparse_psnr']:.2f} -> {last['sparse_psnr']:.2f} dB")
        text += f". {meta.summary()}"
        return io.NodeOutput(patched, lora_name, float(meta.recommended_keep_ratio), curves,
                             ui={"text": (text,), **ui.PreviewImage(curves, cls=cls).as_dict()})


class SparseContextSaveTrainingExample(SparseNode):
    NAME = "Save Sparse Context Training Example"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SparseContextSaveTrainingExample", display_name=cls.NAME, category="SparseContext/training",
            description="Writes training examples for scripts/train_lora.py: one safetensors file per target latent "
                        "row with its reference latents, text context and pooled vector (see training/examples.py).",
            is_output_node=True, is_experimental=True,
            inputs=[
                io.Latent.Input("latent", tooltip="Target latent(s): VAE Encode of the wanted result."),
                io.Conditioning.Input("conditioning", tooltip="Text conditioning with the reference latents attached "
                                                              "(ReferenceLatent)."),
                io.String.Input("filename_prefix", default="sparse_context_examples/example",
                                tooltip="Prefix under the output folder; point train_lora.py --data at that folder."),
                io.String.Input("prompt", default="", multiline=True,
                                tooltip="Optional: the prompt text, stored in the file's metadata for reference."),
            ],
            outputs=[io.String.Output(display_name="paths", tooltip="The written files, one per line.")],
        )

    @classmethod
    def validate_inputs(cls, filename_prefix=None) -> bool | str:
        """Queue time: the output path (the one input core cannot check; see nodes/common.py)."""
        problem = prefix_problem(filename_prefix, folder_paths.get_output_directory(), "training examples")
        return f"{cls.NAME}: {problem}" if problem else True

    @classmethod
    def execute(cls, latent, conditioning, filename_prefix: str, prompt: str = "") -> io.NodeOutput:
        out_dir = folder_paths.get_output_directory()
        problem = prefix_problem(filename_prefix, out_dir, "training examples")
        if problem:
            raise fail(cls.NAME, problem)
        if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
            raise fail(cls.NAME, f"latent: expected a LATENT, got {type(latent).__name__}")
        with user_errors(cls.NAME, example_names("latent")):
            examples = examples_from_comfy(latent, conditioning)
        folder, filename, counter, _, _ = folder_paths.get_save_image_path(filename_prefix, out_dir)
        paths = []
        for i, example in enumerate(examples):
            path = os.path.join(folder, f"{filename}_{counter + i:05}_.safetensors")
            # own copies: a target also wired as a reference shares its memory, which safetensors refuses
            save_example(path, example.detached(), prompt=prompt or None)
            paths.append(path)
        text = "\n".join(paths)
        return io.NodeOutput(text, ui={"text": (text,)})


TRAINING_NODES = [SparseContextTrainLora, SparseContextSaveTrainingExample]
