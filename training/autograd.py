"""Backpropagation through ComfyUI's model classes, whose blocks add residuals IN PLACE.

A plain ``loss.backward()`` fails ("modified by an inplace operation"), and non-reentrant
``torch.utils.checkpoint`` silently gives wrong gradients there. Recording the graph while every tensor
autograd saves is cloned at save time gives exact gradients (checked against forward-mode AD in
float64 by ``tests/test_training.py``) at the cost of one copy per saved activation: the trainer does it
for the whole forward without gradient checkpointing, and for one block at a time in each block's
recompute with it (``training.checkpointing``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def _pack(t: torch.Tensor) -> torch.Tensor:
    return t.clone()


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


@contextmanager
def clone_saved_tensors() -> Iterator[None]:
    """Run the FORWARD pass inside this context: later in-place writes cannot corrupt what backward reads."""
    with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
        yield
