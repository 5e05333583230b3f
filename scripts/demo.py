"""SparseContext demo: a reference-conditioned graph, sampled dense and sparse on a real headless ComfyUI.

Run it with ``bash scripts/demo.sh`` (sets everything up first; with no arguments it runs three cases, see
there); options:
    --out demo_output                               where images, keep maps, comparison.png, timings.json go
    --model natural                                 (default) the natural-image model of experiments/natural, trained
                                                    here on photographs, on a held-out photo task:
    --results experiments/natural/results           which results folder of that experiment to load (default: the
                                                    long run's results_long/ for natural, results/ for miniature);
                                                    its files must be the ones its JSON records (sha256)
    --task subject --example 0 --repeats 10         subject (default: a global change), edit (a region), composition
                                                    (2-3 references: odd examples have 3); which held-out example
    --variant full_ft                               base | lora (+ the drop-robust LoRA) | full_ft (the drop-robust
                                                    full fine-tune, default), the same in both runs
    --model miniature                               the miniature model of experiments/miniature (generated shapes):
    --task edit --refs 3 --no-lora                  edit (default), subject, multi (--refs 2..3); base only
    --selector grid                                 selector node (default: the experiment's best for task/keep/model)
    --threads N                                     CPU threads for ComfyUI (natural/miniature default 1)
    --steps N --keep 0.5 --bucket N                 sampling steps (default: the experiment's), keep ratio
                                                    (default 0.5 for the trained models, 0.25 otherwise), bucket
    --model tiny --size 512                         the test pack's seeded FLUX.2-klein-shaped model (noise images)
    --model small.safetensors                       a small trained model, its JSON config beside it
                                                    (``SCTest_SafetensorsModel``)
    --model flux-2-klein-9b.safetensors --clip qwen_3_8b.safetensors --vae flux2-vae.safetensors
                                                    a real FLUX.2 [klein] with real loaders (set COMFYUI_PATH
                                                    to your ComfyUI; a GPU is used if that ComfyUI has one)
    --images a.png b.png ...                        your own references (tiny/real; default: drawn synthetic scenes)

The trained models (1.4M-parameter FLUX.1-Kontext-shaped ComfyUI ``Flux`` models) give real pictures: the test
pack's nodes give them a task example (references, ground-truth target, one-hot "text"), their invertible pixel
"VAE" and their safetensors weights (+ LoRA through core's LoraLoaderModelOnly). Each reference is scored by a
selector node and added with Sparse Reference Latent; Apply Sparse Context patches the model; KSampler samples;
dense = the same graph without Apply Sparse Context, same seed. The demo prints the PSNR of dense and sparse
against the target next to the timings and writes ``comparison.png`` (references | keep maps | dense | sparse |
target, each panel at least 256 px, nearest-neighbour upscaled, labelled). Before it starts, the trained model's
files are checked against the sha256 its results JSON records: an overwritten model is refused with a message. Timings: a warm-up run first, then ``--repeats`` runs per mode (alternating), per-step medians on a fixed
thread count. The seeded tiny model and other small models have no meaningful pictures (their timings and keep
maps are real).

Per-step times are measured inside ComfyUI by the test pack's ``SCTest_StepTimer`` (each model evaluation of
the sampler, one per euler step) and sent over the websocket: ComfyUI's own progress events are throttled
since 0.10 (at most one per 100 ms), too coarse for steps of a few milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from packload import load_harness  # scripts/ is on sys.path when this file runs

ROOT = Path(__file__).resolve().parents[1]
FAMILY_OF_CONFIG = {"Flux": "flux1_kontext", "Flux2": "flux2_klein", "QwenImage": "qwen_image_edit"}
#: The results folder each trained model loads by default (``--results`` picks another, e.g. the natural
#: experiment's short run, results/). Files: ``<experiment>_flux.safetensors`` (+ ``.json`` config), ``..._lora`` and,
#: natural only, ``..._full_ft`` (the drop-robust full fine-tune, its own weights and config).
RESULTS = {"natural": ROOT / "experiments" / "natural" / "results_long",
           "miniature": ROOT / "experiments" / "miniature" / "results"}
NATURAL_TASKS = ("subject", "edit", "composition")
PANEL_PX = 256  # the smallest panel of the pictures the demo writes (nearest-neighbour upscaled)
MINIATURE_PX_PER_TOKEN = 4  # experiments/miniature/encoding.py: 2x2 folding x Flux patch 2
SELECTOR_ZOOM = 16 // MINIATURE_PX_PER_TOKEN  # the selector nodes score 16 px tokens: enlarge the image to match
STEP_TIMES_EVENT = "sctest.step_times"  # sent by the test pack's SCTest_StepTimer (tests/comfy_testpack/step_timer.py)
#: Selector nodes the demo graph can use (they need only the reference image), by the experiment's names.
SELECTOR_NODES = {"saliency": ("SparseContextSaliencySelector", {"blur_tokens": 1.0}),
                  "edge": ("SparseContextEdgeSelector", {"low_threshold": 0.1, "high_threshold": 0.2, "spread": 1}),
                  "grid": ("SparseContextGridSelector", {}),
                  "random": ("SparseContextRandomSelector", {"seed": 0})}


# -- reference images ----------------------------------------------------------------------------
def draw_scenes(n: int, size: int, folder: Path) -> list[Path]:
    """``n`` synthetic reference pictures (a subject on a plain or busy background), seeded."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(7)
    paths = []
    for i in range(n):
        img = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(150, 230, 3)))
        draw = ImageDraw.Draw(img)
        if i % 2:  # a busy background: stripes
            for x in range(0, size, max(4, size // 24)):
                draw.line([(x, 0), (x - size // 3, size)], fill=tuple(int(c) for c in rng.integers(90, 200, 3)), width=2)
        s = size // 6
        cx, cy = int(rng.integers(2 * s, size - 2 * s)), int(rng.integers(2 * s, size - 2 * s))
        colour = tuple(int(c) for c in rng.integers(0, 120, 3))
        shape = i % 4
        if shape == 0:  # a figure: head and body
            draw.ellipse([cx - s // 2, cy - 2 * s, cx + s // 2, cy - s], fill=colour)
            draw.rounded_rectangle([cx - s, cy - s, cx + s, cy + 2 * s], radius=s // 3, fill=colour)
        elif shape == 1:  # a jacket-like shape
            draw.polygon([(cx - 2 * s, cy - s), (cx, cy - 2 * s), (cx + 2 * s, cy - s), (cx + s, cy + 2 * s),
                          (cx - s, cy + 2 * s)], fill=colour)
        elif shape == 2:  # a cup
            draw.rectangle([cx - s, cy - s, cx + s, cy + 2 * s], fill=colour)
            draw.arc([cx + s // 2, cy - s // 2, cx + 2 * s, cy + s], 270, 90, fill=colour, width=max(2, s // 5))
        else:  # a street: blocks and windows
            for k in range(4):
                x0 = k * size // 4
                draw.rectangle([x0 + 4, cy - k * s // 2, x0 + size // 4 - 4, size], fill=colour)
                for wy in range(cy - k * s // 2 + 8, size - 8, max(8, s // 2)):
                    draw.rectangle([x0 + 12, wy, x0 + 20, wy + 5], fill=(250, 240, 180))
        draw.text((8, 8), f"reference {i + 1}", fill=(0, 0, 0))
        path = folder / f"sc_demo_ref_{i + 1}.png"
        img.save(path)
        paths.append(path)
    return paths


# -- the graph -------------------------------------------------------------------------------------
class Graph:
    """An API-format prompt with readable node ids (the same ids across prompts, so ComfyUI caches them)."""

    def __init__(self):
        self.nodes: dict[str, dict] = {}

    def add(self, node_id: str, class_type: str, **inputs) -> list:
        self.nodes[node_id] = {"class_type": class_type, "inputs": inputs}
        return [node_id, 0]


def experiment_settings(opts) -> tuple[int, str]:
    """(sampling steps, selector) from the experiment's JSON (miniature.json / natural.json): the selector measured
    best for the task at this keep ratio and model among those this demo has nodes for, else the task's default
    selector, else (4, saliency)."""
    try:
        info = json.loads((opts.results / f"{opts.experiment}.json").read_text(encoding="utf-8"))
        steps = int(info.get("sampling", {}).get("steps", 4))
        selector = str(info.get("default_selector", {}).get(opts.task, "saliency"))
        measured = [r for r in info.get("results", [])
                    if (r["task"], r["model"], r["keep_ratio"]) == (opts.task, opts.variant, opts.keep)
                    and r["selector"] in SELECTOR_NODES and r.get("mode", "drop") == "drop"]
    except (OSError, ValueError, KeyError, TypeError):
        return 4, "saliency"
    if measured:
        selector = max(measured, key=lambda r: r["psnr"])["selector"]
    return steps, selector


def _image_inputs(g: Graph, opts, budget: list, images: list[str], has_encoder: bool, save_inputs: bool):
    """tiny / small / real: the model, the conditioning with each reference image added, the empty latent and the
    decoder of a graph on pictures (yours or drawn)."""
    real = opts.mode == "real"
    if real:
        model = g.add("model", "UNETLoader", unet_name=Path(opts.model).name, weight_dtype="default")
        clip = g.add("clip", "CLIPLoader", clip_name=Path(opts.clip).name, type="flux2", device="default")
        vae = g.add("vae", "VAELoader", vae_name=Path(opts.vae).name)
        cond = g.add("text", "CLIPTextEncode", clip=clip, text=opts.prompt)
    else:
        if opts.mode == "small":
            model = g.add("model", "SCTest_SafetensorsModel", path=str(Path(opts.model).resolve()))
        else:
            model = g.add("model", "SCTest_TinyModel", family=opts.family, seed=1)
        cond = g.add("text", "SCTest_Conditioning", family=opts.family, seed=3, tokens=opts.text_tokens)
    for i, name in enumerate(images, start=1):
        image = g.add(f"load_{i}", "LoadImage", image=name)
        image = g.add(f"scale_{i}", "ImageScale", image=image, upscale_method="area", width=opts.size,
                      height=opts.size, crop="center")
        if real:
            latent = g.add(f"encode_{i}", "VAEEncode", pixels=image, vae=vae)
        elif has_encoder:
            latent = g.add(f"encode_{i}", "SCTest_ImageToLatent", image=image, family=opts.family)
        else:  # older test pack without the demo nodes: seeded latents, the keep maps still use the images
            latent = g.add(f"encode_{i}", "SCTest_Latent", family=opts.family, seed=10 + i, width=opts.size,
                           height=opts.size, batch_size=1, empty=False)
        selection = g.add(f"select_{i}", "SparseContextSaliencySelector", image=image, blur_tokens=1.0, weight=1.0,
                          budget=budget)
        cond = _add_reference(g, i, cond, latent, image, selection, opts, save_inputs)
    if real:
        empty = g.add("empty", "EmptyFlux2LatentImage", width=opts.size, height=opts.size, batch_size=1)
        return model, cond, empty, ("VAEDecode", {"vae": vae})
    empty = g.add("empty", "SCTest_Latent", family=opts.family, seed=0, width=opts.size, height=opts.size,
                  batch_size=1, empty=True)
    return model, cond, empty, ("SCTest_LatentToImage", {})


def _trained_inputs(g: Graph, opts, budget: list, save_inputs: bool):
    """A trained model of experiments/ on one example of its task: references -> encode + select, the target
    (ground truth) saved with the inputs; returns the model, conditioning, empty latent and decoder."""
    model = g.add("model", "SCTest_SafetensorsModel", path=str(opts.weights))
    if opts.lora:  # in both runs, so dense and sparse differ only by the token dropping
        model = g.add("lora", "LoraLoaderModelOnly", model=model, lora_name=opts.lora_file.name, strength_model=1.0)
    if opts.experiment == "natural":
        task = g.add("task", "SCTest_NaturalTask", task=opts.task, example=opts.example)
        size = {"width": [task[0], 5], "height": [task[0], 6]}  # a zoom crop's target is smaller
    else:
        task = g.add("task", "SCTest_MiniatureTask", task=opts.task, seed=opts.example, references=opts.refs)
        size = {"width": opts.size, "height": opts.size}
    refs, target, cond = [task[0], 0], [task[0], 1], [task[0], 2]
    node, widgets = SELECTOR_NODES[opts.selector]
    for i in range(1, opts.refs + 1):
        image = g.add(f"ref_{i}", "ImageFromBatch", image=refs, batch_index=i - 1, length=1)
        latent = g.add(f"encode_{i}", "SCTest_MiniatureEncode", image=image)
        # One miniature token is 4x4 px; the selector nodes score 16x16 px tokens (real models): an exact
        # 4x nearest enlargement gives them one score per miniature token, the same grid the patch uses.
        big = g.add(f"zoom_{i}", "ImageScaleBy", image=image, upscale_method="nearest-exact", scale_by=SELECTOR_ZOOM)
        selection = g.add(f"select_{i}", node, image=big, weight=1.0, budget=budget, **widgets)
        cond = _add_reference(g, i, cond, latent, big, selection, opts, save_inputs)
        if save_inputs:
            g.add(f"save_ref_{i}", "SaveImage", images=big, filename_prefix=f"sc_demo_reference_{i}")
    if save_inputs:
        g.add("save_target", "SaveImage", images=target, filename_prefix="sc_demo_target")
    empty = g.add("empty", "SCTest_MiniatureEmptyLatent", batch_size=1, **size)
    return model, cond, empty, ("SCTest_MiniatureDecode", {})


def _add_reference(g: Graph, i: int, cond: list, latent: list, image: list, selection: list, opts,
                   save_inputs: bool) -> list:
    """Sparse Reference Latent of reference ``i`` and, with the inputs, its keep map (what the patch keeps)."""
    cond = g.add(f"reference_{i}", "SparseContextReferenceLatent", conditioning=cond, latent=latent,
                 selection=selection)
    if save_inputs:
        keep_map = g.add(f"keepmap_{i}", "SparseContextPreview", image=image, selection=selection, bucket=opts.bucket)
        g.add(f"save_keepmap_{i}", "SaveImage", images=keep_map, filename_prefix=f"sc_demo_keepmap_{i}")
    return cond


def build_prompt(opts, sparse: bool, steps: int, seed: int, save_inputs: bool = False, images: list[str] = (),
                 has_encoder: bool = True) -> dict:
    """The demo graph, dense or sparse: the inputs of the trained model's task or of ``images``, then (Apply
    Sparse Context) -> step timer -> KSampler -> decode -> save; ``save_inputs`` also saves references, keep maps
    and the target."""
    g = Graph()
    # the keep ratio travels in each selection too, so the keep maps show exactly what the patch keeps
    budget = g.add("budget", "SparseContextBudget", mode="ratio", keep_ratio=opts.keep, token_count=1024, mass=0.8,
                   min_ratio=0.05, max_ratio=0.5, coverage=-1.0)
    if opts.mode == "miniature":
        model, cond, empty, (decoder, decoder_inputs) = _trained_inputs(g, opts, budget, save_inputs)
    else:
        model, cond, empty, (decoder, decoder_inputs) = _image_inputs(g, opts, budget, images, has_encoder,
                                                                      save_inputs)
    if sparse:
        model = g.add("sparse", "SparseContextApply", model=model, keep_ratio=opts.keep, rule="grid", total_tokens=0,
                      bucket=opts.bucket, start_percent=0.0, end_percent=1.0, seed=0, enabled=True)
    tag = "sparse" if sparse else "dense"
    model = g.add(f"timer_{tag}", "SCTest_StepTimer", model=model, label=tag)
    sampled = g.add(f"sampler_{tag}", "KSampler", model=model, positive=cond, negative=cond, latent_image=empty,
                    seed=seed, steps=steps, cfg=1.0, sampler_name="euler", scheduler="simple", denoise=1.0)
    picture = g.add(f"decode_{tag}", decoder, samples=sampled, **decoder_inputs)
    g.add(f"save_{tag}", "SaveImage", images=picture, filename_prefix=f"sc_demo_{tag}")
    return g.nodes


# -- quality: PSNR against the target, and the side-by-side picture ----------------------------------
def psnr(image: Path, target: Path) -> float:
    """PSNR (dB, data range 1) of two saved 8-bit PNGs of the same size."""
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(image).convert("RGB"), dtype=np.float64) / 255
    b = np.asarray(Image.open(target).convert("RGB"), dtype=np.float64) / 255
    if a.shape != b.shape:
        raise ValueError(f"psnr: {image.name} is {a.shape}, {target.name} is {b.shape}")
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def comparison_png(out: Path, refs: list[Path], keep_maps: list[Path], labels: dict[str, str], title: str,
                   tile: int = PANEL_PX) -> Path:
    """``comparison.png``: a title line, then references | keep maps | dense | sparse (| target, if ``labels``
    has one), each panel ``tile`` px (enlarged by nearest-neighbour scaling, so single pixels stay visible), a
    caption under each."""
    from PIL import Image, ImageDraw

    tiles = [(p, f"reference {i}") for i, p in enumerate(refs, 1)]
    tiles += [(p, f"keep map {i}") for i, p in enumerate(keep_maps, 1)]
    tiles += [(out / f"{k}.png", labels[k]) for k in ("dense", "sparse", "target") if k in labels]
    gap, caption = 6, 18
    width = len(tiles) * (tile + gap) + gap
    lines = _wrap(title, width - 2 * gap, ImageDraw.Draw(Image.new("RGB", (1, 1))))
    head = 4 + 14 * len(lines)
    sheet = Image.new("RGB", (width, head + tile + caption + 2 * gap), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((gap, 4), "\n".join(lines), fill=(0, 0, 0), spacing=3)
    for n, (path, text) in enumerate(tiles):
        x = gap + n * (tile + gap)
        picture = Image.open(path).convert("RGB")
        scaling = Image.NEAREST if picture.width <= tile else Image.LANCZOS  # big pictures shrink smoothly
        sheet.paste(picture.resize((tile, tile), scaling), (x, head + gap))
        draw.text((x + 2, head + gap + tile + 3), text, fill=(0, 0, 0))
    path = out / "comparison.png"
    sheet.save(path)
    return path


def _wrap(text: str, width: float, draw) -> list[str]:
    """``text`` broken at spaces into lines at most ``width`` pixels wide (PIL's default font)."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and draw.textlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


# -- running and timing ------------------------------------------------------------------------
async def _run_and_time(server, prompt: dict, label: str, timeout: float) -> dict:
    """Submit ``prompt`` and follow it on the websocket: per-step times of the sampling run that the graph's
    ``SCTest_StepTimer`` labelled ``label`` sends."""
    import aiohttp  # ComfyUI's own dependency

    client_id = uuid.uuid4().hex
    ws_url = server.url.replace("http://", "ws://") + f"/ws?clientId={client_id}"
    timed = None
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
        async with session.post(server.url + "/prompt", json={"prompt": prompt, "client_id": client_id}) as resp:
            answer = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"ComfyUI refused the graph: {json.dumps(answer, indent=1)}")
        prompt_id = answer["prompt_id"]
        t_start = t_end = None
        deadline = time.monotonic() + timeout
        while True:
            msg = await ws.receive(timeout=max(1.0, deadline - time.monotonic()))
            now = time.perf_counter()
            if msg.type != aiohttp.WSMsgType.TEXT:
                if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    raise RuntimeError(f"websocket closed:\n{server.log(60)}")
                continue  # binary previews
            event = json.loads(msg.data)
            kind, data = event.get("type"), event.get("data", {})
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            if kind == "execution_start":
                t_start = now
            elif kind == STEP_TIMES_EVENT and data.get("label") == label:
                timed = data
            elif kind == "execution_error":
                raise RuntimeError(f"the graph failed: {data.get('exception_message')}\n{server.log(60)}")
            elif kind == "execution_success" or (kind == "executing" and data.get("node") is None):
                t_end = now
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt did not finish in {timeout}s")
    if not timed or not timed["step_s"]:
        raise RuntimeError(f"no step times for {label!r} from SCTest_StepTimer; was the sampler cached?")
    return {"prompt_id": prompt_id, "step_s": timed["step_s"], "sampling_s": timed["sampling_s"],
            "prompt_s": (t_end - t_start) if t_start else None}


def run_prompt(server, prompt: dict, label: str, timeout: float = 900.0) -> dict:
    return asyncio.run(_run_and_time(server, prompt, label, timeout))


def collect_images(server, prompt_id: str, out: Path, rename: dict[str, str]) -> list[Path]:
    """Copy a finished prompt's saved images named in ``rename`` (filename prefix -> new stem) into ``out``."""
    entry = server.wait(prompt_id)  # history is written just after the websocket says "success"
    copied = []
    for node_out in entry.get("outputs", {}).values():
        for image in node_out.get("images", []):
            if image.get("type") != "output":
                continue
            src = server.output_path(image)
            stem = next((v for k, v in rename.items() if image["filename"].startswith(k + "_")), None)
            if stem is None:  # e.g. the cached keep maps, listed again in every later prompt's outputs
                continue
            dst = out / f"{stem}{src.suffix}"
            shutil.copyfile(src, dst)
            copied.append(dst)
    return copied


def speedup(dense: dict, sparse: dict) -> dict:
    """Dense / sparse median step time of each repeat (steps 2..), their median and range: the spread that the
    run-to-run noise of a shared machine leaves."""
    ratios = sorted(statistics.median(d[1:] or d) / statistics.median(s[1:] or s)
                    for d, s in zip(dense["runs_step_s"], sparse["runs_step_s"], strict=True))
    return {"median": statistics.median(ratios), "low": ratios[0], "high": ratios[-1], "runs": len(ratios)}


def speedup_text(s: dict) -> str:
    """E.g. "1.3x (1.2-1.4)": one decimal, the range over the timed runs (none for a single run)."""
    spread = f" ({s['low']:.1f}-{s['high']:.1f})" if s["runs"] > 1 else " (one run)"
    return f"{s['median']:.1f}x{spread}"


def summarize(name: str, runs: list[dict]) -> dict:
    """Per-step times of ``runs`` (repeats of one mode); the median pools steps 2.. of every run (step 1
    also pays for loading the model and planning the tokens)."""
    later = [s for run in runs for s in (run["step_s"][1:] or run["step_s"])]
    first = runs[0]
    return {"run": name, "steps": len(first["step_s"]), "step_s": first["step_s"],
            "runs_step_s": [run["step_s"] for run in runs], "first_step_s": first["step_s"][0],
            "median_step_s": statistics.median(later), "sampling_s": first["sampling_s"],
            "prompt_s": first["prompt_s"]}


# -- the trained model is the committed one --------------------------------------------------------
def model_files_problem(results: Path, experiment: str, files: list[Path]) -> str | None:
    """What is wrong with a trained model's ``files`` (None if nothing): each must exist and have the sha256 the
    experiment's results JSON records (a model trained again, or a smoke run written into the folder, has not)."""
    record = results / f"{experiment}.json"
    run = f"experiments/{experiment}/run.py"
    try:
        info = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"no readable {record.name} in {results} ({err}); train and publish with {run} --publish"
    hashes = info.get("model", {}).get("files")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        return f"{', '.join(missing)} missing in {results}; train and publish with {run} --publish"
    if not isinstance(hashes, dict):
        return f"{record.name} records no sha256 of its model files; publish the run again with {run} --publish"
    changed = [f.name for f in files if hashes.get(f.name) != hashlib.sha256(f.read_bytes()).hexdigest()]
    if changed:
        what = f"{', '.join(changed)} in {results} is not the model {record.name} records (sha256)"
    elif info.get("smoke"):
        what = f"{record.name} in {results} is a smoke run's (a few training steps: noise, not pictures)"
    else:
        return None
    return (f"{what}: it was overwritten, e.g. by a run writing into that folder. Restore the committed files "
            f"(git checkout -- {results}) or run {run} --publish to train and record a new model")


# -- main --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "demo_output", help="output folder (default demo_output/)")
    ap.add_argument("--refs", type=int, default=None,
                    help="number of reference images (default 4; the miniature's multi task: 2-3, default 3)")
    ap.add_argument("--size", type=int, default=512, help="tiny/real: target and reference size in pixels (multiple "
                                                          "of 16); the miniature's sizes are fixed by its task")
    ap.add_argument("--steps", type=int, default=None,
                    help="sampling steps per run (default: the experiment's for the miniature, else 8)")
    ap.add_argument("--keep", type=float, default=None,
                    help="keep ratio (default 0.5 for the miniature, whose experiment recommends it, else 0.25)")
    ap.add_argument("--bucket", type=int, default=None,
                    help="bucket of Apply Sparse Context (default 8 for the miniature's 64-token references, else 64)")
    ap.add_argument("--seed", type=int, default=42, help="sampling seed (the same for dense and sparse)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for ComfyUI's torch (OMP_NUM_THREADS; miniature default 1); fewer than the "
                         "cores if others share them")
    ap.add_argument("--text-tokens", type=int, default=64, help="tiny/small models: length of the seeded text")
    ap.add_argument("--model", default="natural",
                    help="natural (default: trained on photographs) | miniature (trained on generated shapes) | tiny | "
                         "a small .safetensors (+ JSON) | a real FLUX.2 .safetensors")
    ap.add_argument("--results", type=Path, default=None,
                    help="natural/miniature: the experiment's results folder to load (default: the natural "
                         "experiment's long run, experiments/natural/results_long; the miniature's results/)")
    ap.add_argument("--task", default=None, choices=["subject", "edit", "composition", "multi"],
                    help="natural: subject (default), edit, composition; miniature: edit (default), subject, multi")
    ap.add_argument("--selector", default=None, choices=sorted(SELECTOR_NODES),
                    help="natural/miniature: selector node (default: the one the experiment measured best for the "
                         "task, model and keep ratio)")
    ap.add_argument("--example", type=int, default=0,
                    help="natural: which held-out example; miniature: which task example (its generator's seed)")
    ap.add_argument("--variant", default=None, choices=["base", "lora", "full_ft"],
                    help="natural: base, base + the drop-robust LoRA, or the drop-robust full fine-tune (default "
                         "full_ft); miniature: base or lora (default lora)")
    ap.add_argument("--no-lora", dest="lora", action="store_false",
                    help="miniature: base model only (same as --variant base)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed runs per mode, alternating dense/sparse (miniature default 10: its steps are ~10 ms); "
                         "images and PSNR come from the first, later repeats use seed+1, seed+2, ...")
    ap.add_argument("--clip", default=None, help="real model: its text encoder file (e.g. qwen_3_8b_fp8mixed.safetensors)")
    ap.add_argument("--vae", default=None, help="real model: its VAE file (flux2-vae.safetensors)")
    ap.add_argument("--prompt", default="The person from image 1 wears the jacket from image 2 and holds the cup from "
                                        "image 3, in the street of image 4.", help="real model: the prompt")
    ap.add_argument("--images", nargs="+", type=Path, default=None, help="tiny/real: your own reference images")
    opts = ap.parse_args(argv)
    opts.mode, opts.family, opts.experiment = "tiny", "flux2_klein", None
    if opts.model in RESULTS:
        opts.mode, opts.family, opts.experiment = "miniature", "flux1_kontext", opts.model
        opts.results = (opts.results or RESULTS[opts.model]).resolve()
    elif opts.results is not None:
        ap.error("--results: only with --model natural or miniature")
    if opts.mode == "miniature":  # a trained model of experiments/: its own tasks, pixel "VAE" and ground truth
        natural = opts.experiment == "natural"
        tasks = NATURAL_TASKS if natural else ("edit", "subject", "multi")
        opts.task = opts.task or tasks[0]
        if opts.task not in tasks:
            ap.error(f"--task: the {opts.experiment} model has the tasks {', '.join(tasks)}")
        opts.variant = opts.variant or (("full_ft" if natural else "lora") if opts.lora else "base")
        if opts.variant == "full_ft" and not natural:
            ap.error("--variant full_ft: only the natural model has a full fine-tune")
        opts.lora = opts.variant == "lora"
        stem = opts.results / f"{opts.experiment}_flux"
        opts.weights = Path(f"{stem}_full_ft.safetensors" if opts.variant == "full_ft" else f"{stem}.safetensors")
        opts.lora_file = Path(f"{stem}_lora.safetensors")
        problem = model_files_problem(opts.results, opts.experiment, [opts.weights, opts.weights.with_suffix(".json")]
                                      + ([opts.lora_file] if opts.lora else []))
        if problem:
            ap.error(f"--model {opts.experiment}: {problem}")
        if opts.images is not None:
            ap.error(f"--images: the {opts.experiment} model works on its own tasks' images (use --task / --example)")
        if natural:  # composition examples alternate 2 and 3 references (tasks.eval_items)
            opts.refs = 2 + opts.example % 2 if opts.task == "composition" else 1
        else:
            opts.refs = 3 if opts.refs is None else opts.refs
            if opts.task == "multi" and not 2 <= opts.refs <= 3:
                ap.error("--refs: 2 to 3 for the miniature's multi-reference task")
            if opts.task != "multi":
                opts.refs = 1
        opts.keep = 0.5 if opts.keep is None else opts.keep
        steps, experiment_selector = experiment_settings(opts)
        if opts.selector is None:
            opts.selector = experiment_selector
        if opts.selector not in SELECTOR_NODES:  # e.g. a mask selector: this demo's graph has no mask input
            print(f"[demo] note: the experiment's selector for {opts.task} is {opts.selector!r}, which needs a mask; "
                  "this demo uses grid", file=sys.stderr)
            opts.selector = "grid"
        opts.steps = opts.steps or steps
        opts.bucket = opts.bucket or 8
        opts.repeats = opts.repeats or 10
        # 1 thread (as the experiment measured): at ~10 ms per step, two OpenMP threads on a shared 2-core
        # machine measured 0.8 s per step (waiting on each other), which times contention, not the model.
        opts.threads = opts.threads or 1
        opts.size = 64  # tasks.SIZE: the target picture
    else:
        opts.steps, opts.bucket, opts.repeats = opts.steps or 8, opts.bucket or 64, opts.repeats or 1
        opts.keep = 0.25 if opts.keep is None else opts.keep
        if opts.size % 16 or opts.size < 64:
            ap.error("--size: a multiple of 16, at least 64")
        opts.refs = 4 if opts.refs is None else opts.refs
        if not 1 <= opts.refs <= 8:
            ap.error("--refs: 1 to 8")
    if opts.steps < 2 or opts.repeats < 1:
        ap.error("--steps: at least 2 (step 1 also pays for loading); --repeats: at least 1")
    if opts.mode == "tiny" and opts.model != "tiny":
        path = Path(opts.model).expanduser()
        if not path.is_file():
            ap.error(f"--model: no file {path}")
        config = path.with_suffix(".json")
        configs = [config] if config.is_file() else sorted(path.parent.glob("*.json"))
        small = [c for c in configs if "model_config" in json.loads(c.read_text(encoding="utf-8"))]
        if len(small) == 1 and not (opts.clip or opts.vae):
            name = json.loads(small[0].read_text(encoding="utf-8"))["model_config"].rsplit(".", 1)[-1]
            if name not in FAMILY_OF_CONFIG:
                ap.error(f"--model: {small[0].name} names an unsupported model_config {name!r}")
            opts.mode, opts.family = "small", FAMILY_OF_CONFIG[name]
        else:
            if not (opts.clip and opts.vae):
                ap.error("--model with a real FLUX.2 checkpoint needs --clip and --vae too")
            for f in (opts.clip, opts.vae):
                if not Path(f).expanduser().is_file():
                    ap.error(f"no file {f}")
            opts.mode = "real"
    if opts.images is not None:
        missing = [str(p) for p in opts.images if not p.is_file()]
        if missing:
            ap.error(f"--images: no such files: {missing}")
        opts.refs = len(opts.images)
    return opts


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # stop the server on kill too, not only on Ctrl-C
    signal.signal(signal.SIGHUP, _raise_interrupt)
    load_harness()
    from sc_harness.server import ComfyServer

    if opts.threads:  # the server inherits this environment
        os.environ["OMP_NUM_THREADS"] = str(opts.threads)

    out = opts.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    extra = ["--use-pytorch-cross-attention", "--preview-method", "none"]
    scratch = Path(tempfile.mkdtemp(prefix="sc-demo-"))
    server_kwargs: dict = {}
    paths = {}
    if opts.mode == "real":  # the real files come in through their own extra_model_paths.yaml
        paths = {"diffusion_models": opts.model, "text_encoders": opts.clip, "vae": opts.vae}
        server_kwargs["cpu"] = False
    elif opts.mode == "miniature":  # core's LoraLoaderModelOnly finds the LoRA in the experiment's results folder
        paths = {"loras": str(opts.lora_file)}
    if paths:
        yaml = scratch / "demo_models.yaml"
        yaml.write_text("sc_demo_models:\n" + "".join(
            f"  {kind}: {Path(p).expanduser().resolve().parent}\n" for kind, p in paths.items()), encoding="utf-8")
        extra += ["--extra-model-paths-config", str(yaml)]
    server = ComfyServer(extra_args=tuple(extra), **server_kwargs)
    print(f"[demo] starting ComfyUI ({server.comfy}) headless on {server.url} ...", flush=True)
    t0 = time.perf_counter()
    try:
        server.start()
        if opts.mode == "miniature":
            missing = {"SCTest_MiniatureTask", "SCTest_NaturalTask", "LoraLoaderModelOnly"} - set(server.object_info())
            if missing:
                raise RuntimeError(f"ComfyUI lacks the nodes {sorted(missing)}:\n{server.log(60)}")
            lora = {"lora": "base + drop-robust LoRA (core LoraLoaderModelOnly) in both runs", "base": "base only",
                    "full_ft": "the drop-robust full fine-tune"}[opts.variant]
            print(f"[demo] model: the trained {opts.experiment} model {opts.weights.relative_to(ROOT)} ({lora}); task "
                  f"{opts.task!r} example {opts.example}: {opts.refs} reference(s) -> a {opts.size}x{opts.size} px "
                  f"target; {opts.selector} selector, keep {opts.keep}, bucket {opts.bucket}, {opts.steps} euler "
                  f"steps, seed {opts.seed}, {opts.repeats} timed run(s) each, {opts.threads} CPU thread(s)", flush=True)

            def prompt_for(sparse: bool, steps: int, seed: int, save_inputs: bool = False) -> dict:
                return build_prompt(opts, sparse, steps, seed, save_inputs)
        else:
            has_encoder = "SCTest_ImageToLatent" in server.object_info() if opts.mode != "real" else True
            if not has_encoder:
                print("[demo] note: the test pack has no SCTest_ImageToLatent; references are seeded latents",
                      file=sys.stderr)
            sources = opts.images or draw_scenes(opts.refs, opts.size, scratch)
            names = []
            for i, src in enumerate(sources, start=1):
                name = f"sc_demo_ref_{i}{src.suffix.lower()}"
                shutil.copyfile(src, server.tmp / "input" / name)
                shutil.copyfile(src, out / f"reference_{i}{src.suffix.lower()}")
                names.append(name)
            desc = {"tiny": "the test pack's seeded tiny FLUX.2-klein-shaped model (pictures are noise)",
                    "small": f"{opts.model} ({opts.family} layout)", "real": f"{opts.model} (real loaders)"}[opts.mode]
            print(f"[demo] model: {desc}; {opts.refs} references of {opts.size}x{opts.size} px, "
                  f"target {opts.size}x{opts.size}, {opts.steps} steps, keep {opts.keep}", flush=True)

            def prompt_for(sparse: bool, steps: int, seed: int, save_inputs: bool = False) -> dict:
                return build_prompt(opts, sparse, steps, seed, save_inputs, names, has_encoder)

        # Warm-up: runs everything the timed runs share (model, images, selections, keep maps) once.
        warm = run_prompt(server, prompt_for(False, 1, opts.seed, save_inputs=True), "dense")
        inputs = {f"sc_demo_keepmap_{i}": f"keepmap_{i}" for i in range(1, opts.refs + 1)}
        if opts.mode == "miniature":
            inputs |= {f"sc_demo_reference_{i}": f"reference_{i}" for i in range(1, opts.refs + 1)}
            inputs["sc_demo_target"] = "target"
        saved = collect_images(server, warm["prompt_id"], out, inputs)
        keep_maps = sorted(p for p in saved if p.stem.startswith("keepmap_"))
        runs: dict[str, list[dict]] = {"dense": [], "sparse": []}
        for r in range(opts.repeats):
            for tag, sparse in (("dense", False), ("sparse", True)):
                print(f"[demo] sampling {tag}" + (f" (run {r + 1}/{opts.repeats})" if opts.repeats > 1 else "")
                      + " ...", flush=True)
                run = run_prompt(server, prompt_for(sparse, opts.steps, opts.seed + r), tag)
                if r == 0:
                    collect_images(server, run["prompt_id"], out, {f"sc_demo_{tag}": tag})
                runs[tag].append(run)
        results = {tag: summarize(tag, rs) for tag, rs in runs.items()}
        report = _report_from_log(server.log(400))
    except KeyboardInterrupt:
        print("\n[demo] interrupted; stopping ComfyUI", file=sys.stderr)
        return 130
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(server.tmp, ignore_errors=True)

    dense, sparse = results["dense"], results["sparse"]
    print("\nper-step time (s)     " + " ".join(f"{'step ' + str(i + 1):>8}" for i in range(opts.steps)))
    for r in (dense, sparse):
        for k, steps in enumerate(r["runs_step_s"]):
            name = r["run"] + (f" #{k + 1}" if opts.repeats > 1 else "")
            print(f"  {name:<20}" + " ".join(f"{s:8.3f}" for s in steps))
    gain = speedup(dense, sparse)
    threads = f", {opts.threads} CPU thread(s)" if opts.threads else ""
    print(f"\nmedian step (steps 2..{opts.steps}" + (f", {opts.repeats} runs each" if opts.repeats > 1 else "")
          + f"{threads}): dense {1000 * dense['median_step_s']:.1f} ms, sparse {1000 * sparse['median_step_s']:.1f} ms"
          f" -> speed-up {speedup_text(gain)}" + (" (median and range over the runs)" if gain["runs"] > 1 else ""))
    print(f"first run's sampling wall time, warm-up included (model patching, token planning; not a speed "
          f"measure): dense {dense['sampling_s']:.2f} s, sparse {sparse['sampling_s']:.2f} s")
    if report:
        print(f"patch report: {report}")
    quality = {}
    labels = {"dense": "dense", "sparse": "sparse"}
    refs = sorted(out.glob("reference_*.*"))
    what = f"the {opts.mode} model {opts.model}"
    if opts.mode == "miniature":
        target = out / "target.png"
        quality = {tag: round(psnr(out / f"{tag}.png", target), 2) for tag in ("dense", "sparse")}
        print(f"quality vs the target (ground truth): PSNR dense {quality['dense']:.2f} dB, sparse "
              f"{quality['sparse']:.2f} dB ({quality['sparse'] - quality['dense']:+.2f} dB)")
        labels = {"dense": f"dense {quality['dense']:.1f} dB", "sparse": f"sparse {quality['sparse']:.1f} dB",
                  "target": "target (truth)"}
        what = (f"the trained {opts.experiment} model ({opts.variant}; {opts.task}, {opts.refs} reference(s), "
                f"{opts.selector} selector)")
    title = (f"SparseContext on {what}, keep {opts.keep}, {opts.steps} steps, seed {opts.seed}: median step dense "
             f"{1000 * dense['median_step_s']:.1f} ms, sparse {1000 * sparse['median_step_s']:.1f} ms, speed-up "
             f"{speedup_text(gain)}{threads}" + (f"; PSNR vs target dense {quality['dense']:.1f} dB, sparse "
                                                 f"{quality['sparse']:.1f} dB" if quality else ""))
    comparison_png(out, refs, keep_maps, labels, title)
    summary = {"model": str(opts.weights) if opts.mode == "miniature" else opts.model, "mode": opts.mode,
               "family": opts.family, "refs": opts.refs, "size": opts.size, "steps": opts.steps, "keep": opts.keep,
               "bucket": opts.bucket, "seed": opts.seed, "repeats": opts.repeats, "dense": dense, "sparse": sparse,
               "speedup_median_step": gain, "patch_report": report, "keep_maps": [p.name for p in keep_maps],
               "wall_s": round(time.perf_counter() - t0, 1)}
    if opts.mode == "miniature":
        summary |= {"experiment": opts.experiment, "results": str(opts.results), "task": opts.task,
                    "example": opts.example, "lora": opts.lora, "variant": opts.variant, "selector": opts.selector,
                    "psnr_vs_target_db": quality}
    (out / "timings.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    written = "dense.png, sparse.png, comparison.png, " + ("target.png, " if opts.mode == "miniature" else "")
    print(f"\n[demo] wrote {out}/: {written}keepmap_1..{opts.refs}.png, reference_*.png, timings.json "
          f"({summary['wall_s']} s in all; ComfyUI stopped)")
    return 0


def _report_from_log(log: str) -> str | None:
    """The patch's own line from the server log (kept tokens per reference, attention work)."""
    lines = [line.split("SparseContext: ", 1)[1] for line in log.splitlines() if "SparseContext: kept reference" in line]
    return lines[-1].strip() if lines else None


if __name__ == "__main__":
    sys.exit(main())
