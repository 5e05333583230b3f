"""Per-block gradient checkpointing that is exact with ComfyUI's in-place residual blocks.

ComfyUI's Flux and Qwen-Image blocks add residuals IN PLACE into their own inputs. Non-reentrant
``torch.utils.checkpoint`` silently gives wrong gradients there (the recompute sees inputs the first run
already modified), and the ``patches_replace["dit"]`` wrappers core passes as ``original_block`` close over
the loop variable ``block``: called again after the loop (in a recompute) they run another block.

So each block runs through a ``patches_replace["dit"]`` entry (the official block-replacement hook) that:

1. calls core's ``original_block`` ONCE, during the forward, without recording a graph, on copies of the
   block's inputs (so nothing it adds in place reaches the tensors kept for the backward), and notes, through
   a forward hook on that block module (registered for that one call only), the exact call core made
   (arguments, the keyword arguments core's wrapper adds from its own scope, the outputs);
2. at backward time, replays that call on the block module itself, from copies of the kept inputs, with the
   graph recorded (saved tensors cloned, as the block still writes in place), and backpropagates through it.

Only each block's inputs stay alive between forward and backward, plus one block's graph during its
backward. The LoRA parameters of a block are inputs of its autograd node, so their gradients flow as usual.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import torch

from .autograd import clone_saved_tensors
from .rope_autograd import differentiable_rope

#: Block lists of each architecture, as core's forward loops name them in ``patches_replace["dit"]``.
BLOCK_LISTS = {
    "flux": (("double_block", "double_blocks"), ("single_block", "single_blocks")),
    "qwen_image": (("double_block", "transformer_blocks"),),
    # core calls these blocks without a block-replacement hook: counted (memory estimate), never checkpointed
    "krea2": ((None, "blocks"),),
    "z_image": ((None, "layers"),),
}


def _map_tensors(obj, fn: Callable[[torch.Tensor], torch.Tensor]):
    """``obj`` with ``fn`` applied to every tensor inside tuples, lists and dataclasses (not dicts)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        items = [_map_tensors(v, fn) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, list):
        return [_map_tensors(v, fn) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _map_tensors(getattr(obj, f.name), fn)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def _tensors(obj) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    _map_tensors(obj, lambda t: found.append(t) or t)
    return found


def _flat_outputs(output) -> list:
    return list(output) if isinstance(output, (tuple, list)) else [output]


class _BlockCall:
    """One block's call in one forward: what core ran, and how to run it again."""

    def __init__(self, module: torch.nn.Module, original_block: Callable, args: dict, params: list[torch.Tensor]):
        self.module = module
        self.original_block = original_block
        self.args = args
        self.inputs = [t for k, v in args.items() if k != "transformer_options" for t in _tensors(v)]
        self.params = params
        self.out_keys: list[str] = []
        self._captured: tuple | None = None
        self._slots: dict[int, int] = {}  # id of a copy handed to the block -> index in self.inputs
        self._out_index: list[int] = []  # per out key: position in the module's flat output

    def _capture(self, module, args, kwargs, output) -> None:
        if self._captured is None:
            # core reuses and mutates transformer_options (block_index, ...): keep this call's values
            kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
            self._captured = (args, kwargs, output)

    def run_first(self) -> tuple[torch.Tensor, ...]:
        """Core's ``original_block`` on copies of the inputs (grad mode is off inside ``Function.forward``)."""
        copies = iter([t.clone() for t in self.inputs])
        args = {k: v if k == "transformer_options" else _map_tensors(v, lambda _t: next(copies))
                for k, v in self.args.items()}
        self._slots = {id(t): i for i, t in enumerate(
            t for k, v in args.items() if k != "transformer_options" for t in _tensors(v))}
        handle = self.module.register_forward_hook(self._capture, with_kwargs=True)
        try:
            out = self.original_block(args)
        finally:
            handle.remove()
        if self._captured is None:
            raise RuntimeError(f"gradient checkpointing: core's block wrapper did not run {type(self.module).__name__} "
                               "at this index; turn gradient_checkpointing off for this model")
        call_args, call_kwargs, raw = self._captured
        for t in _tensors(list(call_args) + list(call_kwargs.values())):
            if id(t) not in self._slots and t.requires_grad:
                raise RuntimeError("gradient checkpointing: a block input that needs a gradient reaches the block "
                                   "outside the replacement's arguments; turn gradient_checkpointing off")
        flat = _flat_outputs(raw)
        self.out_keys = list(out)
        for key in self.out_keys:
            where = [i for i, o in enumerate(flat) if o is out[key]]
            if not where:
                raise RuntimeError(f"gradient checkpointing: core's block wrapper changed the block's output {key!r}; "
                                   "turn gradient_checkpointing off for this model")
            self._out_index.append(where[0])
        return tuple(out[k] for k in self.out_keys)

    def rerun(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The captured call again, on copies of ``inputs`` (the block writes into its inputs)."""
        call_args, call_kwargs, _ = self._captured

        def swap(t: torch.Tensor) -> torch.Tensor:
            slot = self._slots.get(id(t))
            return t if slot is None else inputs[slot].clone()

        args = _map_tensors(tuple(call_args), swap)
        kwargs = {k: v if isinstance(v, dict) else _map_tensors(v, swap) for k, v in call_kwargs.items()}
        flat = _flat_outputs(self.module(*args, **kwargs))
        return [flat[i] for i in self._out_index]


class _CheckpointedBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call: _BlockCall, *tensors):
        ctx.call = call
        ctx.save_for_backward(*tensors[: len(call.inputs)])
        return call.run_first()

    @staticmethod
    def backward(ctx, *grads):
        call: _BlockCall = ctx.call
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
        with torch.enable_grad(), differentiable_rope(), clone_saved_tensors():
            outputs = call.rerun(inputs)
        pairs = [(o, g) for o, g in zip(outputs, grads, strict=True) if g is not None and o.requires_grad]
        wrt = [t for t in inputs + call.params if t.requires_grad]
        found = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
                     if pairs and wrt else [None] * len(wrt))
        ctx.call = None  # the captured call holds the forward's tensors: release it with the node
        return (None, *[next(found) if t.requires_grad else None for t in inputs + call.params])


class BlockCheckpoint:
    """The ``patches_replace["dit"]`` entry of one block (see the module docstring).

    Without grad mode (evaluation, forward-mode AD) it just calls core's block.
    """

    def __init__(self, module: torch.nn.Module, params: list[torch.Tensor]):
        self.module = module
        self.params = params

    def __call__(self, args: dict, extra: dict) -> dict:
        original_block = extra["original_block"]
        if not torch.is_grad_enabled():
            return original_block(args)
        call = _BlockCall(self.module, original_block, args, self.params)
        outputs = _CheckpointedBlock.apply(call, *call.inputs, *call.params)
        return dict(zip(call.out_keys, outputs, strict=True))

    def __deepcopy__(self, memo) -> BlockCheckpoint:  # model_options are deep-copied by clone(): share, never copy modules
        return self


def blocks(diffusion_model: torch.nn.Module, arch: str) -> Iterator[tuple[str, int, str, torch.nn.Module]]:
    """``(replace kind, index, module path, module)`` of every transformer block of the model."""
    for kind, attr in BLOCK_LISTS[arch]:
        for i, module in enumerate(getattr(diffusion_model, attr)):
            yield kind, i, f"{attr}.{i}", module


def add_block_checkpointing(model_patcher, arch: str, params_by_module: dict[str, list[torch.Tensor]]) -> int:
    """Register a ``BlockCheckpoint`` for every block on ``model_patcher`` (the training clone); returns how many.

    ``params_by_module`` maps module paths inside ``diffusion_model`` to the trainable tensors used there
    (each goes to the block that contains it). Refuses a model that already has block replacements.
    """
    dm = model_patcher.get_model_object("diffusion_model")
    existing = model_patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    count = 0
    for kind, i, path, module in blocks(dm, arch):
        if kind is None:
            raise ValueError("gradient_checkpointing: ComfyUI calls this model's transformer blocks without a "
                             "block-replacement hook (patches_replace['dit']), so they cannot be checkpointed; turn "
                             "gradient_checkpointing off")
        if (kind, i) in existing:
            raise ValueError("gradient_checkpointing: this model already has a block replacement (from another node) "
                             f"at {kind} {i}; turn gradient_checkpointing off or train the model without that patch")
        params = [p for name, ps in params_by_module.items() if name.startswith(path + ".") for p in ps]
        model_patcher.set_model_patch_replace(BlockCheckpoint(module, params), "dit", kind, i)
        count += 1
    return count
