"""UI-format (v0.4) workflows <-> API-format prompts, driven by a real server's ``/object_info``.

* :class:`UIWorkflow` builds a tidy UI workflow (what the frontend loads and saves) node by node.
* :func:`ui_to_api` converts a UI workflow to the API prompt ComfyUI queues, the way the frontend does:
  widget values are matched to input names in ``input_order`` (plus the frontend-only
  ``control_after_generate`` and image ``upload`` widgets), bypassed nodes pass their input through,
  muted nodes and notes are dropped.

Host-aware like the frontend of each ComfyUI: a workflow saved with an older ComfyUI has no value for a
widget that a later core node gained (e.g. ``resolution_steps`` of ``ImageScaleToTotalPixels``); the
frontend fills ``widgets_values`` into the node's widgets by position and leaves the rest at their
defaults, so :func:`ui_to_api` and :func:`with_widget_defaults` do the same from that host's
``/object_info``.
"""

from __future__ import annotations

import copy
from typing import Any

FRONTEND_ONLY = {"Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
#: A V3 input that grows sockets as they are connected (e.g. ``images`` of TextEncodeMageFlowEdit): the frontend
#: shows the connected ones and one empty socket after them, named ``<input>.<template name>``.
AUTOGROW = "COMFY_AUTOGROW_V3"
MODE_NORMAL, MODE_MUTED, MODE_BYPASS = 0, 2, 4


def version_key(text: str) -> tuple[int, ...]:
    return tuple(int(p) if p.isdigit() else 0 for p in text.split("."))


def saved_with(workflow: dict) -> str:
    """The ComfyUI version that saved a UI workflow: the newest ``ver`` its core nodes carry."""
    return max((str(n["properties"]["ver"]) for n in workflow["nodes"]
                if (n.get("properties") or {}).get("cnr_id") == "comfy-core"), key=version_key)


def needs_newer_host(workflow: dict, host: str) -> str | None:
    """Why ComfyUI ``host`` cannot load a workflow saved by a newer one (it lacks core nodes), or None."""
    saved = saved_with(workflow)
    if version_key(saved) <= version_key(host):
        return None
    return f"saved with ComfyUI {saved}: its core nodes for this model are not in ComfyUI {host}"


def _inputs(info: dict) -> list[tuple[str, Any, dict, bool]]:
    """(name, type, options, optional) in the node's declared order."""
    out = []
    order = info.get("input_order") or {k: list(v) for k, v in info["input"].items() if k != "hidden"}
    for section in ("required", "optional"):
        spec = info["input"].get(section, {})
        for name in order.get(section, []):
            kind, *rest = spec[name]
            out.append((name, kind, rest[0] if rest else {}, section == "optional"))
    return out


def is_widget(kind: Any, options: dict) -> bool:
    if options.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def combo_options(kind: Any, options: dict) -> list | None:
    if isinstance(kind, list):
        return kind
    if kind == "COMBO":
        return list(options.get("options", []))
    return None


def has_control_widget(name: str, kind: Any, options: dict) -> bool:
    """Whether the frontend adds a "control after generate" widget after this number widget: when the input
    asks for one, and (a legacy convention every frontend keeps) for an INT named seed or noise_seed that
    does not say otherwise."""
    if options.get("control_after_generate") is not None:
        return bool(options["control_after_generate"])
    return kind == "INT" and name in ("seed", "noise_seed")


def widget_slots(info: dict) -> list[str | None]:
    """Names of the values in ``widgets_values``, in order; None = a frontend-only widget value."""
    slots: list[str | None] = []
    for name, kind, options, _ in _inputs(info):
        if not is_widget(kind, options):
            continue
        slots.append(name)
        if kind in ("INT", "FLOAT") and has_control_widget(name, kind, options):
            slots.append(None)  # "fixed" / "randomize" ...
        if options.get("image_upload") or options.get("video_upload") or options.get("audio_upload"):
            slots.append(None)  # the upload button's value
    return slots


def widget_default(kind: Any, options: dict) -> Any:
    """The value the frontend gives a widget it creates: the input's default, else the first option of a
    combo, else 0 / False / an empty string."""
    if "default" in options:
        return options["default"]
    choices = combo_options(kind, options)
    if choices is not None:
        return choices[0] if choices else None
    return {"INT": 0, "FLOAT": 0.0, "BOOLEAN": False}.get(kind, "")


def widget_defaults(info: dict) -> dict[str, Any]:
    """Input name -> the value a new widget of that input starts with."""
    return {name: widget_default(kind, opts) for name, kind, opts, _ in _inputs(info) if is_widget(kind, opts)}


def autogrow_sockets(name: str, options: dict) -> list[tuple[str, str]]:
    """Every socket an Autogrow input can grow, in order: (``name.slot``, type)."""
    template = options["template"]
    slots = template.get("names") or [f"{template['prefix']}{i}" for i in range(template["max"])]
    [(kind, *_)] = [v for section in template["input"].values() for v in section.values()]
    return [(f"{name}.{slot}", kind) for slot in slots]


def socket_inputs(info: dict, grown: dict[str, int] | None = None) -> list[tuple[str, str, bool]]:
    """(name, type, optional) of the node's sockets; an Autogrow input shows its first ``grown[name]`` sockets
    (default one: the empty socket a new node has). Grown sockets are optional."""
    out = []
    for n, k, opts, optional in _inputs(info):
        if k == AUTOGROW:
            out += [(s, t, True) for s, t in autogrow_sockets(n, opts)[: (grown or {}).get(n, 1)]]
        elif not is_widget(k, opts):
            out.append((n, k if isinstance(k, str) else "COMBO", optional))
    return out


def grown_sockets(info: dict, names: list[str]) -> dict[str, int]:
    """How many sockets each Autogrow input of a saved node shows, from the node's input names."""
    return {n: sum(x.startswith(n + ".") for x in names) for n, k, _, _ in _inputs(info) if k == AUTOGROW}


class UIWorkflow:
    """A UI-format workflow built from node types known to ``object_info``, laid out in columns."""

    COLUMN_WIDTH = 380
    GAP = 40

    def __init__(self, object_info: dict, origin: tuple[int, int] = (0, 0)):
        self.info = object_info
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.origin = origin
        self.column_bottom: dict[int, float] = {}

    def _size(self, node_type: str, widgets: list, height: float | None) -> list[float]:
        if height is not None:
            return [340, height]
        info = self.info[node_type]
        sockets = max(len(socket_inputs(info)), len(info["output"]))
        tall = sum(120 for name, kind, opts, _ in _inputs(info) if kind == "STRING" and opts.get("multiline"))
        return [340, 30 + 24 * sockets + 26 * len(widgets) + tall]

    def add(self, node_type: str, column: int, widgets: list | None = None, *, title: str | None = None,
            height: float | None = None, properties: dict | None = None, color: str | None = None,
            mode: int = MODE_NORMAL) -> int:
        """Add a node at the bottom of ``column``; returns its id. ``widgets`` = ``widgets_values``."""
        widgets = list(widgets or [])
        node_id = len(self.nodes) + 1
        size = self._size(node_type, widgets, height) if node_type not in FRONTEND_ONLY else [340, height or 200]
        x = self.origin[0] + column * self.COLUMN_WIDTH
        y = self.column_bottom.get(column, self.origin[1])
        self.column_bottom[column] = y + size[1] + self.GAP
        node: dict[str, Any] = {
            "id": node_id, "type": node_type, "pos": [x, y], "size": size, "flags": {}, "order": len(self.nodes),
            "mode": mode, "inputs": [], "outputs": [], "properties": dict(properties or {}),
            "widgets_values": widgets,
        }
        if node_type not in FRONTEND_ONLY:
            info = self.info[node_type]
            node["properties"].setdefault("Node name for S&R", node_type)
            node["inputs"] = [{"name": n, "type": t, "link": None} for n, t, _ in socket_inputs(info)]
            node["outputs"] = [{"name": name, "type": kind, "links": []}
                               for name, kind in zip(info["output_name"], info["output"], strict=True)]
            expected = len(widget_slots(info))
            if len(widgets) != expected:
                raise ValueError(f"{node_type}: expected {expected} widget values {widget_slots(info)}, got {widgets}")
        if title:
            node["title"] = title
        if color:
            node["color"], node["bgcolor"] = color, color
        self.nodes.append(node)
        return node_id

    def skip(self, column: int, pixels: float) -> None:
        self.column_bottom[column] = self.column_bottom.get(column, self.origin[1]) + pixels

    def link(self, src: int, out: int | str, dst: int, name: str) -> None:
        source, target = self.nodes[src - 1], self.nodes[dst - 1]
        if isinstance(out, str):
            out = [o["name"] for o in source["outputs"]].index(out)
        self._grow(target, name)
        slot = [i["name"] for i in target["inputs"]].index(name)
        kind = source["outputs"][out]["type"]
        link_id = len(self.links) + 1
        self.links.append([link_id, src, out, dst, slot, kind])
        source["outputs"][out]["links"].append(link_id)
        target["inputs"][slot]["link"] = link_id
        self._grow(target, name, empty_after=True)

    def _grow(self, node: dict, name: str, empty_after: bool = False) -> None:
        """Show the Autogrow sockets up to ``name`` (and, once it is connected, the next empty one), as the
        frontend does; sockets after the group move down, so saved links are re-pointed in :meth:`to_json`."""
        group = name.split(".")[0]
        spec = {n: (k, o) for n, k, o, _ in _inputs(self.info[node["type"]])}.get(group)
        if "." not in name or spec is None or spec[0] != AUTOGROW:
            return
        sockets = autogrow_sockets(group, spec[1])
        names = [s for s, _ in sockets]
        want = names.index(name) + (2 if empty_after else 1)
        shown = [i for i, inp in enumerate(node["inputs"]) if inp["name"].startswith(group + ".")]
        for s, t in sockets[len(shown):want]:
            at = max(shown) + 1
            node["inputs"].insert(at, {"name": s, "type": t, "link": None})
            shown.append(at)

    def link_widget(self, src: int, out: int, dst: int, name: str) -> None:
        """Drive the widget ``name`` of ``dst`` from an output (the frontend's widget input): the link wins over
        the widget value, which stays in ``widgets_values``."""
        target = self.nodes[dst - 1]
        kind = next(k for n, k, _, _ in _inputs(self.info[target["type"]]) if n == name)
        target["inputs"].append({"name": name, "type": kind, "widget": {"name": name}, "link": None})
        self.link(src, out, dst, name)

    def to_json(self) -> dict:
        nodes = copy.deepcopy(self.nodes)
        for node in nodes:
            for out in node["outputs"]:
                out["links"] = out["links"] or None
        links = copy.deepcopy(self.links)
        for link in links:  # the target slot as it is now (grown Autogrow sockets move later ones down)
            link[4] = [i.get("link") for i in nodes[link[3] - 1]["inputs"]].index(link[0])
        return {
            "id": "00000000-0000-4000-8000-000000000000", "revision": 0,
            "last_node_id": len(nodes), "last_link_id": len(self.links),
            "nodes": nodes, "links": links, "groups": [], "config": {},
            "extra": {"ds": {"scale": 0.6, "offset": [80, 80]}}, "version": 0.4,
        }


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API prompt the frontend would queue for a UI workflow."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}

    def source_of(node_id: int, slot_index: int):
        """Follow a link back through bypassed nodes to the producing (node, output slot)."""
        link = links[nodes[node_id]["inputs"][slot_index]["link"]]
        src, out, kind = link[1], link[2], link[5]
        seen = set()
        while nodes[src]["mode"] == MODE_BYPASS and src not in seen:
            seen.add(src)
            match = [i for i, inp in enumerate(nodes[src]["inputs"]) if inp.get("link") is not None and inp["type"] == kind]
            if not match:
                return None
            link = links[nodes[src]["inputs"][match[0]]["link"]]
            src, out = link[1], link[2]
        return str(src), out

    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY or node["mode"] in (MODE_MUTED, MODE_BYPASS):
            continue
        info = object_info[node["type"]]
        inputs: dict[str, Any] = {}
        values, defaults = node.get("widgets_values") or [], widget_defaults(info)
        for i, name in enumerate(widget_slots(info)):  # widgets the file has no value for keep their default
            if name is not None:
                inputs[name] = values[i] if i < len(values) else defaults[name]
        for slot, inp in enumerate(node["inputs"]):
            if inp.get("link") is not None:
                src = source_of(node["id"], slot)
                if src is not None:
                    inputs[inp["name"]] = [src[0], src[1]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                   "_meta": {"title": node.get("title") or info.get("display_name") or node["type"]}}
    return prompt


def with_widget_defaults(prompt: dict, object_info: dict) -> dict:
    """An API prompt saved with an older ComfyUI as this host's frontend would queue it: widget inputs the
    prompt lacks (added to a node since) get their defaults, as they do when the frontend loads the older
    UI workflow. Everything the prompt has stays as it is."""
    out = copy.deepcopy(prompt)
    for node in out.values():
        for name, value in widget_defaults(object_info[node["class_type"]]).items():
            node["inputs"].setdefault(name, value)
    return out
