"""Subgraphs of ComfyUI's newer UI workflows, expanded into one plain litegraph graph before conversion.

The schema assumed (ComfyUI front end's workflow schema, as its published templates carry it):

- `definitions.subgraphs` is a list of subgraph definitions, each with an `id` (a UUID), `name`, `nodes` and
  `links` (as a workflow's; links often in the object form `{id, origin_id, origin_slot, target_id,
  target_slot, type}`), `inputs` and `outputs` (slot lists: `{id, name, type, linkIds, label?}`), and
  `inputNode` / `outputNode` with the reserved ids -10 and -20. Inside a definition, a link whose origin is
  -10 starts at the subgraph's input slot `origin_slot`; a link whose target is -20 ends at output slot
  `target_slot`. Definitions may use other definitions (nesting); all are listed at the top level (a
  definition's own `definitions.subgraphs`, if any, is read too).
- An instance is a node whose `type` is a definition's id. Its `inputs` list only the slots the canvas shows,
  matched to the definition's inputs by `name`; its outputs are the definition's outputs in order.

How values flow, as the front end resolves them when it queues a prompt:

- an instance input that has a link feeds every inner input linked from that subgraph input;
- an instance input without a link whose value the instance stores (a promoted widget) feeds that value. The
  instance's `widgets_values` are read as a `{name: value}` dict, or as a list in the order of the instance's
  inputs that carry a `widget` entry, or else (front ends of mid 2025, whose instances list only socket inputs)
  in the order of the definition's inputs of a widget type (INT, FLOAT, STRING, BOOLEAN, COMBO); a list that
  fits neither count is not guessed at;
- otherwise the inner link is dropped, so the inner node keeps its own widget value (newer front ends show the
  inner widget itself on the instance, `properties.proxyWidgets`, and save its value in the inner node).

Each inner node gets the id `"<instance id>:<inner id>"` (nested: `"12:5:3"`), as ComfyUI's API format names
them, so errors say where a node sits. The boundary of each instance becomes frontend-only nodes that the
converter already follows: a `Reroute` per input and per output, and a `PrimitiveNode` for a stored value. A
muted or bypassed instance is not expanded: the converter drops it or passes its inputs through, as for any
node.
"""

from __future__ import annotations

import itertools
from typing import Any

from graph.types import WIDGET_TYPES
from graph.workflow import WorkflowFormatError

INPUT_NODE, OUTPUT_NODE = -10, -20
MUTED, BYPASSED = 2, 4
MAX_DEPTH = 16


def _link_fields(link: Any) -> tuple[Any, Any, int, Any, int, str]:
    """(id, origin, origin slot, target, target slot, type) of a link in either form."""
    if isinstance(link, list | tuple) and len(link) >= 5:
        return link[0], link[1], int(link[2]), link[3], int(link[4]), str(link[5] if len(link) > 5 else "*")
    if isinstance(link, dict):
        return (link.get("id"), link.get("origin_id"), int(link.get("origin_slot", 0)), link.get("target_id"),
                int(link.get("target_slot", 0)), str(link.get("type", "*")))
    raise WorkflowFormatError(f"malformed link entry {link!r}")


def subgraph_definitions(workflow: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every subgraph definition in a workflow, by id (nested `definitions` included)."""
    found: dict[str, dict[str, Any]] = {}
    pending = [workflow]
    while pending:
        holder = pending.pop()
        definitions = holder.get("definitions") if isinstance(holder, dict) else None
        for sub in (definitions or {}).get("subgraphs") or []:
            if not isinstance(sub, dict) or not isinstance(sub.get("id"), str) \
                    or not isinstance(sub.get("nodes"), list):
                raise WorkflowFormatError(f"malformed subgraph definition {str(sub)[:80]}")
            if sub["id"] not in found:
                found[sub["id"]] = sub
                pending.append(sub)
    return found


class _Expander:
    def __init__(self, definitions: dict[str, dict[str, Any]]) -> None:
        self.definitions = definitions
        self.link_ids = itertools.count(1)
        self.nodes: list[dict[str, Any]] = []
        self.links: list[list[Any]] = []
        self.input_reroutes: set[str] = set()

    def new_link(self, origin: str, origin_slot: int, target: str, target_slot: int, kind: str) -> int:
        link_id = next(self.link_ids)
        self.links.append([link_id, origin, origin_slot, target, target_slot, kind])
        return link_id

    def add_boundary(self, node_id: str, kind: str, value: Any = None) -> dict[str, Any]:
        node: dict[str, Any] = {"id": node_id, "type": kind, "mode": 0, "inputs": [], "outputs": []}
        if kind == "Reroute":
            node["inputs"] = [{"name": "", "type": "*", "link": None}]
        else:
            node["widgets_values"] = [value]
        self.nodes.append(node)
        return node

    def expand(self, nodes: list[Any], links: list[Any], prefix: str, stack: tuple[str, ...],
               boundary_in: dict[int, dict[str, Any]] | None = None,
               boundary_out: dict[int, dict[str, Any]] | None = None) -> None:
        """Add one graph level's nodes and links; links from -10 / to -20 attach to the given boundary nodes."""
        plain: dict[str, dict[str, Any]] = {}
        instances: dict[str, tuple[dict[str, Any], dict[int, dict[str, Any]], dict[int, dict[str, Any]]]] = {}
        for node in nodes:
            if not isinstance(node, dict) or "id" not in node or not isinstance(node.get("type"), str):
                raise WorkflowFormatError(f"malformed node entry {str(node)[:80]}")
            local, flat_id = str(node["id"]), f"{prefix}{node['id']}"
            definition = self.definitions.get(node["type"])
            if definition is not None and node.get("mode") not in (MUTED, BYPASSED):
                instances[local] = self.instance(node, flat_id, definition, stack)
                continue
            copy = dict(node, id=flat_id, inputs=[dict(slot, link=None) for slot in node.get("inputs") or []])
            plain[local] = copy
            self.nodes.append(copy)
        for link in links or []:
            _, origin, origin_slot, target, target_slot, kind = _link_fields(link)
            origin, target = str(origin), str(target)
            if origin == str(INPUT_NODE):  # from this subgraph's input slot
                feeder = (boundary_in or {}).get(origin_slot)
            elif origin in instances:  # from a nested instance's output slot
                feeder = instances[origin][2].get(origin_slot)
            else:
                feeder = plain.get(origin)
            if feeder is None:
                continue  # from a node that is not there (or an unfed input): dead, as on the canvas
            source = (feeder["id"], origin_slot if origin in plain else 0)
            if target == str(OUTPUT_NODE):
                receiver, slot = (boundary_out or {}).get(target_slot), 0
            elif target in instances:
                instance, inputs, _ = instances[target]
                shown = instance.get("inputs") or []
                name = shown[target_slot].get("name") if target_slot < len(shown) else None
                receiver, slot = inputs.get(self.input_index(instance, name)), 0
                if receiver is not None and receiver["type"] != "Reroute":
                    receiver = None  # a stored value, not a socket
            else:
                receiver, slot = plain.get(target), target_slot
            if receiver is not None and slot < len(receiver["inputs"]):
                receiver["inputs"][slot]["link"] = self.new_link(*source, receiver["id"], slot, kind)

    def input_index(self, instance: dict[str, Any], name: Any) -> int:
        """The definition's input slot an instance input names (-1 for none)."""
        for index, slot in enumerate(self.definitions[instance["type"]].get("inputs") or []):
            if slot.get("name") == name:
                return index
        return -1

    def instance(self, node: dict[str, Any], flat_id: str, definition: dict[str, Any], stack: tuple[str, ...],
                 ) -> tuple[dict[str, Any], dict[int, dict[str, Any]], dict[int, dict[str, Any]]]:
        """Expand one instance: (the instance, {input slot: boundary node}, {output slot: boundary node})."""
        if definition["id"] in stack or len(stack) >= MAX_DEPTH:
            chain = " -> ".join((*stack, definition["id"]))
            raise WorkflowFormatError(f"node {flat_id}: subgraph {definition.get('name') or definition['id']!r} "
                                      f"contains itself ({chain})")
        stored = self.stored_values(node, definition)
        linked = {slot.get("name") for slot in node.get("inputs") or [] if slot.get("link") is not None}
        boundary_in: dict[int, dict[str, Any]] = {}
        for index, slot in enumerate(definition.get("inputs") or []):
            name, boundary_id = slot.get("name"), f"{flat_id}:in{index}"
            if name in linked:
                boundary_in[index] = self.add_boundary(boundary_id, "Reroute")
                self.input_reroutes.add(boundary_id)
            elif name in stored:
                boundary_in[index] = self.add_boundary(boundary_id, "PrimitiveNode", stored[name])
            # else unfed: inner inputs keep their own widget values
        boundary_out = {index: self.add_boundary(f"{flat_id}:out{index}", "Reroute")
                        for index in range(len(definition.get("outputs") or []))}
        self.expand(definition["nodes"], definition.get("links") or [], f"{flat_id}:", (*stack, definition["id"]),
                    boundary_in, boundary_out)
        return node, boundary_in, boundary_out

    def drop_unfed_inputs(self) -> None:
        """An instance input whose outer link leads nowhere (a dead link, or an outer subgraph input that is itself
        unfed) feeds nothing: the links from it go, so inner widgets keep their own values."""
        by_id = {node["id"]: node for node in self.nodes}
        while True:
            unfed = {node_id for node_id in self.input_reroutes if by_id[node_id]["inputs"][0]["link"] is None}
            dead = [link for link in self.links if link[1] in unfed]
            if not dead:
                return
            for link in dead:
                by_id[link[3]]["inputs"][link[4]]["link"] = None
            dead_ids = {link[0] for link in dead}
            self.links = [link for link in self.links if link[0] not in dead_ids]
            self.input_reroutes -= unfed

    @staticmethod
    def stored_values(node: dict[str, Any], definition: dict[str, Any]) -> dict[str, Any]:
        """Values an instance stores for its promoted widgets, by input name."""
        values = node.get("widgets_values")
        if isinstance(values, dict):
            return dict(values)
        if not isinstance(values, list) or not values:
            return {}
        shown = [slot.get("name") for slot in node.get("inputs") or [] if slot.get("widget")]
        typed = [slot.get("name") for slot in definition.get("inputs") or [] if slot.get("type") in WIDGET_TYPES]
        for names in (shown, typed):
            if len(names) == len(values):
                return dict(zip(names, values, strict=True))
        return {}


def expand_subgraphs(workflow: dict[str, Any]) -> dict[str, Any]:
    """A UI workflow with every subgraph instance replaced by its nodes (a new dict; the input is not modified).
    A workflow without subgraph instances is returned as is."""
    definitions = subgraph_definitions(workflow)
    if not any(isinstance(n, dict) and n.get("type") in definitions for n in workflow.get("nodes") or []):
        return workflow
    expander = _Expander(definitions)
    expander.expand(workflow["nodes"], workflow.get("links") or [], "", ())
    expander.drop_unfed_inputs()
    return {**workflow, "nodes": expander.nodes, "links": expander.links}
