"""Sparse Context LoRA files: safetensors in core's LoRA key format, with metadata in the header.

Keys: ``diffusion_model.<module>.lora_up.weight`` (out, r), ``.lora_down.weight`` (r, in), ``.alpha``.
Header metadata (all strings), under ``sparse_context.*``: ``format``, ``family`` (flux1 / flux2 /
qwen_image), ``architecture`` (JSON sizes), ``rank``, ``alpha``, ``targets`` (JSON globs),
``keep_ratio_distribution`` (JSON), ``recommended_keep_ratio``, ``steps``, ``pack_version``; plus
``modelspec.title`` for tools that list LoRAs.

Loading reads safetensors only (``comfy.utils.load_torch_file(path, safe_load=True)``; ``.safetensors`` or
``.sft``, the suffixes core reads as safetensors); pickle-based files are refused before anything in them is
read. A file whose weights hold NaN or inf, or whose metadata recommends a keep ratio outside (0, 1], is
refused at load, naming the file and the first bad key: applied, it would make every image NaN (black).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

NS = "sparse_context."
FORMAT_VERSION = "1"
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")  # what comfy.utils.load_torch_file reads as safetensors


def pack_version() -> str:
    """The pack's version from its pyproject.toml ("unknown" if it cannot be read)."""
    try:
        text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return "unknown"
    m = re.search(r'^version\s*=\s*"([^"]+)"', text, flags=re.MULTILINE)
    return m.group(1) if m else "unknown"


@dataclass(frozen=True)
class LoraMetadata:
    """What a Sparse Context LoRA records about itself (None where a file does not say)."""

    family: str | None = None
    architecture: dict | None = None
    rank: int | None = None
    alpha: float | None = None
    targets: list | None = None
    keep_ratio_distribution: dict | None = None
    recommended_keep_ratio: float | None = None
    steps: int | None = None
    pack_version: str | None = None
    is_sparse_context: bool = False

    def to_header(self) -> dict[str, str]:
        h = {f"{NS}format": FORMAT_VERSION}
        for key in ("family", "rank", "alpha", "recommended_keep_ratio", "steps", "pack_version"):
            value = getattr(self, key)
            if value is not None:
                h[NS + key] = str(value)
        for key in ("architecture", "targets", "keep_ratio_distribution"):
            value = getattr(self, key)
            if value is not None:
                h[NS + key] = json.dumps(value, sort_keys=True)
        h["modelspec.title"] = f"Sparse Context drop-robust LoRA ({self.family})"
        return h

    @classmethod
    def from_header(cls, header: dict[str, str] | None) -> LoraMetadata:
        header = header or {}
        if f"{NS}format" not in header:
            return cls()

        def get(key, conv):
            raw = header.get(NS + key)
            if raw is None:
                return None
            try:
                return conv(raw)
            except (ValueError, TypeError):
                return None

        return cls(family=get("family", str), architecture=get("architecture", json.loads), rank=get("rank", int),
                   alpha=get("alpha", float), targets=get("targets", json.loads),
                   keep_ratio_distribution=get("keep_ratio_distribution", json.loads),
                   recommended_keep_ratio=get("recommended_keep_ratio", float), steps=get("steps", int),
                   pack_version=get("pack_version", str), is_sparse_context=True)

    def summary(self) -> str:
        if not self.is_sparse_context:
            return "no Sparse Context metadata (a generic LoRA)"
        dist = self.keep_ratio_distribution or {}
        drop = (f"keep U[{dist.get('low')}, {dist.get('high')}] with {100 * float(dist.get('dense_share', 0)):g}% dense"
                if dist.get("kind") == "uniform" else f"keep {dist.get('low')} ({dist.get('kind')})") if dist else "unknown"
        return (f"family {self.family}, rank {self.rank}, alpha {self.alpha}, {self.steps} steps, trained with {drop}; "
                f"recommended keep ratio {self.recommended_keep_ratio}; pack {self.pack_version}")


def save_lora(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: LoraMetadata) -> Path:
    """Write a LoRA (core key format) with its metadata in the safetensors header."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}, str(path),
              metadata=metadata.to_header())
    return path


def read_header(path: str | Path) -> dict[str, str]:
    """The safetensors header metadata of ``path`` (ValueError if it is not a safetensors file)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{Path(path).name} is not a valid safetensors file ({err})") from err


def load_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], LoraMetadata]:
    """Tensors and metadata of a LoRA file: safetensors only (nothing is unpickled), finite weights, and
    metadata in range; otherwise ``ValueError`` naming the file (and the first bad key)."""
    path = Path(path)
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        raise ValueError(f"{path.name} is not a .safetensors file; Sparse Context LoRAs are safetensors and "
                         "pickle-based files (.pt, .ckpt, .bin) are not loaded")
    header = read_header(path)  # validates the header before any tensor is read
    import comfy.utils

    try:
        sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    except Exception as err:
        raise ValueError(f"{path.name} could not be read as safetensors ({err})") from err
    bad = next((k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise ValueError(f"{path.name}: tensor {bad!r} contains NaN or infinite values; the file is damaged "
                         "(or its training diverged) and would make every image NaN")
    meta = LoraMetadata.from_header(header)
    keep = meta.recommended_keep_ratio
    if keep is not None and not (math.isfinite(keep) and 0 < keep <= 1):
        raise ValueError(f"{path.name}: metadata {NS}recommended_keep_ratio is {header[NS + 'recommended_keep_ratio']}, "
                         "not a keep ratio in (0, 1]")
    return sd, meta


@dataclass
class LoraMatch:
    """How a LoRA's keys map onto a model: matched module keys, unmatched file keys, shape errors."""

    matched: list[str]
    missing: list[str]  # LoRA modules with no counterpart in the model
    shape_errors: list[str]

    @property
    def ok(self) -> bool:
        return bool(self.matched) and not self.missing and not self.shape_errors


_SUFFIXES = (".lora_up.weight", ".lora_down.weight", ".alpha", ".lora_B.weight", ".lora_A.weight")


def match_lora(model_patcher, sd: dict[str, torch.Tensor]) -> LoraMatch:
    """Map a LoRA's modules to the model with core's key map (``comfy.lora.model_lora_keys_unet``) and
    check that ``up @ down`` has the target weight's shape."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(model_patcher.model, {})
    modules = set()
    for k in sd:
        for suffix in _SUFFIXES:
            if k.endswith(suffix):
                modules.add(k[: -len(suffix)])
                break
        else:
            modules.add(k)
    state = model_patcher.model.state_dict()
    matched, missing, errors = [], [], []
    for m in sorted(modules):
        target = key_map.get(m)
        if target is None:
            missing.append(m)
            continue
        matched.append(m)
        up = sd.get(f"{m}.lora_up.weight", sd.get(f"{m}.lora_B.weight"))
        down = sd.get(f"{m}.lora_down.weight", sd.get(f"{m}.lora_A.weight"))
        weight = state.get(target)
        if up is not None and down is not None and weight is not None:
            if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0] \
                    or (up.shape[0], down.shape[1]) != tuple(weight.shape[:2]):
                errors.append(f"{m}: LoRA {tuple(up.shape)} @ {tuple(down.shape)} vs weight {tuple(weight.shape)}")
    return LoraMatch(matched, missing, errors)


def apply_lora(model_patcher, sd: dict[str, torch.Tensor], strength: float):
    """``comfy.sd.load_lora_for_models(model, None, sd, strength, 0)``: core's own LoRA patching."""
    import comfy.sd

    patched, _ = comfy.sd.load_lora_for_models(model_patcher, None, sd, strength, 0)
    return patched
