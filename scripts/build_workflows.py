"""Regenerates the example workflows (UI format here, API format in tests/workflows_api/).

Dev tool, not part of the node pack: ``.venv/bin/python scripts/build_workflows.py`` (run from any
folder) starts the pinned ComfyUI with the pack, reads ``/object_info`` for the sockets and widget order
of every node, and writes the JSON pairs. Edit the graphs here, never the JSON by hand.

The files are saved as ComfyUI 0.3.75 (the pinned host, the oldest supported) saves them: core nodes say
so in ``properties.ver``, newer ComfyUI versions load them as they load any older workflow (new widgets
get their defaults, new output slots are added), and the tests check each host does. So this refuses to
run against another ComfyUI.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from packload import load_harness  # scripts/ is on sys.path when this file runs

REPO = Path(__file__).resolve().parents[1]
HF = "https://huggingface.co"
PACK = {"cnr_id": "sparse-context", "ver": "0.1.0"}
CORE_VERSION = "0.3.75"  # = sc_harness.host.PINNED_VERSION (checked in main)
CORE = {"cnr_id": "comfy-core", "ver": CORE_VERSION}
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
}

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
    return {"models": [{"name": n, "url": MODELS[n][0], "directory": MODELS[n][1]} for n in names]}


def _load_convert():
    spec = importlib.util.spec_from_file_location("sc_workflow_convert", REPO / "tests/harness/workflow_convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Graph:
    def __init__(self, convert, info):
        self.wf = convert.UIWorkflow(info)

    def core(self, kind, col, widgets=(), **kw):
        return self.wf.add(kind, col, list(widgets), properties={**CORE, **kw.pop("properties", {})}, **kw)

    def sparse(self, kind, col, widgets=(), **kw):
        return self.wf.add(kind, col, list(widgets), properties=dict(PACK), color=SPARSE_COLOR, **kw)

    def note(self, col, text, height):
        return self.wf.add("MarkdownNote", col, [text], height=height)

    def wire(self, *edges):
        for src, out, dst, name in edges:
            self.wf.link(src, out, dst, name)


def kontext_loaders(g: Graph, col: int = 0, unet_file: str = "flux1-dev-kontext_fp8_scaled.safetensors",
                    weight_dtype: str = "default") -> tuple[int, int, int]:
    unet = g.core("UNETLoader", col, [unet_file, weight_dtype], properties=_models(unet_file))
    clip = g.core("DualCLIPLoader", col, ["clip_l.safetensors", "t5xxl_fp8_e4m3fn_scaled.safetensors", "flux", "default"],
                  properties=_models("clip_l.safetensors", "t5xxl_fp8_e4m3fn_scaled.safetensors"))
    vae = g.core("VAELoader", col, ["ae.safetensors"], properties=_models("ae.safetensors"))
    return unet, clip, vae


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


def kontext_edge(g: Graph) -> None:
    n = kontext_edit(g, "Change the jacket to bright red leather, keep everything else the same.")
    budget = g.sparse("SparseContextBudget", 2, ["ratio", 0.5, 1024, 0.8, 0.05, 0.5, -1.0])
    edge = g.sparse("SparseContextEdgeSelector", 3, [0.1, 0.2, 1, 1.0])
    ref = g.sparse("SparseContextReferenceLatent", 3)
    apply = g.sparse("SparseContextApply", 4, [0.5, "grid", 0, 64, 0.0, 1.0, 0, True, "off", 4096.0])
    preview = g.sparse("SparseContextPreview", 1, [64, 1, 0, 0.5], height=380)
    g.wire((n["scale"], 0, edge, "image"), (budget, 0, edge, "budget"), (n["text"], 0, ref, "conditioning"),
           (n["encode"], 0, ref, "latent"), (edge, 0, ref, "selection"), (n["unet"], 0, apply, "model"),
           (n["scale"], 0, preview, "image"), (edge, 0, preview, "selection"))
    sample_kontext(g, n, apply, ref, 4, 0, "SparseContext_kontext_edge")
    g.note(0, "# FLUX.1 Kontext edit, Edge selector\nThe reference keeps **50 %** of its tokens: the ones with the most "
              "Canny edges plus an even floor (Sparse Budget coverage -1 = the edge selector's 25 % floor), so outlines, "
              "faces and text stay sharp. An aligned edit copies every token it does not change, so it needs more "
              "tokens than a subject: " + EDIT_EVIDENCE + "\n\n" + COMPARE + "\n\n" + NODES_HELP, 660)


def masked_edit(g: Graph) -> None:
    n = kontext_edit(g, "Replace the masked area with a bouquet of sunflowers.")
    mask = g.sparse("SparseContextMaskSelector", 2, [1.0, 0.0, 1, 2, 1.0])
    edge = g.sparse("SparseContextEdgeSelector", 2, [0.1, 0.2, 1, 1.0])
    combine = g.sparse("SparseContextCombineSelections", 3, [1.0, 0.5, 1.0, 1.0, "max", 1.0])
    budget = g.sparse("SparseContextBudget", 3, ["ratio", 0.5, 1024, 0.8, 0.05, 0.5, -1.0])
    ref = g.sparse("SparseContextReferenceLatent", 3)
    apply = g.sparse("SparseContextApply", 4, [0.5, "grid", 0, 64, 0.0, 1.0, 0, True, "off", 4096.0])
    preview = g.sparse("SparseContextPreview", 1, [64, 1, 0, 0.5], height=380)
    g.wire((n["image"], 1, mask, "mask"), (n["scale"], 0, edge, "image"), (mask, 0, combine, "selection_a"),
           (edge, 0, combine, "selection_b"), (budget, 0, combine, "budget"), (n["text"], 0, ref, "conditioning"),
           (n["encode"], 0, ref, "latent"), (combine, 0, ref, "selection"), (n["unet"], 0, apply, "model"),
           (n["scale"], 0, preview, "image"), (combine, 0, preview, "selection"))
    sample_kontext(g, n, apply, ref, 4, 0, "SparseContext_masked_edit")
    g.note(0, "# Masked edit (spatially aligned), Mask selector\nPaint the region to edit on **Load Image** (right "
              "click > Open in MaskEditor). The reference keeps every token of the painted region (grown by 1 token, "
              "feathered over 2) first, then the strongest edges elsewhere at half weight (Combine, mode max), within "
              "a 50 % budget. An empty mask stops with a clear message. Everything outside the mask is copied, so "
              "keep enough of it: " + EDIT_EVIDENCE + "\n\n" + COMPARE + "\n\n" + NODES_HELP, 620)


def klein_multi(g: Graph) -> None:
    unet = g.core("UNETLoader", 0, ["flux-2-klein-9b-fp8.safetensors", "default"],
                  properties=_models("flux-2-klein-9b-fp8.safetensors"))
    clip = g.core("CLIPLoader", 0, ["qwen_3_8b_fp8mixed.safetensors", "flux2", "default"],
                  properties=_models("qwen_3_8b_fp8mixed.safetensors"))
    vae = g.core("VAELoader", 0, ["flux2-vae.safetensors"], properties=_models("flux2-vae.safetensors"))
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
    g.note(0, "# FLUX.2 [klein] 9B, three references, Saliency + one shared budget\nEach reference keeps its most "
              "salient tokens (the subject, not the plain background). `total_tokens` = 3072 is ONE budget for all "
              "three 1 MP references (3 x 4096 tokens -> 25 %), split by how much salient content each has "
              "(`weight` on a selector gives it a bigger share). More references = bigger speed-up: attention grows "
              "with the square of the sequence. Needs a ComfyUI with FLUX.2 klein support; the 4B model works the "
              "same (use qwen_3_4b). " + MULTI_EVIDENCE + "\n\n" + COMPARE + "\n\n" + NODES_HELP, 660)


def qwen_2509(g: Graph) -> None:
    unet = g.core("UNETLoader", 0, ["qwen_image_edit_2509_fp8_e4m3fn.safetensors", "default"],
                  properties=_models("qwen_image_edit_2509_fp8_e4m3fn.safetensors"))
    lora = g.core("LoraLoaderModelOnly", 0, ["Qwen-Image-Edit-2509-Lightning-4steps-V1.0-bf16.safetensors", 1.0],
                  properties=_models("Qwen-Image-Edit-2509-Lightning-4steps-V1.0-bf16.safetensors"))
    clip = g.core("CLIPLoader", 0, ["qwen_2.5_vl_7b_fp8_scaled.safetensors", "qwen_image", "default"],
                  properties=_models("qwen_2.5_vl_7b_fp8_scaled.safetensors"))
    vae = g.core("VAELoader", 0, ["qwen_image_vae.safetensors"], properties=_models("qwen_image_vae.safetensors"))
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
    g.note(0, "# Qwen-Image-Edit-2509, three images, Bind Sparse Selections\nTextEncodeQwenImageEditPlus encodes "
              "image1..3 as references itself, so **Bind Sparse Selections** attaches one selection per image, in "
              "order: Edge for the picture being edited, Saliency for the two subject images; positive and negative "
              "get the same binding. Each reference keeps 30 % (`keep_ratio`). Works with the 4-step Lightning LoRA "
              "(LoRA weights are patched as usual). " + MULTI_EVIDENCE + "\n\n" + COMPARE + "\n\n" + NODES_HELP, 660)


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


WORKFLOWS = {
    "sparse_kontext_edit_edge": kontext_edge,
    "sparse_masked_edit": masked_edit,
    "sparse_flux2_klein_multi_reference": klein_multi,
    "sparse_qwen_image_edit_2509": qwen_2509,
    "sparse_dense_vs_sparse": dense_vs_sparse,
    "sparse_train_lora": train_lora,
    "sparse_calibrate_keep": calibrate,
}


def build(object_info: dict) -> dict[str, tuple[dict, dict]]:
    """name -> (UI workflow, API prompt)."""
    convert = _load_convert()
    out = {}
    for name, make in WORKFLOWS.items():
        g = Graph(convert, object_info)
        make(g)
        ui = g.wf.to_json()
        out[name] = (ui, convert.ui_to_api(ui, object_info))
    return out


def main() -> None:
    load_harness()
    from sc_harness.host import PINNED_VERSION, comfyui_version
    from sc_harness.server import ComfyServer

    if not CORE_VERSION == PINNED_VERSION == comfyui_version():
        raise SystemExit(f"build the workflows with ComfyUI {PINNED_VERSION} (unset COMFYUI_PATH), not {comfyui_version()}")
    with ComfyServer(with_testpack=False) as server:
        info = server.object_info()
    for name, (ui, api) in build(info).items():
        (REPO / "workflows" / f"{name}.json").write_text(json.dumps(ui, indent=1) + "\n", encoding="utf-8")
        (REPO / "tests" / "workflows_api" / f"{name}.json").write_text(json.dumps(api, indent=1) + "\n", encoding="utf-8")
        print("wrote", name)


if __name__ == "__main__":
    main()
