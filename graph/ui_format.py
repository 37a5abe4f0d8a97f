"""Conversion of the canvas' UI format (litegraph 0.4, as ComfyUI saves it) to the API format.

The UI format stores widget values positionally in `widgets_values`, in the node's declared input order,
and links in a table `[link id, origin id, origin slot, target id, target slot, type]`. The conversion
uses each node's declaration to name the values, and resolves what only the canvas knows:

- a seed-like widget (`control_after_generate`) and an upload widget (`image_upload`) are followed by one
  UI-only value (the control mode, the upload button), skipped when present;
- muted nodes (mode 2) are dropped; bypassed nodes (mode 4) pass each output through from their first input
  of the same type (the same slot first);
- Reroute nodes are followed to their source, PrimitiveNode values become literals, Notes are ignored.

The web canvas implements the same rules in JavaScript; tests check that both agree on every shipped workflow.
"""

from __future__ import annotations

from typing import Any

from graph.registry import NodeRegistry
from graph.types import types_compatible
from graph.workflow import WorkflowFormatError, is_ui_workflow

MUTED, BYPASSED = 2, 4
REROUTE, PRIMITIVE = "Reroute", "PrimitiveNode"
FRONTEND_ONLY = frozenset({REROUTE, PRIMITIVE, "Note", "MarkdownNote"})


def _links_table(workflow: dict[str, Any]) -> dict[int, tuple[str, int, str, int, str]]:
    table = {}
    for link in workflow.get("links") or []:
        if isinstance(link, list | tuple) and len(link) >= 5:
            link_id, origin, origin_slot, target, target_slot = link[:5]
            link_type = link[5] if len(link) > 5 else "*"
        elif isinstance(link, dict):
            link_id, origin, origin_slot = link.get("id"), link.get("origin_id"), link.get("origin_slot")
            target, target_slot, link_type = link.get("target_id"), link.get("target_slot"), link.get("type", "*")
        else:
            raise WorkflowFormatError(f"malformed link entry {link!r}")
        table[link_id] = (str(origin), int(origin_slot), str(target), int(target_slot), str(link_type))
    return table


class _Converter:
    def __init__(self, workflow: dict[str, Any], registry: NodeRegistry) -> None:
        self.registry = registry
        self.nodes: dict[str, dict[str, Any]] = {}
        for node in workflow["nodes"]:
            if not isinstance(node, dict) or "id" not in node or not isinstance(node.get("type"), str):
                raise WorkflowFormatError(f"malformed node entry {str(node)[:80]}")
            self.nodes[str(node["id"])] = node
        self.links = _links_table(workflow)

    def input_link(self, node: dict[str, Any], index: int) -> int | None:
        inputs = node.get("inputs") or []
        return inputs[index].get("link") if index < len(inputs) else None

    def resolve(self, link_id: int | None, depth: int = 0) -> tuple[str, Any] | None:
        """Follow a link to what really feeds it: ("link", [id, slot]), ("literal", value) or None."""
        if link_id is None or link_id not in self.links or depth > 64:
            return None
        origin, slot, _, _, link_type = self.links[link_id]
        node = self.nodes.get(origin)
        if node is None or node.get("mode") == MUTED:
            return None
        kind = node["type"]
        if kind == REROUTE:
            return self.resolve(self.input_link(node, 0), depth + 1)
        if kind == PRIMITIVE:
            values = node.get("widgets_values") or []
            return ("literal", values[0]) if values else None
        if node.get("mode") == BYPASSED:
            inputs = node.get("inputs") or []
            outputs = node.get("outputs") or []
            out_type = outputs[slot].get("type", link_type) if slot < len(outputs) else link_type
            order = ([slot] if slot < len(inputs) else []) + [i for i in range(len(inputs)) if i != slot]
            for i in order:
                if types_compatible(str(inputs[i].get("type", "*")), str(out_type)):
                    return self.resolve(inputs[i].get("link"), depth + 1)
            return None
        return ("link", [origin, slot])

    def widget_inputs(self, node: dict[str, Any]) -> dict[str, Any]:
        cls = self.registry.get(node["type"])
        values = node.get("widgets_values")
        if cls is None or values is None:
            return {}
        widgets = [i for i in cls.inputs if i.is_widget]
        if isinstance(values, dict):
            return {w.name: values[w.name] for w in widgets if w.name in values}
        extras = sum(1 for w in widgets if w.control_after_generate or w.extra.get("image_upload"))
        skip_extras = len(values) >= len(widgets) + extras
        named: dict[str, Any] = {}
        position = 0
        for widget in widgets:
            if position >= len(values):
                break
            named[widget.name] = values[position]
            position += 1
            if skip_extras and (widget.control_after_generate or widget.extra.get("image_upload")):
                position += 1
        return named

    def convert(self) -> dict[str, Any]:
        api: dict[str, Any] = {}
        for node_id, node in self.nodes.items():
            if node["type"] in FRONTEND_ONLY or node.get("mode") in (MUTED, BYPASSED):
                continue
            inputs: dict[str, Any] = {}
            for name, value in self.widget_inputs(node).items():
                inputs[name] = {"__value__": value} if isinstance(value, list) else value
            for slot in node.get("inputs") or []:
                resolved = self.resolve(slot.get("link"))
                name = slot.get("name")
                if not name:
                    continue
                if resolved is None:
                    if slot.get("link") is not None or not slot.get("widget"):
                        inputs.pop(name, None)  # a dead link leaves the input missing, as on the canvas
                    continue
                kind, value = resolved
                inputs[name] = ({"__value__": value} if isinstance(value, list) else value) \
                    if kind == "literal" else value
            cls = self.registry.get(node["type"])
            title = node.get("title") or (cls.display_name or cls.node_type if cls else node["type"])
            api[node_id] = {"class_type": node["type"], "inputs": inputs, "_meta": {"title": title}}
        return api


def ui_to_api(workflow: dict[str, Any], registry: NodeRegistry) -> dict[str, Any]:
    """Convert a UI-format workflow to the API format (a new dict; the input is not modified)."""
    if not isinstance(workflow, dict) or not isinstance(workflow.get("nodes"), list):
        raise WorkflowFormatError("not a UI-format workflow: no 'nodes' list")
    return _Converter(workflow, registry).convert()


def to_api_prompt(data: Any, registry: NodeRegistry) -> Any:
    """Either format in, the API format out (API-format input is returned as is)."""
    return ui_to_api(data, registry) if is_ui_workflow(data) else data
