"""Z-Image omni (Lumina 2's ``comfy.ldm.lumina.model.NextDiT``; ComfyUI 0.10+).

Per reference, ``embed_all(ref, ref_caption, siglip, offset)`` returns its caption, SigLIP and image embeddings and
their RoPE frequencies (not ids), the image tokens padded to a multiple of ``pad_tokens_multiple`` with the model's
pad token at position 0. The subsetter keeps the kept image tokens with their frequencies and pads them again the
same way. The sequence is [captions][SigLIP][reference images..., target]: the target comes last, so the reference
cache's [text, target, references] layout does not hold. Everything but the target and the main caption runs at
t=0 (core's own slices follow the thinned lengths). Core's pixel-space subclass ``NextDiTPixelSpace`` (ComfyUI 0.16+)
inherits ``embed_all``; its decoder reads the target's hidden states from the joint length less the target's, which
still finds them with thinned references because the target stays last.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ReferenceFamily


@dataclass(frozen=True)
class ZImageFamily(ReferenceFamily):
    def hook_tokens(self, out: tuple, model):
        return out[0][-1]

    def hooked_count(self, total: int, model) -> int:
        multiple = getattr(model, "pad_tokens_multiple", None)
        return -(-total // multiple) * multiple if multiple else total

    def take(self, out: tuple, idx, total: int, model) -> tuple:
        embeds, freqs, *rest = out
        tokens = embeds[-1][:, :total].index_select(1, idx)
        rope = freqs[-1][:, :total].index_select(1, idx.to(freqs[-1].device))
        multiple = getattr(model, "pad_tokens_multiple", None)
        if multiple:
            pad = (-tokens.shape[1]) % multiple
            token = model.x_pad_token.to(device=tokens.device, dtype=tokens.dtype)
            tokens = torch.cat((tokens, token.unsqueeze(0).expand(tokens.shape[0], pad, -1)), dim=1)
            zero = torch.zeros((rope.shape[0], pad, 3), dtype=torch.float32, device=rope.device)
            rope = torch.cat((rope, model.rope_embedder(zero).movedim(1, 2).to(rope.dtype)), dim=1)
        return ((*embeds[:-1], tokens), (*freqs[:-1], rope), *rest)


Z_IMAGE = ZImageFamily(
    name="Z-Image omni",
    class_path="comfy.ldm.lumina.model.NextDiT",
    variants=(("Z-Image omni (TextEncodeZImageOmni)", "0.10.0",
               "yes: every reference token (and its caption and SigLIP tokens)"),
              ("Z-Image pixel space (subclass `NextDiTPixelSpace`, ComfyUI 0.16+)", "0.30.0",
               "yes: every reference token (and its caption tokens)")),
    hook="embed_all",
    positions="RoPE frequencies of ids (sequence index, row, col), padded to 32",
    cache_layout=False,
    cache_refusal="Z-Image omni puts its references before the target ([captions][SigLIP][references, target]), "
                  "not after it, as the reference cache and the attention rule expect",
)
