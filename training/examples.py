"""Training examples: a target latent, its reference latents and its text conditioning.

File format (one ``.safetensors`` per example, written by ``save_example`` or the
``SparseContextSaveTrainingExample`` node, read by ``load_example`` and ``example_folder.load_example_folder``):

* ``target``: the target image's latent exactly as ComfyUI's VAEEncode gives it, (1, C, H, W), or
  (1, C, 1, H, W) for Qwen-Image (NOT ``process_latent_in``-scaled: the trainer scales, like sampling does);
* ``ref_0``, ``ref_1``, ...: the reference latents in the order ReferenceLatent nodes append them;
* ``context``: the text encoder's output (1, T, D) as in a CONDITIONING;
* ``pooled`` (optional): the pooled text vector (1, D) (FLUX.1 needs it);
* header metadata (strings): ``guidance`` (FLUX.1 guidance, optional), ``reference_method``
  (``offset`` / ``index`` / ``uxo``, optional), ``prompt`` (free text, optional).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

FORMAT_KEY = "sparse_context.example"
FORMAT_VERSION = "1"


@dataclass
class TrainingExample:
    """One example. Tensors are batch-1 (rows of a batch are separate examples)."""

    target: torch.Tensor
    references: list[torch.Tensor]
    context: torch.Tensor
    pooled: torch.Tensor | None = None
    guidance: float | None = None
    reference_method: str | None = None
    meta: dict[str, str] = field(default_factory=dict)
    source: str | None = field(default=None, compare=False)  # the file or folder it was read from (messages; not saved)

    def __post_init__(self) -> None:
        if self.target.ndim not in (4, 5) or self.target.shape[0] != 1:
            raise ValueError(f"target: expected a (1, C, H, W) or (1, C, T, H, W) latent, got {tuple(self.target.shape)}")
        for i, r in enumerate(self.references):
            if r.ndim != self.target.ndim or r.shape[:2] != self.target.shape[:2]:
                raise ValueError(f"ref_{i}: expected a latent shaped like the target's {tuple(self.target.shape[:2])}+spatial, "
                                 f"got {tuple(r.shape)}")
        if self.context.ndim != 3 or self.context.shape[0] != 1:
            raise ValueError(f"context: expected (1, tokens, dim), got {tuple(self.context.shape)}")
        if self.pooled is not None and (self.pooled.ndim != 2 or self.pooled.shape[0] != 1):
            raise ValueError(f"pooled: expected (1, dim), got {tuple(self.pooled.shape)}")
        if self.guidance is not None and not math.isfinite(self.guidance):
            raise ValueError(f"guidance: expected a finite number, got {self.guidance}")

    def detached(self) -> TrainingExample:
        """A copy whose tensors are ordinary tensors (ComfyUI's inference-mode tensors cannot be saved
        for backward), on the CPU."""
        def c(t):
            return None if t is None else t.detach().to("cpu").clone()
        return TrainingExample(c(self.target), [c(r) for r in self.references], c(self.context), c(self.pooled),
                               self.guidance, self.reference_method, dict(self.meta), self.source)


def examples_from_comfy(latent: dict, conditioning: list) -> list[TrainingExample]:
    """Examples from a ComfyUI LATENT (the targets, one per batch row) and CONDITIONING whose entries carry
    ``reference_latents`` (ReferenceLatent nodes). One conditioning entry is shared by all rows, or there is
    one entry per row."""
    samples = latent["samples"]
    if len(conditioning) not in (1, samples.shape[0]):
        raise ValueError(f"conditioning: {len(conditioning)} entries for {samples.shape[0]} target latents; "
                         "give one conditioning, or one per latent")
    out = []
    for b in range(samples.shape[0]):
        context, extra = conditioning[b if len(conditioning) > 1 else 0]
        refs = list(extra.get("reference_latents") or [])
        if not refs:
            raise ValueError("conditioning: no reference latents; chain ReferenceLatent nodes (one per reference "
                             "image) before training")
        pooled = extra.get("pooled_output")
        guidance = extra.get("guidance")
        out.append(TrainingExample(
            target=samples[b:b + 1], references=[r[:1] if r.shape[0] > 1 else r for r in refs],
            context=context[:1], pooled=None if pooled is None else pooled[:1],
            guidance=None if guidance is None else float(guidance),
            reference_method=extra.get("reference_latents_method")))
    return out


def save_example(path: str | Path, example: TrainingExample, prompt: str | None = None) -> Path:
    """Write one example as safetensors (see the module docstring for the format)."""
    from safetensors.torch import save_file

    tensors = {"target": example.target, "context": example.context}
    for i, r in enumerate(example.references):
        tensors[f"ref_{i}"] = r
    if example.pooled is not None:
        tensors["pooled"] = example.pooled
    meta = {FORMAT_KEY: FORMAT_VERSION, **example.meta}
    if example.guidance is not None:
        meta["guidance"] = repr(float(example.guidance))
    if example.reference_method is not None:
        meta["reference_method"] = example.reference_method
    if prompt is not None:
        meta["prompt"] = prompt
    path = Path(path)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


def load_example(path: str | Path) -> TrainingExample:
    """Read one example file (safetensors only: nothing in it is executed)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open has no __iter__)
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise ValueError(f"{path.name}: not a readable safetensors training example ({err})") from err
    for key in ("target", "context", "ref_0"):
        if key not in tensors:
            raise ValueError(f"{path.name}: missing tensor {key!r} (expected target, ref_0.., context[, pooled])")
    refs = []
    while f"ref_{len(refs)}" in tensors:
        refs.append(tensors[f"ref_{len(refs)}"])
    guidance = meta.pop("guidance", None)
    method = meta.pop("reference_method", None)
    meta.pop(FORMAT_KEY, None)
    try:
        return TrainingExample(tensors["target"], refs, tensors["context"], tensors.get("pooled"),
                               None if guidance is None else float(guidance), method, meta, source=path.name)
    except ValueError as err:
        raise ValueError(f"{path.name}: {err}") from err
