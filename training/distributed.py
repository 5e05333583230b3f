"""Data-parallel training over ``torch.distributed`` (started by ``torchrun``; NCCL on GPUs, Gloo on the CPU).

Every process holds the same LoRA and optimizer state. An optimizer step's global batch (``grad_accumulation``
examples, drawn from the global micro-step index exactly as in one process) is split round-robin over the ranks;
each rank backpropagates its share, one all-reduce sums the LoRA gradients, the loss and a failure flag per rank,
and every rank then takes the same optimizer step. So N processes compute what one process computes with the
same global batch and seed (up to the order of float sums), and a checkpoint resumes with any world size.
Without an initialised process group everything here is the one-process case.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Group:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and shows progress."""
        return self.rank == 0

    def share(self, count: int) -> list[int]:
        """This rank's items of ``range(count)`` (round-robin; disjoint over the ranks, together all of them)."""
        return list(range(self.rank, count, self.world_size))


class RankFailed(RuntimeError):
    """Another rank failed during a step: every rank stops at the same step."""


class StepFailed(RuntimeError):
    """This rank failed during a step (the message names the rank, the step, the example and the error); the
    other ranks learn of it in the step's all-reduce and raise ``RankFailed``."""


def current() -> Group:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Group(dist.get_rank(), dist.get_world_size())
    return Group()


def launched_world_size() -> int:
    """The world size torchrun set for this process (1 when started directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: torch.device, timeout_s: float = 1800.0) -> Group:
    """Join the job torchrun started (its ``env://`` rendezvous; multi-node through torchrun's own options).
    A no-op in a process started directly or already joined."""
    import torch.distributed as dist

    if launched_world_size() > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return current()


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def reduce_step(params: list[torch.Tensor], values: list[float], failed: bool, group: Group) -> tuple[list[float], list[int]]:
    """Sum the gradients of ``params`` (in place, missing ones as zeros) and ``values`` over the ranks, in one
    all-reduce. Returns (summed values, ranks that reported a failure)."""
    import torch.distributed as dist

    device = params[0].device
    grads = [p.grad.detach().float().reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=device)
             for p in params]
    status = torch.zeros(group.world_size, device=device)
    status[group.rank] = float(failed)
    flat = torch.cat(grads + [torch.tensor(values, dtype=torch.float32, device=device), status])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        chunk = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
        if p.grad is None:
            p.grad = chunk.clone()
        else:
            p.grad.copy_(chunk)
        offset += p.numel()
    summed = [float(v) for v in flat[offset:offset + len(values)]]
    failures = [r for r, v in enumerate(flat[offset + len(values):].tolist()) if v > 0]
    return summed, failures


def reduce_values(values: list[float], group: Group, device) -> list[float]:
    """``values`` summed over the ranks (float64)."""
    import torch.distributed as dist

    if group.world_size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return [float(v) for v in t]
