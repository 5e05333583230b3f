"""How much device memory a training step needs besides the base weights: what the trainer tells ComfyUI.

Core's own estimate (``BaseModel.memory_required``) is for inference and depends only on the latent size, so it
cannot tell a training step with checkpointing from one without, nor a small model from a large one. This
estimate is computed from the model's blocks and the training settings:

* the LoRA: its parameters, their gradients and AdamW's two moments (4x the LoRA's bytes);
* per transformer block, the tensors autograd saves while the block's graph is recorded: every token-wise
  linear layer's input and output, twice over (the norms, modulations, activation functions, RoPE and attention
  in between save about as much again), for every token of the sequence (text + target + kept reference
  tokens), in the compute dtype, plus the copies of the block's weights its layers saved (each layer computes
  with a per-forward copy, or the weight + LoRA, and saves it for the backward). The trainer records every graph
  with saved tensors cloned (``training.autograd``): the clone is what autograd keeps and the original is freed
  when the next operation no longer needs it, so the count is per saved tensor, plus one block's worth more for
  the copies alive at the same time during the backward;
* without gradient checkpointing all blocks' saved tensors are alive at the end of the forward; with it only
  each block's inputs (the input and the copy core's call ran on: two hidden-widths per token) plus one block's
  saved tensors during its recompute;
* when core's attention materializes the token x token scores (its sub-quadratic, split and basic attention,
  ComfyUI's choice without PyTorch attention, e.g. on the CPU), each block whose graph is recorded keeps the
  scores and their softmax (heads x tokens^2 each), and the backward holds two more for one block.
  PyTorch SDPA, flash, sage and xformers keep no such matrix.

It is an upper bound of the bytes the step allocates, within a small factor (checked against the allocations
the training benchmark counts, ``tests/test_training_memory.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Core's attention functions that never hold the token x token score matrix.
FUSED_ATTENTION = ("attention_pytorch", "attention_flash", "attention_sage", "attention_xformers")
#: Per token-wise linear layer of a block, the hidden-widths autograd saves per token: its input and output,
#: and about as much again for the element-wise operations and attention between the layers.
SAVED_PER_LINEAR_WIDTH = 2


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes one training step needs on the device besides the base weights (``total``), by part."""

    lora: int  # LoRA parameters + gradients + AdamW moments
    kept_inputs: int  # with checkpointing: every block's inputs, kept between forward and backward
    activations: int  # saved tensors of the blocks whose graph is alive at once (all, or one + one in backward)
    attention_scores: int  # token x token scores, where core's attention materializes them
    weight_copies: int  # per-forward weight copies saved by those blocks' layers
    tokens: int  # sequence length of one example (text + target + kept reference tokens)

    @property
    def total(self) -> int:
        return self.lora + self.kept_inputs + self.activations + self.weight_copies + self.attention_scores


def _token_linears(block: torch.nn.Module) -> list[torch.nn.Linear]:
    """The block's linear layers that run on every token (not the modulation layers, which run on one vector)."""
    return [m for name, m in block.named_modules() if isinstance(m, torch.nn.Linear) and "mod" not in name.split(".")[0]]


def block_widths(block: torch.nn.Module, double: bool) -> int:
    """Hidden-widths (summed input + output features) a token passes through in ``block``'s linear layers. In a
    double-stream block every token goes through one of the two streams' layers (half of them)."""
    widths = sum(m.in_features + m.out_features for m in _token_linears(block))
    return widths // 2 if double else widths


def quadratic_attention() -> bool:
    """Whether core's attention function (what the model's blocks call) materializes the scores."""
    import comfy.ldm.modules.attention as attention

    return attention.optimized_attention.__name__ not in FUSED_ATTENTION


def estimate(blocks: list[tuple[torch.nn.Module, bool]], hidden: int, heads: int, tokens: int, batch: int,
             dtype: torch.dtype, lora_bytes: int, checkpointing: bool, quadratic: bool) -> TrainingMemory:
    """The estimate for ``blocks`` (``(module, is_double_stream)``) of a model with ``hidden`` features in ``heads``
    attention heads, ``tokens`` per example, ``batch`` examples per forward, computing in ``dtype``; ``quadratic``:
    the attention materializes the scores (``quadratic_attention``)."""
    item = torch.empty((), dtype=dtype).element_size()
    saved = [SAVED_PER_LINEAR_WIDTH * block_widths(m, double) * tokens * batch * item for m, double in blocks]
    weights = [sum(p.numel() for p in m.parameters()) * item for m, _ in blocks]
    scores = heads * tokens * tokens * batch * item if quadratic else 0
    if checkpointing:
        kept = 2 * hidden * tokens * batch * item * len(blocks)
        # one block's recompute, and the next one's copies as the backward moves on
        activations, copies, recorded = 2 * max(saved, default=0), 2 * max(weights, default=0), 1
    else:
        kept = 0
        activations, copies = sum(saved) + max(saved, default=0), sum(weights) + max(weights, default=0)
        recorded = len(blocks)
    return TrainingMemory(lora=4 * lora_bytes, kept_inputs=kept, activations=activations, weight_copies=copies,
                          attention_scores=(2 * recorded + 2) * scores, tokens=tokens)


def _image_tokens(latent: torch.Tensor, patch: int) -> int:
    """Tokens of one latent ((B, C, H, W), or (B, C, T, H, W) for Qwen-Image) after the model's patchify."""
    frames = latent.shape[2] if latent.ndim == 5 else 1
    return frames * (-(-latent.shape[-2] // patch)) * (-(-latent.shape[-1] // patch))


def sequence_tokens(example, text_tokens: int, patch: int, keep_ratio: float) -> int:
    """``text_tokens`` + target + kept reference tokens of ``example`` (a ``TrainingExample``) at ``keep_ratio``."""
    kept = sum(min(n, int(keep_ratio * n + 0.5)) for n in (_image_tokens(r, patch) for r in example.references))
    return int(text_tokens) + _image_tokens(example.target, patch) + kept
