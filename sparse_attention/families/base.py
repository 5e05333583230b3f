"""What the shared patch needs to know about one model family (no ComfyUI import).

An adapter says, for one diffusion-model class: where a reference becomes tokens (the method the patch
object-patches), how large a token is (patch size, grid), how its positions are given, which ``_forward``
argument is the target latent, and whether the reference cache's joint [text, target, references] key layout
holds. Planning, selection, buckets and the report stay shared (``patch``, ``run``, ``planning``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..planning import latent_token_grid


@dataclass(frozen=True)
class ReferenceFamily:
    """One supported family. ``class_path`` is ``module.qualname`` of its diffusion-model class.

    Attributes:
        name: what users call it (README, warnings).
        class_path: the diffusion-model class (exact; a subclass is accepted when it inherits ``hook``).
        variants: per model of the class (docs): (name, the first host of the matrix 0.3.75 / 0.10.0 / 0.30.0 that
            has it, the reference method that runs its references at t=0, or "no").
        hook: the method that turns one reference latent into (tokens, ids, ...): object-patched.
        positions: how the hook gives positions ("ids (index, row, col)" ...), for the docs.
        cache_layout: whether the reference cache / attention rule's [text, target, references] order holds.
        cache_refusal: why not, when it does not (said at Apply time).
        patch_attr: the model attribute that holds the patch size.
        target_arg: the ``_forward`` argument that holds the target latent.
        context_arg: the ``_forward`` argument that holds the text tokens.
        packs: whether the model patchifies references inline (see ``joyimage``).
        embed_attr: the patch-embedding submodule, whose output width is the token width, for a model that keeps
            its width in no attribute (Krea 2's ``first``, JoyImage's ``img_in``).
    """

    name: str
    class_path: str
    variants: tuple[tuple[str, str, str], ...]
    hook: str = "process_img"
    positions: str = "ids (index, row, col)"
    cache_layout: bool = True
    cache_refusal: str = ""
    patch_attr: str = "patch_size"
    target_arg: str = "x"
    context_arg: str = "context"
    packs: bool = False  # references are patchified inline: the wrapper passes strips of kept patches (JoyImage)
    embed_attr: str = ""

    def token_width(self, diffusion_model) -> int | None:
        """Channels of one token in the blocks (heads x head size), or None where the model does not say."""
        for name in ("hidden_size", "inner_dim", "dim"):
            value = getattr(diffusion_model, name, None)
            if isinstance(value, int):
                return value
        embed = getattr(diffusion_model, self.embed_attr, None) if self.embed_attr else None
        return getattr(embed, "out_features", None) or getattr(embed, "out_channels", None)

    def patch_size(self, diffusion_model) -> int:
        """The model's patchify size (tokens per side of a latent cell block)."""
        return int(getattr(diffusion_model, self.patch_attr, 1))

    def token_grid(self, latent_shape: tuple[int, ...], patch_size: int) -> tuple[int, int]:
        """Token grid (h, w) of a latent (..., H, W) as this family patchifies it (padded to the patch size)."""
        return latent_token_grid(latent_shape, patch_size)

    def target(self, named: dict):
        """The target latent of a forward's arguments, bound by name."""
        return named[self.target_arg]

    def context(self, named: dict):
        return named.get(self.context_arg)

    def uses_references(self, named: dict, diffusion_model) -> bool:
        """Whether the model will append ``named``'s reference latents at all (some families need a method)."""
        return True

    def hook_tokens(self, out: tuple, model):
        """The token tensor (B, L, D) in what ``hook`` returned for one reference."""
        return out[0]

    def hooked_count(self, total: int, model) -> int:
        """How many tokens ``hook`` gives a reference of ``total`` grid tokens (the same, unless it pads)."""
        return total

    def take(self, out: tuple, idx, total: int, model) -> tuple:
        """What ``hook`` returns for the kept tokens ``idx`` (k,) of a reference of ``total`` tokens: tokens and
        their positions are always taken with the same index (inside the traced forward: tensor code only)."""
        tokens, ids = out[0], out[1]
        return (tokens.index_select(1, idx), ids.index_select(1, idx.to(ids.device)), *out[2:])


@dataclass(frozen=True)
class NeedsMethod(ReferenceFamily):
    """A family that appends references only when a reference method is set (Krea 2: the "Edit Model Reference
    Method" node or core's Flux KV Cache sets it); without one its references are ignored and nothing is thinned."""

    def uses_references(self, named: dict, diffusion_model) -> bool:
        method = named.get("ref_latents_method", getattr(diffusion_model, "default_ref_method", None))
        return method is not None


@dataclass(frozen=True)
class DenseFamily:
    """A reference-conditioned family that runs dense, and why (README table, the one-time warning)."""

    name: str
    class_path: str
    first_host: str  # the first host of the matrix that has it
    reason: str
