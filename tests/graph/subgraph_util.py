"""Test helper: turn some nodes of a UI workflow (or of a subgraph definition) into a subgraph, the way ComfyUI's
front end does with "Convert to subgraph": the nodes move into a definition in `definitions.subgraphs`, each link
that crosses the boundary goes through an input slot (origin -10) or an output slot (target -20), and one instance
node takes their place. Nesting: call it again on the definition's nodes."""

from __future__ import annotations

import copy
import uuid
from typing import Any


def _fields(link: Any) -> list[Any]:
    if isinstance(link, dict):
        return [link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                link.get("type", "*")]
    return list(link[:6])


def _as_object(fields: list[Any]) -> dict[str, Any]:
    keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
    return dict(zip(keys, fields, strict=True))


def wrap_in_subgraph(workflow: dict[str, Any], holder: dict[str, Any], node_ids: set[int], instance_id: int,
                     name: str = "wrapped") -> dict[str, Any]:
    """Move `node_ids` of `holder` (the workflow itself or one of its definitions) into a new definition added to
    `workflow["definitions"]["subgraphs"]`; returns the definition. Links inside a definition use the object form."""
    definition_id = str(uuid.UUID(int=len(workflow.get("definitions", {}).get("subgraphs", [])) + 1))
    inner_nodes = [n for n in holder["nodes"] if n["id"] in node_ids]
    holder["nodes"] = [n for n in holder["nodes"] if n["id"] not in node_ids]
    inner_links, outer_links = [], []
    inputs: dict[tuple[Any, int], int] = {}
    outputs: dict[tuple[Any, int], int] = {}
    definition_inputs: list[dict[str, Any]] = []
    definition_outputs: list[dict[str, Any]] = []
    instance = {"id": instance_id, "type": definition_id, "pos": [0, 0], "mode": 0, "inputs": [], "outputs": [],
                "properties": {}, "widgets_values": []}
    next_link = 1 + max([_fields(lk)[0] for lk in holder["links"]] + [0])
    for link in holder["links"]:
        link_id, origin, origin_slot, target, target_slot, kind = _fields(link)
        inside_origin, inside_target = origin in node_ids, target in node_ids
        if inside_origin and inside_target:
            inner_links.append(_as_object([link_id, origin, origin_slot, target, target_slot, kind]))
        elif inside_target:  # enters: through an input slot, one per source
            key = (origin, origin_slot)
            if key not in inputs:
                inputs[key] = len(definition_inputs)
                slot_name = f"in{len(definition_inputs)}"
                definition_inputs.append({"id": str(uuid.uuid4()), "name": slot_name, "type": kind, "linkIds": []})
                instance["inputs"].append({"name": slot_name, "type": kind, "link": link_id})
                outer_links.append([link_id, origin, origin_slot, instance_id, inputs[key], kind])
            inner_links.append(_as_object([next_link, -10, inputs[key], target, target_slot, kind]))
            definition_inputs[inputs[key]]["linkIds"].append(next_link)
            next_link += 1
        elif inside_origin:  # leaves: through an output slot, one per source
            key = (origin, origin_slot)
            if key not in outputs:
                outputs[key] = len(definition_outputs)
                definition_outputs.append({"id": str(uuid.uuid4()), "name": f"out{outputs[key]}", "type": kind,
                                           "linkIds": [next_link]})
                instance["outputs"].append({"name": f"out{outputs[key]}", "type": kind, "links": []})
                inner_links.append(_as_object([next_link, origin, origin_slot, -20, outputs[key], kind]))
                next_link += 1
            instance["outputs"][outputs[key]]["links"].append(link_id)
            outer_links.append([link_id, instance_id, outputs[key], target, target_slot, kind])
        else:
            outer_links.append(link)
    holder["links"] = [(_as_object(_fields(lk)) if isinstance(holder["links"][0], dict) else lk)
                       for lk in outer_links] if holder["links"] else []
    holder["nodes"].append(instance)
    definition = {"id": definition_id, "version": 1, "revision": 0, "name": name,
                  "inputNode": {"id": -10, "bounding": [0, 0, 120, 60]},
                  "outputNode": {"id": -20, "bounding": [0, 0, 120, 60]},
                  "inputs": definition_inputs, "outputs": definition_outputs, "widgets": [],
                  "nodes": copy.deepcopy(inner_nodes), "links": inner_links, "groups": [], "extra": {}}
    workflow.setdefault("definitions", {}).setdefault("subgraphs", []).append(definition)
    return definition


def renamed(api: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """An API prompt with node ids (keys and links) renamed: what the same graph expanded from subgraphs reads."""
    out = {}
    for node_id, node in api.items():
        inputs = {k: ([names.get(v[0], v[0]), v[1]] if isinstance(v, list) else v) for k, v in node["inputs"].items()}
        out[names.get(node_id, node_id)] = {**node, "inputs": inputs}
    return out
