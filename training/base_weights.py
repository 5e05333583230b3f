"""How the trainer reads the frozen base model: through ComfyUI's weight function, never changing the model.

* Weights loaded inside a ComfyUI node run are inference tensors, which autograd refuses to save for backward.
  The training clone reads such a weight through a weight wrapper (ComfyUI's cast then hands it a copy made
  for this forward), or, for the few tensors that are not weights of ComfyUI ops (norm scales, buffers),
  through an object patch holding an ordinary copy. The shared model is restored by core when the clone
  unloads, as with any patch.
* Low-precision bases (ComfyUI's fp8 weight dtypes) need nothing special: ComfyUI casts each weight to the
  compute dtype and THEN applies the weight function, so the LoRA is trained against exactly the fp8 values
  upcast, which is what inference computes with.
* A layer whose forward does not go through the weight function (GGUF and other custom-quantized formats,
  ops that override ``forward``) would give the LoRA no gradient at all: ``check_lora_reaches_weights``
  finds those before the first step, by asking each adapted layer for the gradient it gives its LoRA.
"""

from __future__ import annotations

import torch

PREFIX = "diffusion_model."


def read_through_copy(weight: torch.Tensor) -> torch.Tensor:
    """Weight wrapper that changes nothing: having any wrapper makes ComfyUI's cast copy the weight for the
    forward (``cast_bias_weight(..., copy=<has a function>)``), and that copy is an ordinary tensor."""
    return weight


def guard_inference_tensors(model_patcher, wrapped: set[str]) -> int:
    """Patch ``model_patcher`` (the training clone) so no inference tensor of its diffusion model reaches a
    recorded graph. ``wrapped``: keys (``diffusion_model.<module>.weight``) that already have a trainer
    wrapper. Returns the number of tensors patched."""
    dm = model_patcher.get_model_object("diffusion_model")
    count = 0
    for mod_name, module in dm.named_modules():
        for is_param, tensors in ((True, module._parameters), (False, module._buffers)):
            for name, t in tensors.items():
                if t is None or not t.is_inference():
                    continue
                key = f"{PREFIX}{mod_name}.{name}" if mod_name else f"{PREFIX}{name}"
                if name in ("weight", "bias") and hasattr(module, f"{name}_function"):
                    if key not in wrapped:
                        model_patcher.add_weight_wrapper(key, read_through_copy)
                else:
                    with torch.inference_mode(False):
                        copy = t.detach().clone()
                    model_patcher.add_object_patch(key, torch.nn.Parameter(copy, requires_grad=False) if is_param else copy)
                count += 1
    return count


def remove_weight_functions(diffusion_model: torch.nn.Module, functions) -> None:
    """Take ``functions`` out of the modules' weight/bias functions (core leaves them after a full load until
    the next load; a direct call of the bare model must not see them)."""
    mine = {id(f) for f in functions}
    for module in diffusion_model.modules():
        for attr in ("weight_function", "bias_function"):
            funcs = getattr(module, attr, None)
            if isinstance(funcs, list) and any(id(f) in mine for f in funcs):
                setattr(module, attr, [f for f in funcs if id(f) not in mine])


def _weight_kind(module: torch.nn.Module) -> str:
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        return "no weight tensor"
    quant = getattr(w, "tensor_type", None)  # GGUF's GGMLTensor records its quantization type
    kind = f"{type(w).__name__} {getattr(quant, 'name', quant) or str(w.dtype).replace('torch.', '')}"
    return kind


def check_lora_reaches_weights(diffusion_model: torch.nn.Module, lora, device, dtype: torch.dtype) -> None:
    """ValueError naming the layers whose forward bypasses ComfyUI's weight function (the LoRA would get no
    gradient there). Each adapted layer runs once on a small input; the gradient its LoRA ``up`` factor gets
    must be the exact one of ``x @ (W + scale * up @ down).T``: every row ``scale * down @ sum(x)``."""
    gen = torch.Generator().manual_seed(0)
    bad: list[tuple[str, str]] = []
    for name, delta in sorted(lora.deltas.items()):
        module = diffusion_model.get_submodule(name)
        x = torch.randn((2, delta.lora_down.shape[1]), generator=gen).to(device=device, dtype=dtype)
        try:
            with torch.enable_grad():
                out = module(x)
                grad = None
                if isinstance(out, torch.Tensor) and out.requires_grad:
                    grad = torch.autograd.grad(out.float().sum(), delta.lora_up, allow_unused=True)[0]
        except Exception as err:  # a quantized kernel without a backward, a shape it cannot take, ...
            bad.append((name, f"{type(err).__name__}: {err}"))
            continue
        if grad is None:
            bad.append((name, "its output does not depend on the LoRA"))
            continue
        row = delta.scale * (delta.lora_down.detach().double() @ x.double().sum(0))
        error = (grad.double() - row.expand_as(grad)).norm()
        if not bool(torch.isfinite(error)) or float(error) > 0.02 * float(row.norm()) * grad.shape[0] ** 0.5 + 1e-6:
            bad.append((name, "it does not compute x @ (W + LoRA).T"))
    if bad:
        name, why = bad[0]
        module = diffusion_model.get_submodule(name)
        raise ValueError(
            f"model: {len(bad)} of {len(lora.deltas)} layers the LoRA adapts compute without ComfyUI's weight function "
            f"(e.g. {name}: {type(module).__qualname__}, {_weight_kind(module)} weights; {why}), so a LoRA cannot be "
            "trained through them: GGUF and other custom-quantized formats (also scaled-fp8 files on older ComfyUI) "
            "run their own weight path. To train, load an unquantized (bf16/fp16) checkpoint of the model with Load "
            "Diffusion Model, weight_dtype default or fp8_e4m3fn (half the memory); the trained LoRA can then be used "
            "with the quantized model.")
