"""Errors a sampling run raises when a fast path cannot do what it promises (no ComfyUI import)."""

from __future__ import annotations

#: The usual reason an attention override sees fewer blocks than the model has.
BYPASS_CAUSE = ("the diffusion model's blocks were called without transformer_options (TeaCache and WaveSpeed's "
                "first-block cache do this, and so do model classes that copy the forward, e.g. nunchaku's), or "
                "another node skipped or replaced blocks")
BYPASS_ADVICE = "use Apply Sparse Context with cache=off and a rule other than attention next to such nodes"


class SparseContextBypassed(RuntimeError):
    """The reference cache or the attention rule did not see what it relies on: the image would be wrong.

    Raised before the sampler returns, so no silently different image reaches the user.
    """

    def __init__(self, what: str):
        super().__init__(f"SparseContext: {what}. Likely cause: {BYPASS_CAUSE}. Fix: {BYPASS_ADVICE}.")
