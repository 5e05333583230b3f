"""Load Sparse Context LoRA: a drop-robust LoRA from the ``loras`` folder, applied by core's LoRA code.

The file is read only as safetensors (``.safetensors`` / ``.sft``, with ``comfy.utils.load_torch_file(...,
safe_load=True)`` after its header was checked); pickle-based files are refused unread, and so are files with
NaN/inf weights or an out-of-range recommended keep ratio (``training.lora_file.load_lora_file``). The LoRA's
metadata (base model family, training drop ratios, recommended keep ratio) is shown on the node, and the
recommended keep ratio is an output that can drive Apply Sparse Context's ``keep_ratio``.
"""

from __future__ import annotations

import logging

import folder_paths
from comfy_api.latest import io, ui

from ..training.family import FAMILIES, base_family
from ..training.lora_file import apply_lora, load_lora_file, match_lora
from .common import SparseNode, fail

log = logging.getLogger("SparseContext")

#: Keep ratio output for a LoRA that carries no Sparse Context metadata: it was not trained with
#: dropping, so the safe recommendation is dense references.
DEFAULT_KEEP_RATIO = 1.0


class SparseContextLoraLoader(SparseNode):
    NAME = "Load Sparse Context LoRA"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SparseContextLoraLoader", display_name=cls.NAME, category="SparseContext/model",
            description="Loads a drop-robust Sparse Context LoRA (safetensors only) from the loras folder through "
                        "core's LoRA loader, checks that it was trained for this base model, shows its metadata and "
                        "outputs the keep ratio it recommends for Apply Sparse Context.",
            inputs=[
                io.Model.Input("model", tooltip="The base diffusion model (FLUX.1 Kontext, FLUX.2 or Qwen-Image-Edit)."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="A LoRA file from the loras folder (trained LoRAs land in output/loras, "
                                       "which ComfyUI also lists). Only safetensors files (.safetensors, .sft) are loaded."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="How strongly the LoRA modifies the model (1.0 = as trained)."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the LoRA applied."),
                io.Float.Output(display_name="keep_ratio",
                                tooltip="The keep ratio the LoRA recommends; connect it to Apply Sparse Context's "
                                        "keep_ratio (1.0 for a LoRA without Sparse Context metadata)."),
                io.String.Output(display_name="info", tooltip="The LoRA's metadata and how many keys matched."),
            ],
        )

    @classmethod
    def execute(cls, model, lora_name: str, strength: float) -> io.NodeOutput:
        cls.check_inputs(locals())
        path = folder_paths.get_full_path("loras", lora_name)
        if path is None:
            raise fail(cls.NAME, f"lora_name: {lora_name!r} is not in the loras folder")
        try:
            sd, meta = load_lora_file(path)
        except ValueError as err:
            raise fail(cls.NAME, f"lora_name: {err}") from err
        try:
            family, family_name, _ = base_family(model)
        except ValueError as err:
            raise fail(cls.NAME, str(err)) from err
        if meta.family is not None and meta.family != family:
            trained = next((v[1] for v in FAMILIES.values() if v[0] == meta.family), meta.family)
            raise fail(cls.NAME, f"lora_name: {lora_name} was trained for {trained}, but the model is {family_name}; "
                                 "pick the LoRA trained for this base model")
        match = match_lora(model, sd)
        if not match.ok:
            problems = match.shape_errors[:3] + [f"{m}: no such layer in the model" for m in match.missing[:3]]
            raise fail(cls.NAME, f"lora_name: {lora_name} does not fit this model ({len(match.matched)} layers matched, "
                                 f"{len(match.missing)} missing, {len(match.shape_errors)} with other shapes; e.g. "
                                 f"{'; '.join(problems) or 'no layers at all'}). Is it a LoRA for another model size?")
        patched = apply_lora(model, sd, strength) if strength != 0 else model
        keep = meta.recommended_keep_ratio if meta.recommended_keep_ratio is not None else DEFAULT_KEEP_RATIO
        info = (f"{lora_name}: {len(match.matched)} layers matched, 0 missing; strength {strength:g}. "
                f"{meta.summary()}. Keep ratio output: {keep:g}.")
        log.info("SparseContext: %s", info)
        return io.NodeOutput(patched, float(keep), info, ui=ui.PreviewText(info))
