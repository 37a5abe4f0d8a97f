"""Conversion of the canvas' UI format (litegraph 0.4, as ComfyUI saves it) to the API format.

The UI format stores widget values positionally in `widgets_values`, in the node's declared input order,
and links in a table `[link id, origin id, origin slot, target id, target slot, type]`. The conversion
uses each node's declaration to name the values, and resolves what only the canvas knows:

- a seed-like widget (`control_after_generate`, or an INT named `seed` / `noise_seed` as older front ends
  treated them) may be followed by its control mode (`fixed`, `increment`, `decrement`, `randomize`): skipped
  where it is there, not assumed where it is not; an upload widget (`image_upload`) is followed by the upload
  button's value when the list is long enough to hold it;
- a widget with no saved value (`widgets_values` missing, shorter than the widgets, or a `{name: value}` dict
  without that name) gets its declared default, as the front end fills it when it loads the node; a COMBO
  without a default gets its first option (lists of model files only when an environment is given);
- subgraphs (`definitions.subgraphs`) are expanded first (graph/subgraphs.py), inner nodes named "12:5";
- muted nodes (mode 2) are dropped; bypassed nodes (mode 4) pass each output through from their first input
  of the same type (the same slot first);
- Reroute nodes are followed to their source, PrimitiveNode values become literals, Notes are ignored.

The web canvas implements the same rules in JavaScript; tests check that both agree on every shipped workflow.
"""

from __future__ import annotations

from typing import Any

from graph.node import Input
from graph.registry import NodeRegistry
from graph.subgraphs import expand_subgraphs
from graph.types import BOOLEAN, COMBO, FLOAT, INT, STRING, types_compatible
from graph.workflow import WorkflowFormatError, is_ui_workflow

MUTED, BYPASSED = 2, 4
REROUTE, PRIMITIVE = "Reroute", "PrimitiveNode"
FRONTEND_ONLY = frozenset({REROUTE, PRIMITIVE, "Note", "MarkdownNote"})
CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize"})
SEED_NAMES = frozenset({"seed", "noise_seed"})


def has_control_value(widget: Input) -> bool:
    """Whether the front end gives this widget a control_after_generate companion value."""
    return widget.control_after_generate or (widget.type == INT and widget.name in SEED_NAMES)


# What the front end starts a widget at when its input declares no default (ComfyUI declares none for prompts
# and primitives): an empty text, false, and 0 (brought within the input's range).
EMPTY_WIDGET_VALUES: dict[str, Any] = {STRING: "", BOOLEAN: False, INT: 0, FLOAT: 0.0}


def widget_default(widget: Input, env: Any = None) -> Any:
    """The value the front end gives a widget that has no saved value: its default, else a combo's first option,
    else the type's empty value (None for a combo without options, or with a model list and no environment)."""
    if widget.default is not None:
        return widget.default
    if widget.type == COMBO:
        if env is None and callable(widget.options):
            return None
        options = widget.resolve_options(env)
        return options[0] if options else None
    value = EMPTY_WIDGET_VALUES.get(widget.type)
    if widget.type in (INT, FLOAT) and value is not None:
        value = min(max(value, widget.min if widget.min is not None else value),
                    widget.max if widget.max is not None else value)
    return value


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


def _companion_follows(widget: Input, values: list[Any], position: int, widgets_left: int) -> bool:
    """Whether values[position] is the UI-only value after `widget`: a control mode, or an upload button's value
    when more values remain than widgets."""
    if position >= len(values):
        return False
    if has_control_value(widget):
        return isinstance(values[position], str) and values[position] in CONTROL_VALUES
    upload = widget.extra.get("image_upload") or widget.extra.get("video_upload")  # ComfyUI's front end: alike
    return bool(upload) and len(values) - position > widgets_left


class _Converter:
    def __init__(self, workflow: dict[str, Any], registry: NodeRegistry, env: Any = None) -> None:
        self.registry = registry
        self.env = env
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
        if cls is None:
            return {}
        widgets = [i for i in cls.inputs if i.is_widget]
        values = node.get("widgets_values")
        named: dict[str, Any] = {}
        if isinstance(values, dict):
            named = {w.name: values[w.name] for w in widgets if w.name in values}
        elif isinstance(values, list):
            position = 0
            for index, widget in enumerate(widgets):
                if position >= len(values):
                    break
                named[widget.name] = values[position]
                position += 1
                if _companion_follows(widget, values, position, len(widgets) - index - 1):
                    position += 1
        for widget in widgets:
            if widget.name not in named:
                default = widget_default(widget, self.env)
                if default is not None:
                    named[widget.name] = default
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


def ui_to_api(workflow: dict[str, Any], registry: NodeRegistry, env: Any = None) -> dict[str, Any]:
    """Convert a UI-format workflow to the API format (a new dict; the input is not modified). `env` resolves
    model-list combos for widgets saved without a value."""
    if not isinstance(workflow, dict) or not isinstance(workflow.get("nodes"), list):
        raise WorkflowFormatError("not a UI-format workflow: no 'nodes' list")
    return _Converter(expand_subgraphs(workflow), registry, env).convert()


def to_api_prompt(data: Any, registry: NodeRegistry, env: Any = None) -> Any:
    """Either format in, the API format out (API-format input is returned as is)."""
    return ui_to_api(data, registry, env) if is_ui_workflow(data) else data
