"""The pack's ComfyUI nodes (V3 schema), registered through one ``comfy_entrypoint``."""

from comfy_api.latest import ComfyExtension, io

from .apply_node import SparseContextApply
from .budget_node import SparseContextBudget
from .calibrate_node import SparseContextCalibrate
from .lora_loader import SparseContextLoraLoader
from .preview_node import SparseContextPreview
from .reference_nodes import REFERENCE_NODES
from .selector_nodes import SELECTOR_NODES
from .train import TRAINING_NODES

NODES: list[type[io.ComfyNode]] = [
    SparseContextApply,
    *REFERENCE_NODES,
    *SELECTOR_NODES,
    SparseContextBudget,
    SparseContextPreview,
    SparseContextCalibrate,
    SparseContextLoraLoader,
    *TRAINING_NODES,
]


class SparseContextExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> SparseContextExtension:
    return SparseContextExtension()
