"""Training through the host's autograd-capable kernels, on every ComfyUI version.

Newer ComfyUI runs RoPE through comfy-kitchen's fused ops, which have no autograd formula (and no float64
kernel): backpropagating through them raises. ComfyUI 0.30+ has the official switch for this,
``comfy.model_management.in_training`` (core's TrainLoraNode sets it; Flux and Qwen-Image then take their
plain-PyTorch RoPE path). Older releases that bind the fused ops at import (0.10) have no switch: there a
``TorchFunctionMode`` maps each fused RoPE op to comfy-kitchen's own plain-PyTorch implementation (its
"eager" backend, the same arithmetic), which autograd differentiates in both modes. Both are active only
inside ``differentiable_rope()``; inference is never affected.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

from torch.overrides import TorchFunctionMode


class _EagerKitchenRope(TorchFunctionMode):
    """Calls of comfy-kitchen's fused RoPE ops go to its plain-PyTorch implementation of the same op."""

    def __init__(self, table: dict[object, Callable]):
        super().__init__()
        self.table = table

    def __torch_function__(self, func, types, args=(), kwargs=None):
        impl = self.table.get(func)
        return (impl or func)(*args, **(kwargs or {}))


def _kitchen_rope_table() -> dict[object, Callable]:
    """Fused op (packet and default overload) -> plain implementation; empty without comfy-kitchen."""
    try:
        import comfy_kitchen  # noqa: F401  (registers torch.ops.comfy_kitchen)
        import torch
        from comfy_kitchen.backends.eager import rope as eager

        ops = torch.ops.comfy_kitchen
        table = {}
        for name in ("apply_rope", "apply_rope1"):
            packet, impl = getattr(ops, name), getattr(eager, name)
            table[packet] = table[packet.default] = impl
        return table
    except (ImportError, AttributeError, RuntimeError):
        return {}


@contextmanager
def differentiable_rope() -> Iterator[None]:
    """Run a training forward (and its backward) inside this: the host's RoPE takes an autograd-capable path."""
    import comfy.model_management as mm

    with ExitStack() as stack:
        if hasattr(mm, "in_training"):
            previous = mm.in_training
            mm.in_training = True
            stack.callback(setattr, mm, "in_training", previous)
        else:
            table = _kitchen_rope_table()
            if table:
                stack.enter_context(_EagerKitchenRope(table))
        yield
