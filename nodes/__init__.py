"""The pack's ComfyUI nodes (V3 schema), registered through one ``comfy_entrypoint``."""

from comfy_api.latest import ComfyExtension, io

NODES: list[type[io.ComfyNode]] = []


class SparseContextExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> SparseContextExtension:
    return SparseContextExtension()
