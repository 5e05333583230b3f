"""Test-pack nodes for the demo (``scripts/demo.py``): a VAE stand-in for the tiny models, the seam
through which a trained small model (safetensors + JSON config) replaces the seeded tiny one, and the
trained miniature model's task generator and pixel "VAE" (``experiments/miniature``).

Tests and demo only; never shipped (the test pack is in .comfyignore).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from comfy_api.latest import io

from .host_config import host_model_config
from .pack_node import pack_node
from .tiny_models import FAMILIES, SPECS

#: Model configs (``comfy.supported_models.<name>``) a config file may name; nothing else is built.
MODEL_CONFIGS = ("Flux", "Flux2", "QwenImage")


def _projection(family: str) -> torch.Tensor:
    """Fixed (C, 3*d*d) matrix from pixels of one latent cell to the family's latent channels."""
    spec = SPECS[family]
    gen = torch.Generator().manual_seed(1234)
    n = 3 * spec.downscale * spec.downscale
    return torch.randn((spec.latent_channels, n), generator=gen) / math.sqrt(n)


def image_to_latent(image: torch.Tensor, family: str) -> torch.Tensor:
    """IMAGE (B, H, W, 3) in [0, 1] -> a latent of the family's layout, as VAEEncode would give it.

    Each latent cell is a fixed linear projection of its d x d pixels (d = the family's downscale), so
    a reference's structure (edges, regions) is in its latent where the image has it. Sizes are cropped
    down to a multiple of d. Returns (B, C, H/d, W/d), or (B, C, 1, H/d, W/d) for Qwen-Image.
    """
    spec = SPECS[family]
    d = spec.downscale
    x = image[..., :3].float().movedim(-1, 1) * 2 - 1  # (B, 3, H, W) in [-1, 1]
    h, w = (x.shape[2] // d) * d, (x.shape[3] // d) * d
    if h == 0 or w == 0:
        raise ValueError(f"image: must be at least {d}x{d} pixels for {family}, got {tuple(image.shape[1:3])}")
    cells = F.pixel_unshuffle(x[:, :, :h, :w], d)  # (B, 3*d*d, H/d, W/d)
    latent = torch.einsum("cn,bnhw->bchw", _projection(family), cells)
    return latent.unsqueeze(2) if spec.video_latent else latent


@pack_node("SCTest_ImageToLatent",
           "A fixed linear projection of an IMAGE to a latent of the family's layout, in place of VAEEncode (tests "
           "and demo only).",
           [io.Image.Input("image", tooltip="Image to encode."),
            io.Combo.Input("family", options=sorted(FAMILIES), tooltip="Latent layout of this tiny model family.")],
           [io.Latent.Output()])
def ImageToLatent(image: torch.Tensor, family: str) -> io.NodeOutput:
    return io.NodeOutput({"samples": image_to_latent(image, family)})


def load_safetensors_model(path: str | Path):
    """A ComfyUI ModelPatcher from ``<name>.safetensors`` and its config ``<name>.json`` (or the one
    config ``*.json`` in the same folder): ``{"model_config": "comfy.supported_models.Flux" | ..., "flux_kwargs" |
    "unet_config": {...}}`` on top of what this ComfyUI's own detection reads from the weights. Weights load with ``safe_load`` and ``strict=True``."""
    import comfy.model_patcher
    import comfy.utils

    path = Path(path).expanduser()
    if not path.is_file() or path.suffix != ".safetensors":
        raise ValueError(f"path: expected an existing .safetensors file, got {str(path)!r}")
    config_file = path.with_suffix(".json")
    if not config_file.is_file():
        found = sorted(path.parent.glob("*.json"))
        if len(found) != 1:
            raise ValueError(f"path: no config {config_file.name} next to {path.name} (and not exactly one *.json)")
        config_file = found[0]
    info = json.loads(config_file.read_text(encoding="utf-8"))
    unet = info.get("flux_kwargs") or info.get("unet_config")
    if not isinstance(unet, dict):
        raise ValueError(f"{config_file.name}: needs a 'flux_kwargs' or 'unet_config' object")
    name = info.get("model_config")
    name = None if name is None else str(name).rsplit(".", 1)[-1]
    if name is not None and name not in MODEL_CONFIGS:
        raise ValueError(f"{config_file.name}: model_config must be one of {MODEL_CONFIGS}, got {name!r}")
    state_dict = comfy.utils.load_torch_file(str(path), safe_load=True)
    config = host_model_config(state_dict, dict(unet), model_config=name)
    if type(config).__name__ not in MODEL_CONFIGS:
        raise ValueError(f"{path.name}: detected as {type(config).__name__}, expected one of {MODEL_CONFIGS}")
    model = config.get_model({}, "")
    # the host's own key conversion, as core's loader applies it (e.g. RMSNorm ``scale`` -> ``weight`` in 0.30)
    model.diffusion_model.load_state_dict(config.process_unet_state_dict(state_dict), strict=True)
    model.eval()
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


@pack_node("SCTest_SafetensorsModel",
           "A small trained model from a .safetensors file and its JSON config, in place of the seeded tiny model "
           "(tests and demo only).",
           [io.String.Input("path", tooltip="Absolute path of the .safetensors file (config JSON beside it).")],
           [io.Model.Output()])
def SafetensorsModel(path: str) -> io.NodeOutput:
    return io.NodeOutput(load_safetensors_model(path))


# -- the trained miniature model (experiments/miniature): its tasks and its invertible pixel "VAE" --------
REPO = Path(__file__).resolve().parents[2]


def _experiment(name: str, *torch_only: str) -> ModuleType:
    """``experiments/<name>`` as the package ``sc_<name>``, through ``scripts/packload.py`` (the one place that
    imports the repository's folders by path), with its torch-only modules."""
    spec = importlib.util.spec_from_file_location("sc_packload", REPO / "scripts" / "packload.py")
    packload = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(packload)
    package = packload.load_package(f"sc_{name}", REPO / "experiments" / name)
    for sub in torch_only:
        importlib.import_module(f"sc_{name}.{sub}")
    return package


def miniature() -> ModuleType:
    """``experiments/miniature`` (its tasks and invertible pixel "VAE")."""
    return _experiment("miniature", "encoding", "tasks")


def _task_outputs(target: str, *more: io.Output) -> list[io.Output]:
    """The outputs of a task node: its references, target (``target`` says what it is), text and count."""
    return [io.Image.Output(display_name="references",
                            tooltip="The reference images as one batch (N, H, W, 3); split with ImageFromBatch."),
            io.Image.Output(display_name="target", tooltip=target),
            io.Conditioning.Output(display_name="conditioning",
                                   tooltip="One-hot text tokens (1, 4, 16) + pooled vector (1, 24), no references."),
            io.Int.Output(display_name="count", tooltip="Number of references."), *more]


def _checked_task(task: str, tasks: ModuleType) -> None:
    if task not in tasks.TASKS:
        raise ValueError(f"task: expected one of {tasks.TASKS}, got {task!r}")


@pack_node("SCTest_MiniatureTask",
           "One seeded example of the miniature experiment's tasks (experiments/miniature/tasks.py): its reference "
           "images, the ground-truth target and the one-hot 'text' conditioning the trained miniature model expects "
           "(tests and demo only).",
           [io.Combo.Input("task", options=["multi", "subject", "edit"], default="multi",
                           tooltip="multi: 2-3 references, their objects composed on a new background; subject: one "
                                   "object on a new background; edit: recolour the shapes of one colour."),
            io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Which example (tasks.make_batch seed)."),
            io.Int.Input("references", default=3, min=1, max=3,
                         tooltip="multi only: number of reference images, 2 to 3 (subject and edit have one; ignored "
                                 "there).")],
           _task_outputs("The ground truth the edit should produce (64x64)."))
def MiniatureTask(task: str, seed: int, references: int) -> io.NodeOutput:
    tasks = miniature().tasks
    _checked_task(task, tasks)
    if task == "multi" and not 2 <= references <= tasks.MULTI_MAX_REFS:
        raise ValueError(f"references: the multi task has 2 to {tasks.MULTI_MAX_REFS}, got {references}")
    batch = tasks.make_batch(task, 1, seed, n_refs=references if task == "multi" else None)
    refs = torch.cat(batch.refs, 0)  # (N, H, W, 3): all references of a task share one size
    cond = [[batch.context, {"pooled_output": batch.pooled}]]
    return io.NodeOutput(refs, batch.target, cond, len(batch.refs))


@pack_node("SCTest_MiniatureEncode",
           "The miniature model's 'VAE' encoder (experiments/miniature/encoding.py): RGB + luma folded 2x2 into a "
           "16-channel latent at half resolution; one model token = 4x4 pixels.",
           [io.Image.Input("image", tooltip="Image (B, H, W, 3) with even H and W.")], [io.Latent.Output()])
def MiniatureEncode(image: torch.Tensor) -> io.NodeOutput:
    if image.ndim != 4 or image.shape[1] % 2 or image.shape[2] % 2:
        raise ValueError(f"image: expected (B, H, W, C) with even H and W, got {tuple(image.shape)}")
    return io.NodeOutput({"samples": miniature().encoding.encode(image[..., :3])})


@pack_node("SCTest_MiniatureDecode",
           "The miniature model's 'VAE' decoder: the exact inverse of SCTest_MiniatureEncode (16-channel latent at "
           "half resolution -> IMAGE).",
           [io.Latent.Input("samples", tooltip="A 16-channel latent (B, 16, h, w).")], [io.Image.Output()])
def MiniatureDecode(samples: dict) -> io.NodeOutput:
    x = samples["samples"]
    if x.ndim != 4 or x.shape[1] != 16:
        raise ValueError(f"samples: expected a (B, 16, h, w) latent, got {tuple(x.shape)}")
    return io.NodeOutput(miniature().encoding.decode(x))


@pack_node("SCTest_MiniatureEmptyLatent",
           "An all-zero latent in the miniature model's layout (16 channels at half resolution), to sample from noise "
           "(what the experiment's evaluation starts from).",
           [*(io.Int.Input(side, default=64, min=4, max=1024, step=4, tooltip="Pixels (multiple of 4).")
              for side in ("width", "height")),
            io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Batch.")],
           [io.Latent.Output()])
def MiniatureEmptyLatent(width: int, height: int, batch_size: int) -> io.NodeOutput:
    if width % 4 or height % 4:
        raise ValueError(f"width/height: multiples of 4 (one token), got {width}x{height}")
    return io.NodeOutput({"samples": torch.zeros(batch_size, 16, height // 2, width // 2)})


# -- the natural-image model (experiments/natural): held-out photo tasks; encoding is the miniature's -------
def natural() -> ModuleType:
    """``experiments/natural`` (its held-out photo tasks; the encoding is the miniature's)."""
    miniature()
    return _experiment("natural", "tasks")


@pack_node("SCTest_NaturalTask",
           "One held-out example of the natural-image experiment (experiments/natural/tasks.py, crops of photographs "
           "never trained on): its references, the ground-truth target and the one-hot 'text' conditioning the "
           "trained model expects (tests and demo only).",
           [io.Combo.Input("task", options=["subject", "edit", "composition"], default="subject",
                           tooltip="subject: a global change (colour grade, shift, zoom crop); edit: a region changed, "
                                   "the rest copied; composition: 2-3 references arranged."),
            io.Int.Input("example", default=0, min=0, max=999,
                         tooltip="Which held-out example (the experiment's evaluation items, in order).")],
           _task_outputs("The ground truth.",
                         io.String.Output(display_name="change", tooltip="What the condition asks for."),
                         io.Int.Output(display_name="width", tooltip="Target width in pixels (for the empty latent)."),
                         io.Int.Output(display_name="height", tooltip="Target height in pixels.")))
def NaturalTask(task: str, example: int) -> io.NodeOutput:
    nat = natural()
    _checked_task(task, nat.tasks)
    from sc_natural.run import EVAL_SEED

    item = nat.tasks.eval_items(task, example + 1, EVAL_SEED)[example]
    cond = [[item.context, {"pooled_output": item.pooled}]]
    target = item.target
    return io.NodeOutput(torch.cat(item.refs, 0), target, cond, len(item.refs), item.change, target.shape[2],
                         target.shape[1])


DEMO_NODES: list[type[io.ComfyNode]] = [ImageToLatent, SafetensorsModel, MiniatureTask, MiniatureEncode,
                                        MiniatureDecode, MiniatureEmptyLatent, NaturalTask]
