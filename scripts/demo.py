"""SparseContext demo: one multi-reference graph, sampled dense and sparse on a real headless ComfyUI.

Run it with ``bash scripts/demo.sh`` (sets everything up first); options:
    --refs 4 --size 512 --steps 6 --keep 0.25      the graph (references of size x size pixels)
    --out demo_output                               where images, keep maps and timings.json go
    --model tiny                                    (default) the test pack's seeded FLUX.2-klein-shaped model
    --model small.safetensors                       a small trained model, its JSON config beside it
                                                    (``SCTest_SafetensorsModel``; e.g. experiments/miniature)
    --model flux-2-klein-9b.safetensors --clip qwen_3_8b.safetensors --vae flux2-vae.safetensors
                                                    a real FLUX.2 [klein] with real loaders (set COMFYUI_PATH
                                                    to your ComfyUI; a GPU is used if that ComfyUI has one)
    --images a.png b.png ...                        your own references (default: drawn synthetic scenes)

The graph mirrors ``workflows/sparse_flux2_klein_multi_reference.json``: each reference image is scaled,
encoded, scored by Sparse Saliency Selector and added with Sparse Reference Latent; Apply Sparse Context
patches the model; KSampler samples. Dense = the same graph with the unpatched model. Tiny/small models
have no text encoder or VAE, so the test pack's nodes stand in for them (seeded conditioning, a fixed
image->latent projection, a fixed latent->image projection): the pictures are not meaningful, the
timings and keep maps are. Per-step times come from ComfyUI's websocket progress events.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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


def build_prompt(opts, images: list[str], mode: str, sparse: bool, steps: int, has_encoder: bool) -> dict:
    """The multi-reference graph (dense or sparse) for ``mode`` tiny / small / real."""
    g = Graph()
    fam = opts.family
    if mode == "real":
        model = g.add("model", "UNETLoader", unet_name=Path(opts.model).name, weight_dtype="default")
        clip = g.add("clip", "CLIPLoader", clip_name=Path(opts.clip).name, type="flux2", device="default")
        vae = g.add("vae", "VAELoader", vae_name=Path(opts.vae).name)
        cond = g.add("text", "CLIPTextEncode", clip=clip, text=opts.prompt)
    else:
        if mode == "small":
            model = g.add("model", "SCTest_SafetensorsModel", path=str(Path(opts.model).resolve()))
        else:
            model = g.add("model", "SCTest_TinyModel", family=fam, seed=1)
        cond = g.add("text", "SCTest_Conditioning", family=fam, seed=3, tokens=opts.text_tokens)
    for i, name in enumerate(images, start=1):
        image = g.add(f"load_{i}", "LoadImage", image=name)
        image = g.add(f"scale_{i}", "ImageScale", image=image, upscale_method="area", width=opts.size,
                      height=opts.size, crop="center")
        if mode == "real":
            latent = g.add(f"encode_{i}", "VAEEncode", pixels=image, vae=vae)
        elif has_encoder:
            latent = g.add(f"encode_{i}", "SCTest_ImageToLatent", image=image, family=fam)
        else:  # older test pack without the demo nodes: seeded latents, the keep maps still use the images
            latent = g.add(f"encode_{i}", "SCTest_Latent", family=fam, seed=10 + i, width=opts.size,
                           height=opts.size, batch_size=1, empty=False)
        selection = g.add(f"select_{i}", "SparseContextSaliencySelector", image=image, blur_tokens=1.0, weight=1.0)
        cond = g.add(f"reference_{i}", "SparseContextReferenceLatent", conditioning=cond, latent=latent,
                     selection=selection)
        keep_map = g.add(f"keepmap_{i}", "SparseContextPreview", image=image, selection=selection, bucket=opts.bucket)
        g.add(f"save_keepmap_{i}", "SaveImage", images=keep_map, filename_prefix=f"sc_demo_keepmap_{i}")
    if mode == "real":
        empty = g.add("empty", "EmptyFlux2LatentImage", width=opts.size, height=opts.size, batch_size=1)
    else:
        empty = g.add("empty", "SCTest_Latent", family=fam, seed=0, width=opts.size, height=opts.size,
                      batch_size=1, empty=True)
    if sparse:
        model = g.add("sparse", "SparseContextApply", model=model, keep_ratio=opts.keep, rule="grid", total_tokens=0,
                      bucket=opts.bucket, start_percent=0.0, end_percent=1.0, seed=0, enabled=True)
    tag = "sparse" if sparse else "dense"
    sampled = g.add(f"sampler_{tag}", "KSampler", model=model, positive=cond, negative=cond, latent_image=empty,
                    seed=opts.seed, steps=steps, cfg=1.0, sampler_name="euler", scheduler="simple", denoise=1.0)
    if mode == "real":
        picture = g.add(f"decode_{tag}", "VAEDecode", samples=sampled, vae=vae)
    else:
        picture = g.add(f"decode_{tag}", "SCTest_LatentToImage", samples=sampled)
    g.add(f"save_{tag}", "SaveImage", images=picture, filename_prefix=f"sc_demo_{tag}")
    return g.nodes


# -- running and timing ------------------------------------------------------------------------
async def _run_and_time(server, prompt: dict, sampler_id: str, timeout: float) -> dict:
    """Submit ``prompt`` and follow it on the websocket: per-step times of ``sampler_id``."""
    import aiohttp  # ComfyUI's own dependency

    client_id = uuid.uuid4().hex
    ws_url = server.url.replace("http://", "ws://") + f"/ws?clientId={client_id}"
    steps: list[float] = []
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
        async with session.post(server.url + "/prompt", json={"prompt": prompt, "client_id": client_id}) as resp:
            answer = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"ComfyUI refused the graph: {json.dumps(answer, indent=1)}")
        prompt_id = answer["prompt_id"]
        t_start = t_sampler = t_last = None
        t_end = None
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
            elif kind == "executing" and data.get("node") == sampler_id:
                t_sampler = t_last = now
            elif kind == "progress" and data.get("node") == sampler_id and t_last is not None:
                steps.append(now - t_last)
                t_last = now
            elif kind == "execution_error":
                raise RuntimeError(f"the graph failed: {data.get('exception_message')}\n{server.log(60)}")
            elif kind == "execution_success" or (kind == "executing" and data.get("node") is None):
                t_end = now
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt did not finish in {timeout}s")
    if not steps:
        raise RuntimeError(f"no progress events from {sampler_id}; was it cached?")
    return {"prompt_id": prompt_id, "step_s": steps, "sampling_s": (t_last - t_sampler),
            "prompt_s": (t_end - t_start) if t_start else None}


def run_prompt(server, prompt: dict, sampler_id: str, timeout: float = 900.0) -> dict:
    return asyncio.run(_run_and_time(server, prompt, sampler_id, timeout))


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


def summarize(name: str, run: dict) -> dict:
    steps = run["step_s"]
    later = steps[1:] or steps  # step 1 also pays for loading the model and planning the tokens
    return {"run": name, "steps": len(steps), "step_s": steps, "first_step_s": steps[0],
            "median_step_s": statistics.median(later), "sampling_s": run["sampling_s"], "prompt_s": run["prompt_s"]}


# -- main --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "demo_output", help="output folder (default demo_output/)")
    ap.add_argument("--refs", type=int, default=4, help="number of reference images")
    ap.add_argument("--size", type=int, default=512, help="target and reference size in pixels (multiple of 16)")
    ap.add_argument("--steps", type=int, default=8, help="sampling steps per run")
    ap.add_argument("--keep", type=float, default=0.25, help="keep_ratio of Apply Sparse Context")
    ap.add_argument("--bucket", type=int, default=64, help="bucket of Apply Sparse Context")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for ComfyUI's torch (OMP_NUM_THREADS); fewer than the cores if others share them")
    ap.add_argument("--text-tokens", type=int, default=64, help="tiny/small models: length of the seeded text")
    ap.add_argument("--model", default="tiny", help="tiny | a small .safetensors (+ JSON) | a real FLUX.2 .safetensors")
    ap.add_argument("--clip", default=None, help="real model: its text encoder file (e.g. qwen_3_8b_fp8mixed.safetensors)")
    ap.add_argument("--vae", default=None, help="real model: its VAE file (flux2-vae.safetensors)")
    ap.add_argument("--prompt", default="The person from image 1 wears the jacket from image 2 and holds the cup from "
                                        "image 3, in the street of image 4.", help="real model: the prompt")
    ap.add_argument("--images", nargs="+", type=Path, default=None, help="your own reference images")
    opts = ap.parse_args(argv)
    if opts.size % 16 or opts.size < 64:
        ap.error("--size: a multiple of 16, at least 64")
    if not 1 <= opts.refs <= 8:
        ap.error("--refs: 1 to 8")
    opts.mode, opts.family = "tiny", "flux2_klein"
    if opts.model != "tiny":
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
    if opts.mode == "real":  # the real files come in through their own extra_model_paths.yaml
        paths = {"diffusion_models": opts.model, "text_encoders": opts.clip, "vae": opts.vae}
        yaml = scratch / "demo_models.yaml"
        yaml.write_text("sc_demo_models:\n" + "".join(
            f"  {kind}: {Path(p).expanduser().resolve().parent}\n" for kind, p in paths.items()), encoding="utf-8")
        extra += ["--extra-model-paths-config", str(yaml)]
        server_kwargs["cpu"] = False
    server = ComfyServer(extra_args=tuple(extra), **server_kwargs)
    print(f"[demo] starting ComfyUI ({server.comfy}) headless on {server.url} ...", flush=True)
    t0 = time.perf_counter()
    try:
        server.start()
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
        desc = {"tiny": "the test pack's seeded tiny FLUX.2-klein-shaped model",
                "small": f"{opts.model} ({opts.family} layout)", "real": f"{opts.model} (real loaders)"}[opts.mode]
        print(f"[demo] model: {desc}; {opts.refs} references of {opts.size}x{opts.size} px, "
              f"target {opts.size}x{opts.size}, {opts.steps} steps, keep {opts.keep}", flush=True)

        # Warm-up: runs everything the two timed runs share (images, selections, keep maps) once.
        warm = run_prompt(server, build_prompt(opts, names, opts.mode, False, 1, has_encoder), "sampler_dense")
        keep_maps = collect_images(server, warm["prompt_id"], out,
                                   {f"sc_demo_keepmap_{i}": f"keepmap_{i}" for i in range(1, opts.refs + 1)})
        results = {}
        for tag, sparse in (("dense", False), ("sparse", True)):
            print(f"[demo] sampling {tag} ...", flush=True)
            run = run_prompt(server, build_prompt(opts, names, opts.mode, sparse, opts.steps, has_encoder),
                             f"sampler_{tag}")
            collect_images(server, run["prompt_id"], out, {f"sc_demo_{tag}": tag})
            results[tag] = summarize(tag, run)
        report = _report_from_log(server.log(400))
    except KeyboardInterrupt:
        print("\n[demo] interrupted; stopping ComfyUI", file=sys.stderr)
        return 130
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(server.tmp, ignore_errors=True)

    dense, sparse = results["dense"], results["sparse"]
    print("\nper-step time (s)     " + " ".join(f"{'step ' + str(i + 1):>8}" for i in range(len(dense["step_s"]))))
    for r in (dense, sparse):
        print(f"  {r['run']:<20}" + " ".join(f"{s:8.3f}" for s in r["step_s"]))
    speedup = dense["median_step_s"] / sparse["median_step_s"]
    print(f"\nmedian step (steps 2..{opts.steps}): dense {dense['median_step_s']:.3f} s, sparse "
          f"{sparse['median_step_s']:.3f} s -> speed-up {speedup:.2f}x")
    print(f"sampling wall time: dense {dense['sampling_s']:.2f} s, sparse {sparse['sampling_s']:.2f} s "
          f"-> {dense['sampling_s'] / sparse['sampling_s']:.2f}x")
    if report:
        print(f"patch report: {report}")
    summary = {"model": opts.model, "mode": opts.mode, "family": opts.family, "refs": opts.refs, "size": opts.size,
               "steps": opts.steps, "keep": opts.keep, "bucket": opts.bucket, "dense": dense, "sparse": sparse,
               "speedup_median_step": speedup, "patch_report": report, "keep_maps": [p.name for p in keep_maps],
               "wall_s": round(time.perf_counter() - t0, 1)}
    (out / "timings.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    print(f"\n[demo] wrote {out}/: dense.png, sparse.png, keepmap_1..{opts.refs}.png, reference_*.png, timings.json "
          f"({summary['wall_s']} s in all; ComfyUI stopped)")
    return 0


def _report_from_log(log: str) -> str | None:
    """The patch's own line from the server log (kept tokens per reference, attention work)."""
    lines = [line.split("SparseContext: ", 1)[1] for line in log.splitlines() if "SparseContext: kept reference" in line]
    return lines[-1].strip() if lines else None


if __name__ == "__main__":
    sys.exit(main())
