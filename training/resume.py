"""Training checkpoints: the LoRA, the optimizer state and the run's record in one safetensors file, written so a
crash never leaves a broken one behind; any world size resumes it."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHECKPOINT_KEY = "sparse_context.checkpoint"


def write(path: str | Path, lora, optimizer: torch.optim.Optimizer, header: dict, record: dict) -> Path:
    """``lora``'s weights and ``optimizer``'s state with ``header`` (the LoRA's metadata) and ``record`` (step,
    losses, settings) as one safetensors file at ``path``."""
    from safetensors.torch import save_file

    tensors = dict(lora.state_dict())
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"optimizer.{index}.{name}"] = t.detach().to("cpu").contiguous()
    header = {**header, CHECKPOINT_KEY: json.dumps(record)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")  # a crash mid-write never leaves a bad checkpoint_*
    save_file(tensors, str(partial), metadata=header)
    partial.replace(path)
    return path


def read(path: str | Path, lora, optimizer: torch.optim.Optimizer, lora_settings: dict) -> dict:
    """Load ``write``'s file into ``lora`` and ``optimizer``; returns its record. The LoRA settings must match."""
    from safetensors import safe_open

    with torch.inference_mode(False), safe_open(str(path), framework="pt") as f:  # ordinary tensors, in a node too
        header = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    if CHECKPOINT_KEY not in header:
        raise ValueError(f"{Path(path).name}: not a Sparse Context training checkpoint")
    record = json.loads(header[CHECKPOINT_KEY])
    if record["lora"] != lora_settings:
        raise ValueError(f"{Path(path).name}: checkpoint LoRA settings {record['lora']} differ from {lora_settings}")
    with torch.inference_mode(False):
        lora.load_state_dict(tensors)
        opt = optimizer.state_dict()
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        opt["state"] = state
        optimizer.load_state_dict(opt)
    return record


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest ``checkpoint_<step>.safetensors`` in ``folder`` (None if there is none)."""
    found = sorted(Path(folder).glob("checkpoint_*.safetensors")) if Path(folder).is_dir() else []
    return found[-1] if found else None
