"""The API-format workflow and the internal graph it becomes.

API format, exactly as ComfyUI's `POST /prompt` takes it:
`{"<id>": {"class_type": "KSampler", "inputs": {"seed": 5, "model": ["4", 0]}, "_meta": {"title": "..."}}}`.
A two-element list is a link `[source id, output index]`; a literal list is wrapped as
`{"__value__": [...]}`. Parsing never mutates the caller's JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx


@dataclass
class NodeCall:
    """One node of a workflow: its class, literal inputs and links `(source id, output index)`."""

    id: str
    class_type: str
    literals: dict[str, Any] = field(default_factory=dict)
    links: dict[str, tuple[str, int]] = field(default_factory=dict)
    bad_links: dict[str, Any] = field(default_factory=dict)  # list values that are not [id, index]
    title: str | None = None

    def to_api(self) -> dict[str, Any]:
        inputs: dict[str, Any] = {}
        for name, value in self.literals.items():
            inputs[name] = {"__value__": value} if isinstance(value, list) else value
        for name, (src, slot) in self.links.items():
            inputs[name] = [src, slot]
        entry: dict[str, Any] = {"class_type": self.class_type, "inputs": inputs}
        if self.title:
            entry["_meta"] = {"title": self.title}
        return entry


class WorkflowFormatError(ValueError):
    """The JSON is not a workflow at all (as opposed to a workflow with invalid nodes)."""


def is_ui_workflow(data: Any) -> bool:
    """True for the canvas' litegraph serialisation (has a `nodes` list and a `links` table)."""
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


def _parse_value(value: Any) -> tuple[str, Any]:
    if isinstance(value, dict) and set(value) == {"__value__"}:
        return "literal", value["__value__"]
    if isinstance(value, list):
        if len(value) == 2 and isinstance(value[0], str | int) and isinstance(value[1], int) \
                and not isinstance(value[1], bool):
            return "link", (str(value[0]), value[1])
        return "bad_link", value
    return "literal", value


def parse_api_prompt(prompt: Any) -> dict[str, NodeCall]:
    """Parse the API format into NodeCalls. Entries that lack a usable `class_type` get class_type ""
    so that validation can report them by id."""
    if not isinstance(prompt, dict):
        raise WorkflowFormatError(f"a workflow must be a JSON object of nodes, got {type(prompt).__name__}")
    calls: dict[str, NodeCall] = {}
    for raw_id, entry in prompt.items():
        node_id = str(raw_id)
        if not isinstance(entry, dict):
            calls[node_id] = NodeCall(node_id, "")
            continue
        class_type = entry.get("class_type")
        call = NodeCall(node_id, class_type if isinstance(class_type, str) else "")
        meta = entry.get("_meta")
        if isinstance(meta, dict) and isinstance(meta.get("title"), str):
            call.title = meta["title"]
        inputs = entry.get("inputs") or {}
        if isinstance(inputs, dict):
            for name, value in inputs.items():
                kind, parsed = _parse_value(value)
                {"literal": call.literals, "link": call.links, "bad_link": call.bad_links}[kind][name] = parsed
        calls[node_id] = call
    return calls


def build_graph(calls: dict[str, NodeCall]) -> nx.DiGraph:
    """The dependency graph: an edge source → consumer per link, labelled with the input name."""
    graph = nx.DiGraph()
    for node_id, call in calls.items():
        graph.add_node(node_id, call=call)
    for node_id, call in calls.items():
        for name, (src, slot) in call.links.items():
            if src in calls:
                if graph.has_edge(src, node_id):
                    graph.edges[src, node_id]["inputs"].append((name, slot))
                else:
                    graph.add_edge(src, node_id, inputs=[(name, slot)])
    return graph
