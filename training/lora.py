"""LoRA on a ComfyUI diffusion model through ComfyUI's own weight-wrapper mechanism.

Like core's ``TrainLoraNode`` (``comfy_extras/nodes_train.py``), every adapted linear layer gets a
callable registered with ``ModelPatcher.add_weight_wrapper("diffusion_model.<module>.weight", fn)``:
ComfyUI's ops call ``fn(weight)`` each forward and use ``weight + alpha / rank * up @ down``. No forward
function is replaced and no class is patched; the model code that runs is the inference code.

The saved file uses core's LoRA key format, ``diffusion_model.<module>.lora_up.weight`` (out, rank),
``.lora_down.weight`` (rank, in) and ``.alpha`` (scalar), which ``comfy.lora`` maps with no conversion.
"""

from __future__ import annotations

import fnmatch
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

PREFIX = "diffusion_model."

_FLUX_ATTENTION = [
    "double_blocks.*.img_attn.qkv", "double_blocks.*.img_attn.proj",
    "double_blocks.*.txt_attn.qkv", "double_blocks.*.txt_attn.proj",
    # single blocks fuse qkv with the MLP input (linear1) and proj with the MLP output (linear2)
    "single_blocks.*.linear1", "single_blocks.*.linear2",
]
_QWEN_ATTENTION = [f"transformer_blocks.*.attn.{n}" for n in (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")]

#: Named target sets per architecture family (globs on module names inside ``diffusion_model``).
TARGET_PRESETS: dict[str, dict[str, list[str]]] = {
    "flux": {
        "attention": _FLUX_ATTENTION,
        "attention_mlp": _FLUX_ATTENTION + ["double_blocks.*.img_mlp.*", "double_blocks.*.txt_mlp.*"],
        "image_stream": ["double_blocks.*.img_attn.*", "double_blocks.*.img_mlp.*",
                         "single_blocks.*.linear1", "single_blocks.*.linear2"],
    },
    "qwen_image": {
        "attention": _QWEN_ATTENTION,
        "attention_mlp": _QWEN_ATTENTION + ["transformer_blocks.*.img_mlp.*", "transformer_blocks.*.txt_mlp.*"],
        "image_stream": [f"transformer_blocks.*.attn.{n}" for n in ("to_q", "to_k", "to_v", "to_out.0")]
        + ["transformer_blocks.*.img_mlp.*"],
    },
}
# Krea 2 is single-stream and Z-Image's blocks see every token: "image_stream" is their attention and MLP too.
_KREA2_ATTENTION = [f"blocks.*.attn.{n}" for n in ("wq", "wk", "wv", "wo", "gate")]
_KREA2_MLP = [f"blocks.*.mlp.{n}" for n in ("gate", "up", "down")]
_Z_IMAGE_ATTENTION = ["layers.*.attention.qkv", "layers.*.attention.out"]
_Z_IMAGE_MLP = ["layers.*.feed_forward.w1", "layers.*.feed_forward.w2", "layers.*.feed_forward.w3"]
TARGET_PRESETS["krea2"] = {"attention": _KREA2_ATTENTION, "attention_mlp": _KREA2_ATTENTION + _KREA2_MLP,
                           "image_stream": _KREA2_ATTENTION + _KREA2_MLP}
TARGET_PRESETS["z_image"] = {"attention": _Z_IMAGE_ATTENTION, "attention_mlp": _Z_IMAGE_ATTENTION + _Z_IMAGE_MLP,
                             "image_stream": _Z_IMAGE_ATTENTION + _Z_IMAGE_MLP}
PRESET_NAMES = ("attention", "attention_mlp", "image_stream")


@dataclass(frozen=True)
class LoraConfig:
    """Shape of the LoRA.

    Attributes:
        rank: inner dimension r of ``up (out, r) @ down (r, in)``.
        alpha: the delta is scaled by ``alpha / rank`` (core's convention for the ``.alpha`` key).
        targets: a preset name (see ``PRESET_NAMES``) or a comma-separated list of globs on module
            names inside ``diffusion_model`` (e.g. ``"double_blocks.*.img_attn.qkv,single_blocks.*.linear1"``).
    """

    rank: int = 16
    alpha: float = 16.0
    targets: str = "attention_mlp"

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank: expected an int >= 1, got {self.rank!r}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"alpha: expected a finite value > 0, got {self.alpha!r}")
        if not self.targets.strip():
            raise ValueError("targets: expected a preset name or a list of module globs, got an empty string")


def target_patterns(targets: str, arch: str) -> list[str]:
    """Glob patterns of a preset (for architecture ``arch``, a ``TARGET_PRESETS`` key) or a glob list."""
    name = targets.strip()
    if name in PRESET_NAMES:
        presets = TARGET_PRESETS.get(arch)
        if presets is None:
            raise ValueError(f"targets: no presets for architecture {arch!r}; pass module globs instead")
        return list(presets[name])
    return [p.strip() for p in name.split(",") if p.strip()]


def find_targets(diffusion_model: torch.nn.Module, patterns: list[str]) -> dict[str, torch.nn.Module]:
    """Linear layers (ComfyUI ops with a 2-D weight) whose name inside ``diffusion_model`` matches a pattern."""
    found = {}
    for name, module in diffusion_model.named_modules():
        weight = getattr(module, "weight", None)
        if not hasattr(module, "weight_function") or not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            found[name] = module
    return found


class LoraDelta(torch.nn.Module):
    """A ComfyUI weight wrapper: ``fn(W) = W + alpha / rank * up @ down``.

    Shapes: ``up`` (out, rank), ``down`` (rank, in), for a linear weight W (out, in). Parameters stay in
    their own dtype (float32 by default); the delta is cast to W's dtype when applied.
    """

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float,
                 dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None):
        super().__init__()
        self.rank = rank
        self.alpha = float(alpha)
        down = torch.empty((rank, in_features), dtype=torch.float32)
        # nn.Linear's default init for down, zeros for up: the LoRA starts as an exact no-op.
        bound = 1.0 / math.sqrt(in_features)
        down.uniform_(-bound, bound, generator=generator)
        self.lora_down = torch.nn.Parameter(down.to(dtype))
        self.lora_up = torch.nn.Parameter(torch.zeros((out_features, rank), dtype=dtype))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """(out, in) weight delta, in the parameters' dtype."""
        return self.scale * (self.lora_up @ self.lora_down)

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:  # called by comfy.ops.cast_bias_weight
        return weight + self.delta().to(weight.dtype).reshape(weight.shape)

    # ModelPatcher moves weight functions with the model and counts their memory.
    def passive_memory_usage(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def move_to(self, device) -> int:
        self.to(device=device)
        return self.passive_memory_usage()


class LoraSet:
    """All ``LoraDelta`` modules of one LoRA, by module name inside ``diffusion_model``."""

    def __init__(self, deltas: dict[str, LoraDelta], config: LoraConfig, patterns: list[str]):
        self.deltas = deltas
        self.config = config
        self.patterns = patterns

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        for name in sorted(self.deltas):
            yield from (self.deltas[name].lora_down, self.deltas[name].lora_up)

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """Parameters under their file key (``diffusion_model.<module>.lora_up.weight`` ...)."""
        for name in sorted(self.deltas):
            d = self.deltas[name]
            yield f"{PREFIX}{name}.lora_down.weight", d.lora_down
            yield f"{PREFIX}{name}.lora_up.weight", d.lora_up

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Tensors in core's LoRA file format (CPU, contiguous; ``dtype`` for up/down if given)."""
        out = {}
        for key, p in self.named_parameters():
            t = p.detach().to("cpu")
            out[key] = (t.to(dtype) if dtype is not None else t).contiguous()
        for name in sorted(self.deltas):
            out[f"{PREFIX}{name}.alpha"] = torch.tensor(self.deltas[name].alpha, dtype=torch.float32)
        return out

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load up/down weights saved by ``state_dict`` (resume); every key must be present with its shape."""
        for key, p in self.named_parameters():
            if key not in sd:
                raise ValueError(f"LoRA weights: {key} is missing (was the LoRA made with other targets or another model?)")
            if tuple(sd[key].shape) != tuple(p.shape):
                raise ValueError(f"LoRA weights: {key} has shape {tuple(sd[key].shape)}, expected {tuple(p.shape)}")
            p.copy_(sd[key].to(p.dtype))


def attach_lora(model_patcher, config: LoraConfig, arch: str, seed: int = 0,
                dtype: torch.dtype = torch.float32):
    """A clone of ``model_patcher`` with a fresh LoRA registered as ComfyUI weight wrappers.

    Args:
        model_patcher: a ComfyUI ``ModelPatcher`` (left untouched).
        config: rank, alpha, targets.
        arch: a ``TARGET_PRESETS`` key (picks the target presets).
        seed: seeds ``lora_down``'s init, per module (stable across runs and module order).
        dtype: dtype of the LoRA parameters.
    Returns:
        ``(clone, LoraSet)``.
    """
    patterns = target_patterns(config.targets, arch)
    diffusion_model = model_patcher.get_model_object("diffusion_model")
    modules = find_targets(diffusion_model, patterns)
    if not modules:
        raise ValueError(f"targets: {config.targets!r} matches no linear layer of this model (patterns {patterns})")
    clone = model_patcher.clone()
    deltas = {}
    for name, module in sorted(modules.items()):
        gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
        out_f, in_f = module.weight.shape
        delta = LoraDelta(out_f, in_f, config.rank, config.alpha, dtype=dtype, generator=gen)
        deltas[name] = delta
        clone.add_weight_wrapper(f"{PREFIX}{name}.weight", delta)
    return clone, LoraSet(deltas, config, patterns)
