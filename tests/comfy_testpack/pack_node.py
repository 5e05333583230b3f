"""One declaration for every test-pack node: its schema's fields and the function it runs.

Tests and demo only; never shipped (the test pack is in .comfyignore).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from comfy_api.latest import io

CATEGORY = "SparseContextTest"


def pack_node(node_id: str, description: str, inputs: Sequence[io.Input], outputs: Sequence[io.Output] = (),
              **schema) -> Callable[[Callable[..., io.NodeOutput]], type[io.ComfyNode]]:
    """Decorator: the V3 node ``node_id`` (category SparseContextTest) whose ``execute`` is the decorated function.

    The function takes the inputs by name (or position) and returns an ``io.NodeOutput``; a ValueError it raises
    reaches the user as ``"<node_id>: <message>"``, so its messages start with the input they name.
    """

    def declare(run: Callable[..., io.NodeOutput]) -> type[io.ComfyNode]:
        class Node(io.ComfyNode):
            @classmethod
            def define_schema(cls) -> io.Schema:
                return io.Schema(node_id=node_id, category=CATEGORY, description=description, inputs=list(inputs),
                                 outputs=list(outputs), **schema)

            @classmethod
            def execute(cls, *args, **kwargs) -> io.NodeOutput:
                try:
                    return run(*args, **kwargs)
                except ValueError as err:
                    raise ValueError(f"{node_id}: {err}") from err

        Node.__name__ = Node.__qualname__ = run.__name__
        Node.__module__, Node.__doc__ = run.__module__, run.__doc__
        return Node

    return declare
