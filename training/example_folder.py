"""A folder of training examples: image files (encoded on load) and/or already-encoded example files.

Layout::

    data/
      red_jacket/            one sub-folder per example (any name)
        target.png           the wanted result
        ref.png              the reference image; several: ref1.png, ref2.png, ... (in name order)
        caption.txt          the instruction / prompt (UTF-8)
      0001.safetensors       examples written by "Save Sparse Context Training Example" (already encoded)

Images (.png, .jpg, .jpeg, .webp) are scaled to about ``resolution`` x ``resolution`` pixels (aspect kept,
sides multiples of 16) and encoded the way a ComfyUI graph encodes them, by an ``encoder``: ``ComfyEncoder``
runs the model's own VAE and text encoder (VAE Encode, CLIP Text Encode + Reference Latent; for
Qwen-Image-Edit core's TextEncodeQwenImageEditPlus, which encodes the references itself).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from .examples import TrainingExample, examples_from_comfy, load_example

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
PIXELS_PER_TOKEN = 16  # one token covers 16x16 pixels in FLUX.1, FLUX.2 and Qwen-Image


@dataclass(frozen=True)
class ImageExample:
    """One example as files."""

    name: str
    target: Path
    references: list[Path]
    caption: str


class ExampleEncoder(Protocol):
    """Turns images and a caption into what a graph feeds the model (see ``ComfyEncoder``)."""

    def latent(self, image: torch.Tensor) -> torch.Tensor:
        """IMAGE (1, H, W, 3) in [0, 1] -> LATENT samples, as VAE Encode gives them."""

    def conditioning(self, caption: str, references: list[torch.Tensor]) -> list:
        """CONDITIONING of ``caption`` with the references' latents attached (``reference_latents``)."""


def _natural(path: Path) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path.stem.lower())]


def find_image_examples(folder: str | Path) -> list[ImageExample]:
    """The example sub-folders of ``folder`` (see the module docstring), sorted by name; ValueError naming
    the sub-folder for an incomplete one."""
    out = []
    for sub in sorted(p for p in Path(folder).iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = [p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
        targets = [p for p in images if p.stem.lower() == "target"]
        refs = sorted((p for p in images if p.stem.lower().startswith("ref")), key=_natural)
        caption = sub / "caption.txt"
        if len(targets) != 1 or not refs or not caption.is_file():
            raise ValueError(f"{sub}: an example folder needs one target image (target.png), at least one reference "
                             f"image (ref.png, ref1.png, ...) and caption.txt; found {sorted(p.name for p in sub.iterdir())}")
        out.append(ImageExample(sub.name, targets[0], refs, caption.read_text(encoding="utf-8").strip()))
    return out


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """IMAGE (1, H, W, 3) float in [0, 1]: EXIF-rotated RGB, scaled to about ``resolution``^2 pixels with sides
    that are multiples of 16 (as a graph would scale it before VAE Encode)."""
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(path) as raw:
        img = ImageOps.exif_transpose(raw).convert("RGB")
    scale = resolution / (img.width * img.height) ** 0.5
    size = tuple(max(PIXELS_PER_TOKEN, round(side * scale / PIXELS_PER_TOKEN) * PIXELS_PER_TOKEN)
                 for side in img.size)
    if size != img.size:
        img = img.resize(size, Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


def encode_example(files: ImageExample, encoder: ExampleEncoder, resolution: int) -> TrainingExample:
    refs = [load_image(p, resolution) for p in files.references]
    latent = {"samples": encoder.latent(load_image(files.target, resolution))}
    try:
        [example] = examples_from_comfy(latent, encoder.conditioning(files.caption, refs))
    except ValueError as err:
        raise ValueError(f"{files.name}: {err}") from err
    example.meta.update(prompt=files.caption, source=files.name)
    example.source = files.name
    return example


def load_example_folder(folder: str | Path, encoder: ExampleEncoder | None = None,
                        resolution: int = 1024) -> list[TrainingExample]:
    """Every example in ``folder``: its ``*.safetensors`` example files (sorted by name), then its example
    sub-folders, encoded with ``encoder`` (required when there are any)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    examples = [load_example(p) for p in sorted(folder.glob("*.safetensors"))]
    image_examples = find_image_examples(folder)
    if image_examples and encoder is None:
        raise ValueError(f"{folder}: {len(image_examples)} example folder(s) with images need a VAE and a text "
                         "encoder to be encoded (scripts/train_lora.py: --vae and --text-encoder)")
    examples += [encode_example(files, encoder, resolution) for files in image_examples]
    if not examples:
        raise ValueError(f"{folder}: no training examples (example sub-folders with target/ref images and "
                         "caption.txt, or .safetensors example files)")
    return examples


class ComfyEncoder:
    """``ExampleEncoder`` with ComfyUI's own VAE and text encoder, as the model's graphs use them.

    ``family``: ``"flux1"`` (CLIP Text Encode + Reference Latent, FLUX guidance ``guidance``), ``"flux2"``
    (CLIP Text Encode + Reference Latent) or ``"qwen_image"`` (TextEncodeQwenImageEditPlus, up to 3 references).
    """

    def __init__(self, vae, clip, family: str, guidance: float = 2.5):
        self.vae, self.clip, self.family, self.guidance = vae, clip, family, guidance

    def latent(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(image[:, :, :, :3])

    def conditioning(self, caption: str, references: list[torch.Tensor]) -> list:
        import node_helpers

        if self.family == "qwen_image":
            from comfy_extras.nodes_qwen import TextEncodeQwenImageEditPlus

            if len(references) > 3:
                raise ValueError(f"Qwen-Image-Edit takes up to 3 reference images, got {len(references)}")
            images = {f"image{i + 1}": r for i, r in enumerate(references)}
            return TextEncodeQwenImageEditPlus.execute(clip=self.clip, prompt=caption, vae=self.vae, **images).args[0]
        cond = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(caption))
        cond = node_helpers.conditioning_set_values(
            cond, {"reference_latents": [self.latent(r) for r in references]}, append=True)
        if self.family == "flux1":
            cond = node_helpers.conditioning_set_values(cond, {"guidance": self.guidance})
        return cond
