"""Nodes that put references into the conditioning and bind each one's selection to it, by position.

A selection reaches the model patch as ``model_conds[BINDING_KEY]`` = ``CONDConstant(SelectionBinding)``:
ComfyUI passes ``model_conds`` entries to the model as forward kwargs, and the binding says which
reference (its index in ``reference_latents``) each selection belongs to.
"""

from __future__ import annotations

import comfy.conds
import node_helpers
from comfy_api.latest import io

from ..sparse_attention import BINDING_KEY, ReferenceSelection, SelectionBinding
from .common import SparseNode, SparseSelection, fail

CATEGORY = "SparseContext/conditioning"


def reference_count(entry: dict) -> int:
    refs = entry.get("reference_latents")
    return len(refs) if refs else 0


def bind(conditioning: list, selections: dict[int, ReferenceSelection]) -> list:
    """A copy of ``conditioning`` where every entry binds ``selections`` (reference index -> selection).

    Existing bindings and other ``model_conds`` entries are kept; the input is not modified.
    """
    out = []
    for cond, entry in conditioning:
        entry = entry.copy()
        model_conds = dict(entry.get("model_conds", {}))
        old = model_conds.get(BINDING_KEY)
        binding = old.cond if isinstance(old, comfy.conds.CONDConstant) and isinstance(old.cond, SelectionBinding) \
            else SelectionBinding()
        for index, selection in sorted(selections.items()):
            binding = binding.with_selection(index, selection)
        model_conds[BINDING_KEY] = comfy.conds.CONDConstant(binding)
        entry["model_conds"] = model_conds
        out.append([cond, entry])
    return out


def _check_selection(node: str, name: str, value) -> ReferenceSelection:
    if not isinstance(value, ReferenceSelection):
        raise fail(node, f"{name}: expected a SPARSE_SELECTION from a Sparse selector node, got {type(value).__name__}")
    return value


class SparseContextReferenceLatent(SparseNode):
    NAME = "Sparse Reference Latent"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SparseContextReferenceLatent", display_name=cls.NAME, category=CATEGORY,
            description="Drop-in for ReferenceLatent: adds the latent as the next reference image of an edit model "
                        "(chain several for several references) and binds the optional selection to it, so Apply "
                        "Sparse Context keeps this reference's best tokens.",
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="The prompt's conditioning (chain from another "
                                                              "reference node to add several references)."),
                io.Latent.Input("latent", optional=True, tooltip="The VAE-encoded reference image. Not connected: "
                                                                  "the conditioning passes through unchanged."),
                SparseSelection.Input("selection", optional=True,
                                      tooltip="Which tokens of this reference to keep (a Sparse selector). Not "
                                              "connected: Apply Sparse Context's default rule."),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, conditioning, latent=None, selection=None) -> io.NodeOutput:
        if latent is None:
            if selection is not None:
                raise fail(cls.NAME, "selection: is connected but latent is not; connect the reference latent too.")
            return io.NodeOutput(conditioning)
        if not isinstance(latent, dict) or "samples" not in latent:
            raise fail(cls.NAME, f"latent: expected a LATENT, got {type(latent).__name__}")
        if selection is not None:
            selection = _check_selection(cls.NAME, "selection", selection)
        out = []
        for cond, entry in conditioning:  # each entry gets the reference at its own next position
            index = reference_count(entry)
            [[cond, entry]] = node_helpers.conditioning_set_values([[cond, entry]],
                                                                   {"reference_latents": [latent["samples"]]},
                                                                   append=True)
            if selection is not None:
                [[cond, entry]] = bind([[cond, entry]], {index: selection})
            out.append([cond, entry])
        return io.NodeOutput(out)


class SparseContextBindSelections(SparseNode):
    NAME = "Bind Sparse Selections"
    SLOTS = 4

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SparseContextBindSelections", display_name=cls.NAME, category=CATEGORY,
            description="Binds selections to references another node already added (e.g. TextEncodeQwenImageEditPlus, "
                        "which encodes image1..3 itself): selection_k goes to the k-th reference, in order.",
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="Conditioning that already holds the reference images."),
                *[SparseSelection.Input(f"selection_{k}", optional=True,
                                        tooltip=f"Selection for reference {k} (e.g. image{k} of the text encoder).")
                  for k in range(1, cls.SLOTS + 1)],
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, conditioning, **selections) -> io.NodeOutput:
        chosen: dict[int, ReferenceSelection] = {}
        for k in range(1, cls.SLOTS + 1):
            value = selections.get(f"selection_{k}")
            if value is not None:
                chosen[k - 1] = _check_selection(cls.NAME, f"selection_{k}", value)
        if not chosen:
            return io.NodeOutput(conditioning)
        have = min((reference_count(entry) for _, entry in conditioning), default=0)
        highest = max(chosen) + 1
        if highest > have:
            raise fail(cls.NAME, f"selection_{highest}: is connected but the conditioning has only {have} reference "
                                 "image(s); connect the images to the text encoder (with its vae) or add Reference "
                                 "Latent nodes before this one.")
        return io.NodeOutput(bind(conditioning, chosen))


REFERENCE_NODES: list[type[io.ComfyNode]] = [SparseContextReferenceLatent, SparseContextBindSelections]
