"""Regenerates the example workflows (UI format here, API format in tests/workflows_api/).

Dev tool, not part of the node pack: ``.venv/bin/python scripts/build_workflows.py`` (run from any
folder) starts ComfyUI with the pack, reads ``/object_info`` for the sockets and widget order of every
node, and writes the JSON pairs. Edit the graphs here, never the JSON by hand.

Each workflow is saved as the oldest ComfyUI that has its core nodes saves it (``SAVED_WITH``): the
FLUX/Qwen ones as 0.3.75 (the pinned host), the families added in 0.29-0.30 as 0.30.0. Core nodes say so
in ``properties.ver``; newer ComfyUI versions load them as they load any older workflow (new widgets get
their defaults, new output slots are added), and the tests check each host does. So a run builds the
workflows saved with the ComfyUI it runs against (``COMFYUI_PATH``), and refuses any other version:
    .venv/bin/python scripts/build_workflows.py                                  # 0.3.75 ones
    COMFYUI_PATH=<ComfyUI 0.30.0> <its python> scripts/build_workflows.py        # 0.30.0 ones
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from packload import load_harness  # scripts/ is on sys.path when this file runs

REPO = Path(__file__).resolve().parents[1]
HF = "https://huggingface.co"
PACK = {"cnr_id": "sparse-context", "ver": "0.1.0"}
SPARSE_COLOR = "#2a4d3a"
MODELS = {  # file -> (url, models/ folder), as the official templates list them
    "flux1-kontext-dev.safetensors":  # the bf16 original (gated: accept the license on Hugging Face first)
        (f"{HF}/black-forest-labs/FLUX.1-Kontext-dev/resolve/main/flux1-kontext-dev.safetensors", "diffusion_models"),
    "flux1-dev-kontext_fp8_scaled.safetensors":
        (f"{HF}/Comfy-Org/flux1-kontext-dev_ComfyUI/resolve/main/split_files/diffusion_models/"
         "flux1-dev-kontext_fp8_scaled.safetensors", "diffusion_models"),
    "clip_l.safetensors": (f"{HF}/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors", "text_encoders"),
    "t5xxl_fp8_e4m3fn_scaled.safetensors":
        (f"{HF}/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp8_e4m3fn_scaled.safetensors", "text_encoders"),
    "ae.safetensors": (f"{HF}/Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/split_files/vae/ae.safetensors", "vae"),
    "flux-2-klein-9b-fp8.safetensors":
        (f"{HF}/black-forest-labs/FLUX.2-klein-9b-fp8/resolve/main/flux-2-klein-9b-fp8.safetensors", "diffusion_models"),
    "qwen_3_8b_fp8mixed.safetensors":
        (f"{HF}/Comfy-Org/flux2-klein-9B/resolve/main/split_files/text_encoders/qwen_3_8b_fp8mixed.safetensors",
         "text_encoders"),
    "flux2-vae.safetensors": (f"{HF}/Comfy-Org/flux2-dev/resolve/main/split_files/vae/flux2-vae.safetensors", "vae"),
    "qwen_image_edit_2509_fp8_e4m3fn.safetensors":
        (f"{HF}/Comfy-Org/Qwen-Image-Edit_ComfyUI/resolve/main/split_files/diffusion_models/"
         "qwen_image_edit_2509_fp8_e4m3fn.safetensors", "diffusion_models"),
    "qwen_2.5_vl_7b_fp8_scaled.safetensors":
        (f"{HF}/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors",
         "text_encoders"),
    "qwen_image_vae.safetensors":
        (f"{HF}/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/vae/qwen_image_vae.safetensors", "vae"),
    "Qwen-Image-Edit-2509-Lightning-4steps-V1.0-bf16.safetensors":
        (f"{HF}/lightx2v/Qwen-Image-Lightning/resolve/main/Qwen-Image-Edit-2509/"
         "Qwen-Image-Edit-2509-Lightning-4steps-V1.0-bf16.safetensors", "loras"),
    # the families added in ComfyUI 0.29-0.30, as their official templates list them
    "mage_flow_edit_turbo_int8_convrot.safetensors":
        (f"{HF}/Comfy-Org/Mage-Flow/resolve/main/diffusion_models/mage_flow_edit_turbo_int8_convrot.safetensors",
         "diffusion_models"),
    "qwen3vl_4b_bf16.safetensors": (f"{HF}/Comfy-Org/Mage-Flow/resolve/main/text_encoders/qwen3vl_4b_bf16.safetensors",
                                    "text_encoders"),
    "mage_flow_vae_bf16.safetensors": (f"{HF}/Comfy-Org/Mage-Flow/resolve/main/vae/mage_flow_vae_bf16.safetensors", "vae"),
    "krea2_turbo_int8_convrot.safetensors":
        (f"{HF}/Comfy-Org/Krea-2/resolve/main/diffusion_models/krea2_turbo_int8_convrot.safetensors", "diffusion_models"),
    "krea2_style_reference.safetensors": (f"{HF}/Comfy-Org/Krea-2/resolve/main/loras/krea2_style_reference.safetensors",
                                          "loras"),
    "qwen3vl_4b_fp8_scaled.safetensors":
        (f"{HF}/Comfy-Org/Krea-2/resolve/main/text_encoders/qwen3vl_4b_fp8_scaled.safetensors", "text_encoders"),
    "qwen_image_vae_krea2.safetensors": (f"{HF}/Comfy-Org/Krea-2/resolve/main/vae/qwen_image_vae.safetensors", "vae"),
    "z_image_bf16.safetensors":
        (f"{HF}/Comfy-Org/z_image/resolve/main/split_files/diffusion_models/z_image_bf16.safetensors", "diffusion_models"),
    "qwen_3_4b.safetensors":
        (f"{HF}/Comfy-Org/z_image_turbo/resolve/main/split_files/text_encoders/qwen_3_4b.safetensors", "text_encoders"),
    "ae_z_image.safetensors": (f"{HF}/Comfy-Org/z_image_turbo/resolve/main/split_files/vae/ae.safetensors", "vae"),
    "joyai_image_edit_int8_convrot.safetensors":
        (f"{HF}/Comfy-Org/JoyAI-Image-Edit/resolve/main/diffusion_models/joyai_image_edit_int8_convrot.safetensors",
         "diffusion_models"),
    "qwen3vl_8b_joyimage_edit_int8_convrot.safetensors":
        (f"{HF}/Comfy-Org/JoyAI-Image-Edit/resolve/main/text_encoders/qwen3vl_8b_joyimage_edit_int8_convrot.safetensors",
         "text_encoders"),
    "wan_2.1_vae.safetensors": (f"{HF}/Comfy-Org/JoyAI-Image-Edit/resolve/main/vae/wan_2.1_vae.safetensors", "vae"),
    "longcat_image_edit_bf16.safetensors":
        (f"{HF}/TalmajM/LongCat-Image-Edit_ComfyUI_repackaged/resolve/main/split_files/diffusion_models/"
         "longcat_image_edit_bf16.safetensors", "diffusion_models"),
}
#: Files that two templates publish under one name from different repositories: the key above is unique, the
#: file the loader widget asks for is this one.
FILE_NAME = {"qwen_image_vae_krea2.safetensors": "qwen_image_vae.safetensors",
             "ae_z_image.safetensors": "ae.safetensors"}

NODES_HELP = """## SparseContext nodes
- **Apply Sparse Context** (model): reference images keep only some of their tokens, at their original positions.
  `keep_ratio` is the default share kept; `total_tokens` > 0 shares one budget across all references; `enabled` off =
  the dense model. After each run it shows the kept tokens, the attention work and the sampling time on the node
  (and in the console: `SparseContext: kept reference tokens ...`).
- **Sparse Reference Latent**: the core Reference Latent plus a `selection` for that reference.
- **Bind Sparse Selections**: selections for references another node encoded (Qwen's text encoder), in order.
- **Selectors**: Edge (editing, keeps outlines + an even floor), Mask (painted region first), Saliency (subjects),
  Grid / Random (content-blind baselines), Combine (mix or max of several).
- **Sparse Budget**: ratio, count, or adaptive (busy images keep more); coverage -1 = the selector's default floor.
- **Preview Sparse Tokens**: the reference with kept tokens bright and the kept count.
"""
EDIT_EVIDENCE = ("in our natural-image measurements (README), with even coverage (Grid: disconnect the selection and "
                 "Apply Sparse Context's `rule` grid is used), keep 0.5 cost about 6 dB with the drop-robust fine-tune "
                 "and 15 dB without it on the better-trained model (1 and 3 dB on a weaker one), keep 0.25 about 9 dB "
                 "with it; edge-first selections lost up to 3 dB more. Load the LoRA (Load Sparse Context LoRA; train "
                 "one with `sparse_train_lora`) before going lower, and check your model with `sparse_calibrate_keep`.")
MULTI_EVIDENCE = ("The keep ratio is a starting point: in our measurements (README) every keep below 1 lost quality "
                  "(keep 0.5: about 5-6.5 dB with the drop-robust fine-tune, 13-18 dB without it, on the better-trained "
                  "model); check yours with `sparse_calibrate_keep`.")
COMPARE = ("**Compare with dense**: set `enabled` of Apply Sparse Context to false and queue again (the seed is fixed, "
           "so only the token dropping differs), or "
           "open `sparse_dense_vs_sparse`. Lower `keep_ratio` if it is still slow, raise it if details drift.")


def _models(*names: str) -> dict:
    return {"models": [{"name": FILE_NAME.get(n, n), "url": MODELS[n][0], "directory": MODELS[n][1]} for n in names]}


def _load_convert():
    spec = importlib.util.spec_from_file_location("sc_workflow_convert", REPO / "tests/harness/workflow_convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Graph:
    def __init__(self, convert, info, core_version: str):
        self.wf = convert.UIWorkflow(info)
        self.core_properties = {"cnr_id": "comfy-core", "ver": core_version}

    def core(self, kind, col, widgets=(), **kw):
        return self.wf.add(kind, col, list(widgets), properties={**self.core_properties, **kw.pop("properties", {})},
                           **kw)

    def loader(self, kind: str, col: int, file: str, *widgets) -> int:
        """A model loader with the file's download link (``properties.models``), as the official templates have."""
        return self.core(kind, col, [FILE_NAME.get(file, file), *widgets], properties=_models(file))

    def sparse(self, kind, col, widgets=(), **kw):
        return self.wf.add(kind, col, list(widgets), properties=dict(PACK), color=SPARSE_COLOR, **kw)

    def note(self, col, text, height):
        return self.wf.add("MarkdownNote", col, [text], height=height)

    def guide(self, text: str, height: int) -> int:
        """The workflow's note: ``text``, then how to compare with dense and the nodes' help."""
        return self.note(0, text + "\n\n" + COMPARE + "\n\n" + NODES_HELP, height)

    def wire(self, *edges):
        for src, out, dst, name in edges:
            self.wf.link(src, out, dst, name)


def kontext_loaders(g: Graph, col: int = 0, unet_file: str = "flux1-dev-kontext_fp8_scaled.safetensors",
                    weight_dtype: str = "default") -> tuple[int, int, int]:
    unet = g.loader("UNETLoader", col, unet_file, weight_dtype)
    clip = g.core("DualCLIPLoader", col, ["clip_l.safetensors", "t5xxl_fp8_e4m3fn_scaled.safetensors", "flux", "default"],
                  properties=_models("clip_l.safetensors", "t5xxl_fp8_e4m3fn_scaled.safetensors"))
    vae = g.loader("VAELoader", col, "ae.safetensors")
    return unet, clip, vae


def loaders(g: Graph, unet_file: str, clip_file: str, clip_type: str, vae_file: str) -> tuple[int, int, int]:
    """UNETLoader, CLIPLoader and VAELoader in column 0."""
    return (g.loader("UNETLoader", 0, unet_file, "default"), g.loader("CLIPLoader", 0, clip_file, clip_type, "default"),
            g.loader("VAELoader", 0, vae_file))


def kontext_edit(g: Graph, prompt: str, selection_col: int = 2) -> dict:
    """Loaders, image, prompt and conditioning of a single-reference Kontext edit; returns node ids."""
    unet, clip, vae = kontext_loaders(g)
    image = g.core("LoadImage", 1, ["example.png", "image"], height=330)
    scale = g.core("FluxKontextImageScale", 1)
    text = g.core("CLIPTextEncode", 2, [prompt])
    encode = g.core("VAEEncode", 2)
    zero = g.core("ConditioningZeroOut", 3)
    g.wire((clip, 0, text, "clip"), (image, 0, scale, "image"), (scale, 0, encode, "pixels"), (vae, 0, encode, "vae"),
           (text, 0, zero, "conditioning"))
    return dict(unet=unet, clip=clip, vae=vae, image=image, scale=scale, text=text, encode=encode, zero=zero)


APPLY = [0.5, "grid", 0, 64, 0.0, 1.0, 0, True, "off", 4096.0]  # Apply Sparse Context: keep 0.5, no cache


def apply_and_preview(g: Graph, model: int, image: int, selection: int, col: int = 3) -> int:
    """Apply Sparse Context (keep 0.5) on ``model``, and the kept tokens of ``selection`` on ``image``."""
    apply = g.sparse("SparseContextApply", col, APPLY)
    preview = g.sparse("SparseContextPreview", 1, [64, 1, 0, 0.5], height=380)
    g.wire((model, 0, apply, "model"), (image, 0, preview, "image"), (selection, 0, preview, "selection"))
    return apply


def sparse_reference(g: Graph, n: dict, selection: int) -> int:
    """Sparse Reference Latent: the Kontext edit's encoded image as the reference of its prompt, with ``selection``."""
    ref = g.sparse("SparseContextReferenceLatent", 3)
    g.wire((n["text"], 0, ref, "conditioning"), (n["encode"], 0, ref, "latent"), (selection, 0, ref, "selection"))
    return ref


def sample_kontext(g: Graph, n: dict, model: int, positive: int, col: int, seed: int, prefix: str):
    # fixed seeds: every note tells the user to compare with dense at the same seed
    guidance = g.core("FluxGuidance", col, [2.5])
    sampler = g.core("KSampler", col, [seed, "fixed", 20, 1.0, "euler", "simple", 1.0])
    decode = g.core("VAEDecode", col + 1)
    g.wire((positive, 0, guidance, "conditioning"), (model, 0, sampler, "model"), (guidance, 0, sampler, "positive"),
           (n["zero"], 0, sampler, "negative"), (n["encode"], 0, sampler, "latent_image"),
           (sampler, 0, decode, "samples"), (n["vae"], 0, decode, "vae"))
    if prefix:
        save = g.core("SaveImage", col + 1, [prefix], height=400)
        g.wire((decode, 0, save, "images"))
    return decode


def sparse_kontext_run(g: Graph, n: dict, selection: int, prefix: str) -> None:
    """The Kontext edit's reference with ``selection``, Apply Sparse Context (keep 0.5), preview, sampler, save."""
    ref = sparse_reference(g, n, selection)
    sample_kontext(g, n, apply_and_preview(g, n["unet"], n["scale"], selection, col=4), ref, 4, 0, prefix)


def kontext_edge(g: Graph) -> None:
    n = kontext_edit(g, "Change the jacket to bright red leather, keep everything else the same.")
    budget = g.sparse("SparseContextBudget", 2, ["ratio", 0.5, 1024, 0.8, 0.05, 0.5, -1.0])
    edge = g.sparse("SparseContextEdgeSelector", 3, [0.1, 0.2, 1, 1.0])
    g.wire((n["scale"], 0, edge, "image"), (budget, 0, edge, "budget"))
    sparse_kontext_run(g, n, edge, "SparseContext_kontext_edge")
    g.guide("# FLUX.1 Kontext edit, Edge selector\nThe reference keeps **50 %** of its tokens: the ones with the most "
            "Canny edges plus an even floor (Sparse Budget coverage -1 = the edge selector's 25 % floor), so outlines, "
            "faces and text stay sharp. An aligned edit copies every token it does not change, so it needs more "
            "tokens than a subject: " + EDIT_EVIDENCE, 660)


def masked_edit(g: Graph) -> None:
    n = kontext_edit(g, "Replace the masked area with a bouquet of sunflowers.")
    mask = g.sparse("SparseContextMaskSelector", 2, [1.0, 0.0, 1, 2, 1.0])
    edge = g.sparse("SparseContextEdgeSelector", 2, [0.1, 0.2, 1, 1.0])
    combine = g.sparse("SparseContextCombineSelections", 3, [1.0, 0.5, 1.0, 1.0, "max", 1.0])
    budget = g.sparse("SparseContextBudget", 3, ["ratio", 0.5, 1024, 0.8, 0.05, 0.5, -1.0])
    g.wire((n["image"], 1, mask, "mask"), (n["scale"], 0, edge, "image"), (mask, 0, combine, "selection_a"),
           (edge, 0, combine, "selection_b"), (budget, 0, combine, "budget"))
    sparse_kontext_run(g, n, combine, "SparseContext_masked_edit")
    g.guide("# Masked edit (spatially aligned), Mask selector\nPaint the region to edit on **Load Image** (right "
            "click > Open in MaskEditor). The reference keeps every token of the painted region (grown by 1 token, "
            "feathered over 2) first, then the strongest edges elsewhere at half weight (Combine, mode max), within "
            "a 50 % budget. An empty mask stops with a clear message. Everything outside the mask is copied, so "
            "keep enough of it: " + EDIT_EVIDENCE, 620)


def klein_multi(g: Graph) -> None:
    unet, clip, vae = loaders(g, "flux-2-klein-9b-fp8.safetensors", "qwen_3_8b_fp8mixed.safetensors", "flux2",
                              "flux2-vae.safetensors")
    text = g.core("CLIPTextEncode", 1, ["The woman from image 1 wears the jacket from image 2 and holds the cup from "
                                        "image 3, standing in a sunny street."])
    cond, first_image, first_sel = text, None, None
    for i in range(3):
        image = g.core("LoadImage", 2, ["example.png", "image"], height=330, title=f"Reference {i + 1}")
        scale = g.core("ImageScaleToTotalPixels", 3, ["lanczos", 1.0])
        encode = g.core("VAEEncode", 3)
        sal = g.sparse("SparseContextSaliencySelector", 3, [1.0, 1.0])
        ref = g.sparse("SparseContextReferenceLatent", 4)
        g.wf.skip(3, 60)
        g.wire((image, 0, scale, "image"), (scale, 0, encode, "pixels"), (vae, 0, encode, "vae"),
               (scale, 0, sal, "image"), (cond, 0, ref, "conditioning"), (encode, 0, ref, "latent"),
               (sal, 0, ref, "selection"))
        cond = ref
        if i == 0:
            first_image, first_sel = scale, sal
    apply = g.sparse("SparseContextApply", 5, [0.25, "grid", 3072, 64, 0.0, 1.0, 0, True, "off", 4096.0])
    noise = g.core("RandomNoise", 5, [0, "fixed"])
    select = g.core("KSamplerSelect", 5, ["euler"])
    sched = g.core("Flux2Scheduler", 5, [4, 1024, 1024])
    guider = g.core("BasicGuider", 5)
    latent = g.core("EmptyFlux2LatentImage", 5, [1024, 1024, 1])
    sampler = g.core("SamplerCustomAdvanced", 6)
    decode = g.core("VAEDecode", 6)
    save = g.core("SaveImage", 6, ["SparseContext_klein_multi"], height=400)
    preview = g.sparse("SparseContextPreview", 1, [64, 1, 0, 0.25], height=380)
    g.wire((clip, 0, text, "clip"), (unet, 0, apply, "model"), (apply, 0, guider, "model"), (cond, 0, guider, "conditioning"),
           (noise, 0, sampler, "noise"), (guider, 0, sampler, "guider"), (select, 0, sampler, "sampler"),
           (sched, 0, sampler, "sigmas"), (latent, 0, sampler, "latent_image"), (sampler, 0, decode, "samples"),
           (vae, 0, decode, "vae"), (decode, 0, save, "images"), (first_image, 0, preview, "image"),
           (first_sel, 0, preview, "selection"))
    g.guide("# FLUX.2 [klein] 9B, three references, Saliency + one shared budget\nEach reference keeps its most "
            "salient tokens (the subject, not the plain background). `total_tokens` = 3072 is ONE budget for all "
            "three 1 MP references (3 x 4096 tokens -> 25 %), split by how much salient content each has "
            "(`weight` on a selector gives it a bigger share). More references = bigger speed-up: attention grows "
            "with the square of the sequence. Needs a ComfyUI with FLUX.2 klein support; the 4B model works the "
            "same (use qwen_3_4b). " + MULTI_EVIDENCE, 660)


def qwen_2509(g: Graph) -> None:
    unet, clip, vae = loaders(g, "qwen_image_edit_2509_fp8_e4m3fn.safetensors", "qwen_2.5_vl_7b_fp8_scaled.safetensors",
                              "qwen_image", "qwen_image_vae.safetensors")
    lora = g.loader("LoraLoaderModelOnly", 0, "Qwen-Image-Edit-2509-Lightning-4steps-V1.0-bf16.safetensors", 1.0)
    images = [g.core("LoadImage", 1, ["example.png", "image"], height=330, title=f"Image {i + 1}") for i in range(3)]
    scale = g.core("FluxKontextImageScale", 2)
    pos = g.core("TextEncodeQwenImageEditPlus", 2, ["The person in image 1 wears the hat from image 2 and holds the "
                                                    "bag from image 3."])
    neg = g.core("TextEncodeQwenImageEditPlus", 2, [""])
    encode = g.core("VAEEncode", 2)
    edge = g.sparse("SparseContextEdgeSelector", 3, [0.1, 0.2, 1, 1.0])
    sal2 = g.sparse("SparseContextSaliencySelector", 3, [1.0, 1.0])
    sal3 = g.sparse("SparseContextSaliencySelector", 3, [1.0, 1.0])
    bind_pos = g.sparse("SparseContextBindSelections", 4)
    bind_neg = g.sparse("SparseContextBindSelections", 4)
    shift = g.core("ModelSamplingAuraFlow", 4, [3.0])
    norm = g.core("CFGNorm", 4, [1.0])
    apply = g.sparse("SparseContextApply", 4, [0.3, "grid", 0, 64, 0.0, 1.0, 0, True, "off", 4096.0])
    sampler = g.core("KSampler", 5, [0, "fixed", 4, 1.0, "euler", "simple", 1.0])
    decode = g.core("VAEDecode", 5)
    save = g.core("SaveImage", 5, ["SparseContext_qwen_2509"], height=400)
    preview = g.sparse("SparseContextPreview", 1, [64, 1, 0, 0.3], height=380)
    g.wire((unet, 0, lora, "model"), (images[0], 0, scale, "image"), (vae, 0, encode, "vae"), (scale, 0, encode, "pixels"),
           (scale, 0, edge, "image"), (images[1], 0, sal2, "image"), (images[2], 0, sal3, "image"),
           (lora, 0, shift, "model"), (shift, 0, norm, "model"), (norm, 0, apply, "model"),
           (apply, 0, sampler, "model"), (bind_pos, 0, sampler, "positive"), (bind_neg, 0, sampler, "negative"),
           (encode, 0, sampler, "latent_image"), (sampler, 0, decode, "samples"), (vae, 0, decode, "vae"),
           (decode, 0, save, "images"), (scale, 0, preview, "image"), (edge, 0, preview, "selection"))
    for enc, bind in ((pos, bind_pos), (neg, bind_neg)):
        g.wire((clip, 0, enc, "clip"), (vae, 0, enc, "vae"), (scale, 0, enc, "image1"), (images[1], 0, enc, "image2"),
               (images[2], 0, enc, "image3"), (enc, 0, bind, "conditioning"), (edge, 0, bind, "selection_1"),
               (sal2, 0, bind, "selection_2"), (sal3, 0, bind, "selection_3"))
    g.guide("# Qwen-Image-Edit-2509, three images, Bind Sparse Selections\nTextEncodeQwenImageEditPlus encodes "
            "image1..3 as references itself, so **Bind Sparse Selections** attaches one selection per image, in "
            "order: Edge for the picture being edited, Saliency for the two subject images; positive and negative "
            "get the same binding. Each reference keeps 30 % (`keep_ratio`). Works with the 4-step Lightning LoRA "
            "(LoRA weights are patched as usual). " + MULTI_EVIDENCE, 660)


def dense_vs_sparse(g: Graph) -> None:
    n = kontext_edit(g, "Change the jacket to bright red leather, keep everything else the same.")
    edge = g.sparse("SparseContextEdgeSelector", 2, [0.1, 0.2, 1, 1.0])
    budget = g.sparse("SparseContextBudget", 2, ["ratio", 0.5, 1024, 0.8, 0.05, 0.5, -1.0])
    ref = g.sparse("SparseContextReferenceLatent", 3)
    dense = g.sparse("SparseContextApply", 4, [0.5, "grid", 0, 64, 0.0, 1.0, 0, False, "off", 4096.0], title="Dense (enabled = false)")
    sparse = g.sparse("SparseContextApply", 6, [0.5, "grid", 0, 64, 0.0, 1.0, 0, True, "off", 4096.0], title="Sparse (keep 50 %)")
    preview = g.sparse("SparseContextPreview", 1, [64, 1, 0, 0.5], height=380)
    g.wire((budget, 0, edge, "budget"), (n["scale"], 0, edge, "image"), (n["text"], 0, ref, "conditioning"),
           (n["encode"], 0, ref, "latent"), (edge, 0, ref, "selection"), (n["unet"], 0, dense, "model"),
           (n["unet"], 0, sparse, "model"), (n["scale"], 0, preview, "image"), (edge, 0, preview, "selection"))
    dense_img = sample_kontext(g, n, dense, ref, 4, 42, "")
    sparse_img = sample_kontext(g, n, sparse, ref, 6, 42, "")
    stitch = g.core("ImageStitch", 8, ["right", True, 16, "white"])
    save = g.core("SaveImage", 8, ["SparseContext_dense_vs_sparse"], height=400)
    g.wire((dense_img, 0, stitch, "image1"), (sparse_img, 0, stitch, "image2"), (stitch, 0, save, "images"))
    g.note(0, "# Dense vs sparse, same seed\nThe same model, prompt, reference and seed (42, fixed) run twice: left "
              "**dense** (Apply Sparse Context with `enabled` = false, the unchanged model), right **sparse** (edge "
              "selection, 50 % of the reference tokens). The saved image puts them side by side. An aligned edit like "
              "this needs enough tokens: " + EDIT_EVIDENCE + "\n\n**Timings**: after "
              "the run each Apply node shows `Sampling took N s` for its own sampler, plus the kept tokens and the "
              "attention work (% of dense); the console prints the same lines (`SparseContext (node ...)`). Compare the "
              "two sampling times; the first run also loads the model, so queue twice and read the second.\n\n"
              + NODES_HELP, 700)


CALIBRATE_NOTE = """# Calibrate the keep ratio on your own model
**Sparse Context Calibrate** samples a short schedule (4 steps, seed 42, fixed) dense and at keep 0.1 / 0.25 / 0.5 / 0.75 with
this model, prompt and reference, decodes each result and compares it with the dense one. Its `keep_ratio` output is the
lowest keep whose result stays within **30 dB PSNR** of dense (`min_psnr`; add `min_ssim` for a second condition), and it
drives Apply Sparse Context below. The plot shows quality and seconds per step against the keep ratio.

Calibration costs about five short runs; ComfyUI caches it, so it runs again only when the model, prompt, reference, seed
or thresholds change. Once you know the value, type it into Apply Sparse Context and delete the Calibrate node.
30 dB is close to invisible; in our natural-image replication every keep below 1 cost quality on the better-trained
model, aligned edits the most (see the README's recommendations).
"""

TRAIN_NOTE = """# Train a drop-robust Sparse Context LoRA (FLUX.1 Kontext)
Fine-tunes a LoRA while **randomly dropping reference tokens** (a keep ratio drawn per step between `keep_min` and `keep_max`, plus `dense_share` fully dense steps), through the same patch Apply Sparse Context uses, so the model learns to work from any subset of the reference.

**Data**: one example = reference image (left) + the wanted result (target, same size) + the instruction prompt. This graph trains on ONE pair (a quick test / style lock-in); for real datasets use `scripts/train_lora.py` on a folder of examples (images + captions, or files from **Save Sparse Context Training Example**).

**Model**: the bf16 Kontext file loaded with `weight_dtype` fp8_e4m3fn (half the memory; the LoRA trains against the fp8 weights). GGUF and other quantized formats cannot be trained through: the node says so before the first step.

**Feedback**: the node's progress bar previews the loss and validation curves while it trains (`validate_every`: PSNR of the one-step estimate, dense vs keep 0.25; connect `validation_latents` + `validation_conditioning` for held-out examples); the `curves` output shows them at the end. `checkpoint_every` saves resumable checkpoints (also when you cancel); `resume` continues from the newest.

**Output**: the LoRA goes to `output/loras/sparse_context/` (ComfyUI lists it as a LoRA); the MODEL output already has it applied. Later, load it with **Load Sparse Context LoRA**, whose `keep_ratio` output can drive Apply Sparse Context.

**Memory**: `gradient_checkpointing` (on) keeps only each block's inputs for the backward; see the README's training memory table. 500 steps is a first useful run.
"""


def train_lora(g: Graph) -> None:
    unet, clip, vae = kontext_loaders(g, unet_file="flux1-kontext-dev.safetensors", weight_dtype="fp8_e4m3fn")
    ref_img = g.core("LoadImage", 1, ["example.png", "image"], height=330, title="Reference image")
    ref_scale = g.core("FluxKontextImageScale", 1)
    tgt_img = g.core("LoadImage", 1, ["example.png", "image"], height=330, title="Target image (the wanted result)")
    tgt_scale = g.core("FluxKontextImageScale", 1)
    text = g.core("CLIPTextEncode", 2, ["Change the jacket to bright red leather, keep everything else the same."])
    ref_enc = g.core("VAEEncode", 2)
    tgt_enc = g.core("VAEEncode", 2)
    ref = g.core("ReferenceLatent", 3)
    zero = g.core("ConditioningZeroOut", 3)
    train = g.sparse("SparseContextTrainLora", 4, [500, 0.0001, 16, 16.0, "attention_mlp", 0.1, 1.0, 0.1, 0.25, 0, "fixed",
                                                   "bf16", "sparse_context/drop_robust_lora", True, 50, 100, False])
    curve = g.core("PreviewImage", 4, height=330)
    apply = g.sparse("SparseContextApply", 5, [0.25, "grid", 0, 64, 0.0, 1.0, 0, True, "off", 4096.0])
    g.wire((clip, 0, text, "clip"), (ref_img, 0, ref_scale, "image"), (tgt_img, 0, tgt_scale, "image"),
           (ref_scale, 0, ref_enc, "pixels"), (vae, 0, ref_enc, "vae"), (tgt_scale, 0, tgt_enc, "pixels"),
           (vae, 0, tgt_enc, "vae"), (text, 0, ref, "conditioning"), (ref_enc, 0, ref, "latent"),
           (text, 0, zero, "conditioning"), (unet, 0, train, "model"), (tgt_enc, 0, train, "latents"),
           (ref, 0, train, "conditioning"), (train, 3, curve, "images"), (train, 0, apply, "model"))
    n = dict(vae=vae, zero=zero, encode=ref_enc)
    sample_kontext(g, n, apply, ref, 5, 0, "SparseContext_trained_lora")
    g.note(0, TRAIN_NOTE, 520)


def calibrate(g: Graph) -> None:
    n = kontext_edit(g, "Change the jacket to bright red leather, keep everything else the same.")
    edge = g.sparse("SparseContextEdgeSelector", 2, [0.1, 0.2, 1, 1.0])
    ref = g.sparse("SparseContextReferenceLatent", 3)
    guidance = g.core("FluxGuidance", 3, [2.5])
    calib = g.sparse("SparseContextCalibrate", 4, [42, 30.0, 0.0, "0.1, 0.25, 0.5, 0.75", 4, 1.0, "euler", "simple"],
                     height=420)
    plot = g.core("PreviewImage", 5, height=330)
    report = g.core("PreviewAny", 5, height=220, title="Calibration report")
    apply = g.sparse("SparseContextApply", 4, [0.25, "grid", 0, 64, 0.0, 1.0, 0, True, "off", 4096.0])
    preview = g.sparse("SparseContextPreview", 1, [64, 1, 0, 0.25], height=380)
    g.wire((n["scale"], 0, preview, "image"), (edge, 0, preview, "selection"))
    g.wire((n["scale"], 0, edge, "image"), (n["text"], 0, ref, "conditioning"), (n["encode"], 0, ref, "latent"),
           (edge, 0, ref, "selection"), (ref, 0, guidance, "conditioning"), (n["unet"], 0, calib, "model"),
           (guidance, 0, calib, "positive"), (n["encode"], 0, calib, "latent"), (n["vae"], 0, calib, "vae"),
           (n["zero"], 0, calib, "negative"), (calib, 1, plot, "images"), (calib, 2, report, "source"),
           (n["unet"], 0, apply, "model"))
    g.wf.link_widget(calib, 0, apply, "keep_ratio")
    g.wf.link_widget(calib, 0, preview, "keep_ratio")  # the preview shows the calibrated keep's tokens
    sample_kontext(g, n, apply, ref, 6, 42, "SparseContext_calibrated")
    g.note(0, CALIBRATE_NOTE + "\n" + NODES_HELP, 640)


# -- the families added in ComfyUI 0.29-0.30 (saved as 0.30.0) ---------------------------------------------
NEW_FAMILY = ("Quality at lower keeps is not measured on this model yet: start at 0.5 and check yours with "
              "`sparse_calibrate_keep` (swap its loaders and text encoder for this model's). The reference cache "
              "(`cache` of Apply Sparse Context) works where the README's model table says so.")


def sample_edit(g: Graph, model: int, positive: int, negative: int, latent: tuple[int, int], vae: int, col: int,
                sampler: list, prefix: str, note: str, note_height: int) -> None:
    """KSampler (fixed seed: the notes compare with dense) on ``latent`` = (node, output), VAEDecode, SaveImage,
    and the workflow's note (``note``, then what every new-family note says)."""
    ksampler = g.core("KSampler", col, sampler)
    decode = g.core("VAEDecode", col + 1)
    save = g.core("SaveImage", col + 1, [prefix], height=400)
    g.wire((model, 0, ksampler, "model"), (positive, 0, ksampler, "positive"), (negative, 0, ksampler, "negative"),
           (*latent, ksampler, "latent_image"), (ksampler, 0, decode, "samples"), (vae, 0, decode, "vae"),
           (decode, 0, save, "images"))
    g.guide(note + " " + NEW_FAMILY, note_height)


def bind(g: Graph, col: int, conditioning: tuple[int, int], selections: list[int]) -> int:
    """Bind Sparse Selections on a text encoder's output that already holds the references."""
    node = g.sparse("SparseContextBindSelections", col)
    g.wire((conditioning[0], conditioning[1], node, "conditioning"),
           *[(sel, 0, node, f"selection_{i + 1}") for i, sel in enumerate(selections)])
    return node


def encoded_edit(g: Graph, encoder: str, prompts: tuple[str, str], image: int, image_input: str, clip: int,
                 vae: int, widgets: tuple = ()) -> tuple[int, int, int]:
    """Positive and negative through a text encoder that encodes ``image`` as a reference itself (``widgets``: its
    widgets after the prompt), with one Edge selection bound to it on both; returns (positive, negative, the
    selection)."""
    edge = g.sparse("SparseContextEdgeSelector", 2, [0.1, 0.2, 1, 1.0])
    g.wire((image, 0, edge, "image"))
    bound = []
    for prompt in prompts:
        enc = g.core(encoder, 2, [prompt, *widgets])
        g.wire((clip, 0, enc, "clip"), (vae, 0, enc, "vae"), (image, 0, enc, image_input))
        bound.append(bind(g, 3, (enc, 0), [edge]))
    return bound[0], bound[1], edge


def mage_flow_edit(g: Graph) -> None:
    unet, clip, vae = loaders(g, "mage_flow_edit_turbo_int8_convrot.safetensors", "qwen3vl_4b_bf16.safetensors", "mage",
                              "mage_flow_vae_bf16.safetensors")
    images = [g.core("LoadImage", 1, ["example.png", "image"], height=330, title=t)
              for t in ("Image to edit", "Reference 2")]
    encode = g.core("TextEncodeMageFlowEdit", 2, ["Put the hat from image 2 on the person in image 1.", "", 0, 0, 1])
    edge = g.sparse("SparseContextEdgeSelector", 2, [0.1, 0.2, 1, 1.0])
    sal = g.sparse("SparseContextSaliencySelector", 2, [1.0, 1.0])
    pos, neg = bind(g, 3, (encode, 0), [edge, sal]), bind(g, 3, (encode, 1), [edge, sal])
    apply = apply_and_preview(g, unet, images[0], edge)
    g.wire((clip, 0, encode, "clip"), (vae, 0, encode, "vae"), (images[0], 0, encode, "images.image_1"),
           (images[1], 0, encode, "images.image_2"), (images[0], 0, edge, "image"), (images[1], 0, sal, "image"))
    sample_edit(g, apply, pos, neg, (encode, 2), vae, 4, [0, "fixed", 4, 1.0, "euler", "simple", 1.0],
                "SparseContext_mage_flow_edit",
                "# Mage-Flow-Edit, two images, Bind Sparse Selections\nTextEncodeMageFlowEdit encodes every image as a "
                "reference itself and resizes each to the output size, so each reference has as many tokens as the "
                "result: dropping pays off early. **Bind Sparse Selections** attaches one selection per image, in order "
                "(Edge for the picture being edited, Saliency for the second), on positive and negative alike.", 660)


def krea2_style_reference(g: Graph) -> None:
    unet, clip, vae = loaders(g, "krea2_turbo_int8_convrot.safetensors", "qwen3vl_4b_fp8_scaled.safetensors", "krea2",
                              "qwen_image_vae_krea2.safetensors")
    lora = g.loader("LoraLoaderModelOnly", 0, "krea2_style_reference.safetensors", 1.0)
    image = g.core("LoadImage", 1, ["example.png", "image"], height=330, title="Style reference")
    scale = g.core("ImageScaleToTotalPixels", 1, ["lanczos", 1.0, 16])
    text = g.core("CLIPTextEncode", 2, ["A white yeti with horns reading a book in a snowy forest."])
    encode = g.core("VAEEncode", 2)
    grid = g.sparse("SparseContextGridSelector", 2, [1.0])
    ref = g.sparse("SparseContextReferenceLatent", 3)
    method = g.core("FluxKontextMultiReferenceLatentMethod", 3, ["index_timestep_zero"])
    zero = g.core("ConditioningZeroOut", 3)
    shift = g.core("ModelSamplingFlux", 3, [1.15, 0.5, 1024, 1024])
    apply = apply_and_preview(g, shift, scale, grid)
    latent = g.core("EmptyLatentImage", 3, [1024, 1024, 1])
    g.wire((unet, 0, lora, "model"), (lora, 0, shift, "model"), (clip, 0, text, "clip"), (image, 0, scale, "image"),
           (scale, 0, encode, "pixels"), (vae, 0, encode, "vae"), (scale, 0, grid, "image"),
           (text, 0, ref, "conditioning"), (encode, 0, ref, "latent"), (grid, 0, ref, "selection"),
           (ref, 0, method, "conditioning"), (text, 0, zero, "conditioning"))
    sample_edit(g, apply, method, zero, (latent, 0), vae, 4, [0, "fixed", 8, 1.0, "euler", "simple", 1.0],
                "SparseContext_krea2_style_reference",
                "# Krea 2 Turbo, style reference (Ostris LoRA)\nKrea 2 uses a reference only when a node sets its "
                "reference method: **Edit Model Reference Method** = `index_timestep_zero`, as the official template "
                "does (the reference tokens run at t=0). A style is spread over the whole picture, so the reference keeps "
                "an even **Grid** of its tokens (50 %).", 620)


def z_image_omni_edit(g: Graph) -> None:
    unet, clip, vae = loaders(g, "z_image_bf16.safetensors", "qwen_3_4b.safetensors", "lumina2", "ae_z_image.safetensors")
    image = g.core("LoadImage", 1, ["example.png", "image"], height=330, title="Image to edit")
    pos, neg, edge = encoded_edit(g, "TextEncodeZImageOmni", ("Turn the jacket into bright red leather, keep "
                                                               "everything else the same.", ""), image, "image1", clip, vae,
                                  widgets=(True,))  # auto_resize_images
    shift = g.core("ModelSamplingAuraFlow", 3, [3.0])
    apply = apply_and_preview(g, shift, image, edge)
    latent = g.core("EmptySD3LatentImage", 3, [1024, 1024, 1])
    g.wire((unet, 0, shift, "model"))
    sample_edit(g, apply, pos, neg, (latent, 0), vae, 4, [0, "fixed", 25, 4.0, "res_multistep", "simple", 1.0],
                "SparseContext_z_image_omni_edit",
                "# Z-Image omni edit (core's experimental TextEncodeZImageOmni)\nThere is no official template for "
                "Z-Image omni editing yet; this graph uses core's own **TextEncodeZImageOmni**, which encodes up to three "
                "images (resized to about 1 MP) as references. Connect a SigLIP image encoder (CLIP Vision loader) to "
                "`image_encoder` for the omni base weights. **Bind Sparse Selections** attaches the Edge selection to the "
                "reference on positive and negative.", 660)


def joyimage_edit(g: Graph) -> None:
    unet, clip, vae = loaders(g, "joyai_image_edit_int8_convrot.safetensors",
                              "qwen3vl_8b_joyimage_edit_int8_convrot.safetensors", "joyimage", "wan_2.1_vae.safetensors")
    image = g.core("LoadImage", 1, ["example.png", "image"], height=330, title="Image to edit")
    scale = g.core("ImageScaleToTotalPixels", 1, ["lanczos", 1.0, 16])
    size = g.core("GetImageSize", 1)
    pos, neg, edge = encoded_edit(g, "TextEncodeJoyImageEdit", ("Change the background to a glacial scene.", ""), scale,
                                  "images.image0", clip, vae)
    norm = g.core("CFGNorm", 3, [1.0, False])
    apply = apply_and_preview(g, norm, scale, edge)
    latent = g.core("EmptySD3LatentImage", 3, [1024, 1024, 1])
    g.wire((image, 0, scale, "image"), (scale, 0, size, "image"), (unet, 0, norm, "model"))
    g.wf.link_widget(size, 0, latent, "width")
    g.wf.link_widget(size, 1, latent, "height")
    sample_edit(g, apply, pos, neg, (latent, 0), vae, 4, [0, "fixed", 40, 4.0, "euler", "normal", 1.0],
                "SparseContext_joyimage_edit",
                "# JoyAI-Image-Edit, Edge selector\nTextEncodeJoyImageEdit encodes the image (scaled to 1 MP) as a "
                "reference; **Bind Sparse Selections** attaches the Edge selection to it on positive and negative (CFG 4 "
                "runs both). The result has the image's size (Get Image Size). An aligned edit copies every token it does "
                "not change, so keep enough of them.", 660)


def longcat_image_edit(g: Graph) -> None:
    unet, clip, vae = loaders(g, "longcat_image_edit_bf16.safetensors", "qwen_2.5_vl_7b_fp8_scaled.safetensors",
                              "longcat_image", "ae_z_image.safetensors")
    image = g.core("LoadImage", 1, ["example.png", "image"], height=330, title="Image to edit")
    scale = g.core("ImageScaleToTotalPixels", 1, ["lanczos", 1.0, 16])
    encode = g.core("VAEEncode", 1)
    *bound, edge = encoded_edit(g, "TextEncodeQwenImageEdit", ("Make it early morning, lit by the rising sun.", ""),
                                scale, "image", clip, vae)
    conds = []
    for cond in bound:  # the official template's reference method and guidance, on positive and negative
        method = g.core("FluxKontextMultiReferenceLatentMethod", 3, ["index"])
        guidance = g.core("FluxGuidance", 3, [4.5])
        g.wire((cond, 0, method, "conditioning"), (method, 0, guidance, "conditioning"))
        conds.append(guidance)
    apply = apply_and_preview(g, unet, scale, edge)
    g.wire((image, 0, scale, "image"), (scale, 0, encode, "pixels"), (vae, 0, encode, "vae"))
    sample_edit(g, apply, conds[0], conds[1], (encode, 0), vae, 4, [0, "fixed", 50, 4.5, "euler", "simple", 1.0],
                "SparseContext_longcat_image_edit",
                "# LongCat-Image-Edit, Edge selector\nWired as the official template: TextEncodeQwenImageEdit encodes the "
                "image as a reference (positive and negative), the reference method `index`, FluxGuidance 4.5, CFG 4.5. "
                "**Bind Sparse Selections** attaches the Edge selection to the reference on both. LongCat is a FLUX-class "
                "model, so the reference cache works as for FLUX.1 Kontext.", 660)


#: name -> (graph, the ComfyUI version that saves it: the oldest with all of its core nodes)
WORKFLOWS = {
    "sparse_kontext_edit_edge": (kontext_edge, "0.3.75"),
    "sparse_masked_edit": (masked_edit, "0.3.75"),
    "sparse_flux2_klein_multi_reference": (klein_multi, "0.3.75"),
    "sparse_qwen_image_edit_2509": (qwen_2509, "0.3.75"),
    "sparse_dense_vs_sparse": (dense_vs_sparse, "0.3.75"),
    "sparse_train_lora": (train_lora, "0.3.75"),
    "sparse_calibrate_keep": (calibrate, "0.3.75"),
    "sparse_mage_flow_edit": (mage_flow_edit, "0.30.0"),
    "sparse_krea2_style_reference": (krea2_style_reference, "0.30.0"),
    "sparse_z_image_omni_edit": (z_image_omni_edit, "0.30.0"),
    "sparse_joyimage_edit": (joyimage_edit, "0.30.0"),
    "sparse_longcat_image_edit": (longcat_image_edit, "0.30.0"),
}


def build(object_info: dict, version: str) -> dict[str, tuple[dict, dict]]:
    """name -> (UI workflow, API prompt) of the workflows ComfyUI ``version`` saves."""
    convert = _load_convert()
    out = {}
    for name, (make, saved_with) in WORKFLOWS.items():
        if saved_with != version:
            continue
        g = Graph(convert, object_info, version)
        make(g)
        ui = g.wf.to_json()
        out[name] = (ui, convert.ui_to_api(ui, object_info))
    return out


def main() -> None:
    load_harness()
    from sc_harness.host import comfyui_version
    from sc_harness.server import ComfyServer

    version = comfyui_version()
    versions = sorted({v for _, v in WORKFLOWS.values()})
    if version not in versions:
        raise SystemExit(f"the workflows are saved with ComfyUI {' or '.join(versions)} (COMFYUI_PATH), not {version}")
    with ComfyServer(with_testpack=False) as server:
        info = server.object_info()
    for name, (ui, api) in build(info, version).items():
        (REPO / "workflows" / f"{name}.json").write_text(json.dumps(ui, indent=1) + "\n", encoding="utf-8")
        (REPO / "tests" / "workflows_api" / f"{name}.json").write_text(json.dumps(api, indent=1) + "\n", encoding="utf-8")
        print("wrote", name)


if __name__ == "__main__":
    main()
