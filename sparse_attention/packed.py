"""The subsetter of families whose references are patchified inline (JoyImage-Edit): no per-reference method, so
the DIFFUSION_MODEL wrapper hands the model strips of the kept patches and this object patch of the RoPE method
gives each kept token the frequencies of its place in the reference's true grid."""

from __future__ import annotations

import torch

from .patch import ReferenceSubsetter


class ComponentRopeSubsetter(ReferenceSubsetter):
    """Object patch for ``get_rotary_pos_embed_for_components(component_sizes, device)``."""

    def __call__(self, component_sizes, *args, **kwargs):
        active = self.active
        if active is None or not any(k is not None for k in active.indices):
            return self.original(component_sizes, *args, **kwargs)
        sizes = list(component_sizes)
        p = self.patch_size
        for i, ref in enumerate(active.refs):
            if active.indices[i] is not None:
                sizes[i + 1] = (int(ref.shape[-3]), -(-int(ref.shape[-2]) // p), -(-int(ref.shape[-1]) // p))
                active.thinned.add(i)
        freqs = self.original(sizes, *args, **kwargs)  # (1, L, 1, ...): rows in component order
        rows, start = [], 0
        for i, (t, h, w) in enumerate(sizes):
            n = t * h * w
            idx = active.indices[i - 1] if i > 0 and i - 1 < len(active.indices) else None
            rows.append(torch.arange(start, start + n, device=freqs.device) if idx is None else start + idx.to(freqs.device))
            start += n
        return freqs.index_select(1, torch.cat(rows))

    def pack(self, refs, keep) -> list:
        """The references as the model receives them: each thinned one as a strip of its kept patches."""
        return [r if k is None else self.family.pack(r, k, self.patch_size) for r, k in zip(refs, keep, strict=False)] \
            + list(refs[len(keep):])
