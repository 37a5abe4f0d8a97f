"""Subgraphs (definitions.subgraphs + instance nodes) expand into the plain graph: inner nodes named "12:5"
(nested "12:5:3"), values flowing in through linked inputs, stored values or the inner widgets, out through
output slots; muted and bypassed instances; errors that name the inner node."""

from __future__ import annotations

import copy

import pytest

from graph.executor import Executor
from graph.subgraphs import expand_subgraphs
from graph.ui_format import ui_to_api
from graph.validation import validate_prompt
from graph.workflow import WorkflowFormatError
from tests.graph.subgraph_util import renamed, wrap_in_subgraph
from tests.graph.test_ui_format import EXPECTED_API, REG, ui_workflow

SUB = "5f0f6a2e-0c1d-4e39-9b0e-2f2c1a9a0001"
INNER = "5f0f6a2e-0c1d-4e39-9b0e-2f2c1a9a0002"


def hand_made() -> dict:
    """Number(7) -> [instance 12: in "a" -> Add(b = stored 30) -> Add(b: inner widget 2, subgraph input "b2"
    unfed) -> out] -> Show; written by hand in the front end's schema (object links, -10/-20, linkIds)."""
    definition = {
        "id": SUB, "version": 1, "revision": 0, "name": "add twice",
        "inputNode": {"id": -10, "bounding": [0, 0, 120, 80]}, "outputNode": {"id": -20, "bounding": [0, 0, 120, 60]},
        "inputs": [{"id": "i0", "name": "a", "type": "INT", "linkIds": [1]},
                   {"id": "i1", "name": "b", "type": "INT", "linkIds": [2]},
                   {"id": "i2", "name": "b2", "type": "INT", "linkIds": [5]}],
        "outputs": [{"id": "o0", "name": "sum", "type": "INT", "linkIds": [4]}],
        "widgets": [], "groups": [], "extra": {},
        "nodes": [
            {"id": 1, "type": "Add", "mode": 0, "widgets_values": [0, 100],
             "inputs": [{"name": "a", "type": "INT", "link": 1},
                        {"name": "b", "type": "INT", "link": 2, "widget": {"name": "b"}}],
             "outputs": [{"name": "INT", "type": "INT", "links": [3]}]},
            {"id": 2, "type": "Add", "mode": 0, "widgets_values": [0, 2],
             "inputs": [{"name": "a", "type": "INT", "link": 3},
                        {"name": "b", "type": "INT", "link": 5, "widget": {"name": "b"}}],
             "outputs": [{"name": "INT", "type": "INT", "links": [4]}]},
        ],
        "links": [{"id": 1, "origin_id": -10, "origin_slot": 0, "target_id": 1, "target_slot": 0, "type": "INT"},
                  {"id": 2, "origin_id": -10, "origin_slot": 1, "target_id": 1, "target_slot": 1, "type": "INT"},
                  {"id": 3, "origin_id": 1, "origin_slot": 0, "target_id": 2, "target_slot": 0, "type": "INT"},
                  {"id": 5, "origin_id": -10, "origin_slot": 2, "target_id": 2, "target_slot": 1, "type": "INT"},
                  {"id": 4, "origin_id": 2, "origin_slot": 0, "target_id": -20, "target_slot": 0, "type": "INT"}],
    }
    nodes = [
        {"id": 3, "type": "Number", "mode": 0, "widgets_values": [7, "fixed"],
         "outputs": [{"name": "value", "type": "INT", "links": [10]}]},
        {"id": 12, "type": SUB, "mode": 0, "widgets_values": [30],
         "inputs": [{"name": "a", "type": "INT", "link": 10},
                    {"name": "b", "type": "INT", "link": None, "widget": {"name": "b"}}],
         "outputs": [{"name": "sum", "type": "INT", "links": [11]}], "properties": {}},
        {"id": 4, "type": "Show", "mode": 0, "widgets_values": [""],
         "inputs": [{"name": "value", "type": "*", "link": 11}]},
    ]
    links = [[10, 3, 0, 12, 0, "INT"], [11, 12, 0, 4, 0, "INT"]]
    return {"last_node_id": 12, "last_link_id": 11, "nodes": nodes, "links": links, "groups": [],
            "definitions": {"subgraphs": [definition]}, "config": {}, "extra": {}, "version": 0.4}


def run(api: dict) -> dict:
    validation = validate_prompt(api, REG, {"state": {}})
    assert validation.ok, validation.response()
    return Executor(env={"state": {}}).execute(validation.prompt, "p").outputs


def test_hand_made_subgraph_expands_with_instance_ids():
    workflow = hand_made()
    before = copy.deepcopy(workflow)
    api = ui_to_api(workflow, REG)
    assert workflow == before
    assert api == {
        "3": {"class_type": "Number", "inputs": {"value": 7}, "_meta": {"title": "Number"}},
        "12:1": {"class_type": "Add", "inputs": {"a": ["3", 0], "b": 30}, "_meta": {"title": "Add"}},
        "12:2": {"class_type": "Add", "inputs": {"a": ["12:1", 0], "b": 2}, "_meta": {"title": "Add"}},
        "4": {"class_type": "Show", "inputs": {"value": ["12:2", 0], "label": ""}, "_meta": {"title": "Show"}},
    }
    assert run(api) == {"4": {"values": [39]}}


def test_instance_without_stored_values_uses_inner_widgets():
    workflow = hand_made()
    workflow["nodes"][1]["widgets_values"] = []  # newer front ends: proxyWidgets, values kept in the inner nodes
    workflow["nodes"][1]["properties"]["proxyWidgets"] = [["1", "b"]]
    assert ui_to_api(workflow, REG)["12:1"]["inputs"]["b"] == 100


def test_stored_values_in_the_order_of_the_definitions_widget_inputs():
    workflow = hand_made()
    instance = workflow["nodes"][1]
    instance["inputs"] = instance["inputs"][:1]  # mid-2025 front ends list only the socket inputs
    instance["widgets_values"] = [0, 30, 5]  # for the definition's INT inputs a, b and b2, in order
    api = ui_to_api(workflow, REG)
    assert api["12:1"]["inputs"] == {"a": ["3", 0], "b": 30}  # a: the link wins over the stored 0
    assert api["12:2"]["inputs"]["b"] == 5
    instance["widgets_values"] = [30, 5]  # fits no layout: not guessed at, the inner widgets stay
    api = ui_to_api(workflow, REG)
    assert api["12:1"]["inputs"]["b"] == 100 and api["12:2"]["inputs"]["b"] == 2


def test_instance_input_linked_from_outside_beats_stored_value():
    workflow = hand_made()
    workflow["nodes"][1]["inputs"][1]["link"] = 12
    workflow["nodes"].append({"id": 5, "type": "PrimitiveNode", "mode": 0, "widgets_values": [-4, "fixed"],
                              "outputs": [{"name": "INT", "type": "INT", "links": [12]}]})
    workflow["links"].append([12, 5, 0, 12, 1, "INT"])
    assert ui_to_api(workflow, REG)["12:1"]["inputs"]["b"] == -4


def test_generated_subgraph_and_two_level_nesting_equal_the_plain_graph():
    plain = ui_to_api(ui_workflow(), REG)
    assert plain == EXPECTED_API
    once = ui_workflow()
    definition = wrap_in_subgraph(once, once, {1, 2, 3, 4}, 12)
    assert {n["type"] for n in once["nodes"]} >= {definition["id"]}
    names = {"1": "12:1", "3": "12:3"}
    assert ui_to_api(once, REG) == renamed(plain, names)
    twice = copy.deepcopy(once)
    outer = twice["definitions"]["subgraphs"][0]
    inner = wrap_in_subgraph(twice, outer, {3, 4}, 5, name="inner")
    assert any(link["origin_id"] == -10 for link in inner["links"])  # the inner level reads the outer input
    nested = ui_to_api(twice, REG)
    assert nested == renamed(plain, {"1": "12:1", "3": "12:5:3"})
    assert run(nested) == {"5": {"values": [48]}, "8": {"values": [7]}}


def test_muted_and_bypassed_instances():
    workflow = hand_made()
    workflow["nodes"][1]["mode"] = 2
    muted = ui_to_api(workflow, REG)
    assert set(muted) == {"3", "4"} and "value" not in muted["4"]["inputs"]
    workflow["nodes"][1]["mode"] = 4
    assert ui_to_api(workflow, REG)["4"]["inputs"]["value"] == ["3", 0]  # passed through, as any bypassed node


def test_errors_name_the_inner_node():
    workflow = hand_made()
    workflow["nodes"][1]["inputs"][0]["link"] = None  # the subgraph's socket input "a" is unfed
    workflow["links"] = [lk for lk in workflow["links"] if lk[0] != 10]
    api = ui_to_api(workflow, REG)
    assert "a" not in api["12:1"]["inputs"]
    response = validate_prompt(api, REG, {"state": {}}).response()
    errors = response["node_errors"]["12:1"]
    assert errors["class_type"] == "Add" and errors["dependent_outputs"] == ["4"]
    assert errors["errors"][0]["type"] == "required_input_missing"
    assert errors["errors"][0]["extra_info"] == {"input_name": "a"}


def test_self_containing_subgraph_is_a_clear_error():
    workflow = hand_made()
    definition = workflow["definitions"]["subgraphs"][0]
    definition["nodes"][1]["type"] = SUB  # the definition uses itself
    with pytest.raises(WorkflowFormatError, match=r"node 12:2: subgraph 'add twice' contains itself"):
        ui_to_api(workflow, REG)


def test_workflow_without_instances_is_untouched_and_bad_definitions_are_refused():
    workflow = ui_workflow()
    assert expand_subgraphs(workflow) is workflow
    workflow["definitions"] = {"subgraphs": [{"id": INNER}]}
    with pytest.raises(WorkflowFormatError, match="malformed subgraph definition"):
        ui_to_api(workflow, REG)


def test_comfyui_published_subgraph_templates_expand():
    """Two of ComfyUI's own templates with subgraphs (tests/workflows/comfyui/subgraphs/, see the README there):
    one whose instance stores its promoted widget values as a list (mid-2025 front end), one whose instance
    keeps them in the inner nodes (proxyWidgets)."""
    import json
    from pathlib import Path

    from nodes import build_registry

    folder = Path(__file__).resolve().parents[1] / "workflows" / "comfyui" / "subgraphs"
    registry = build_registry(plugins=False)
    depth = ui_to_api(json.loads((folder / "depth_t2i_adapter.json").read_text()), registry)
    inner = {k for k in depth if k.startswith("48:")}
    assert inner == {f"48:{i}" for i in (87, 89, *range(92, 102))}
    assert depth["45"]["inputs"]["image"] == ["48:99", 0] and depth["49"]["inputs"]["images"] == ["48:99", 0]
    assert depth["48:97"]["inputs"]["pixels"] == ["20", 0]  # the instance's linked input, from outside
    assert depth["48:101"]["inputs"]["sigma"] == 10000 and depth["48:100"]["inputs"]["sampler_name"] == "euler"
    assert depth["48:92"]["inputs"]["sigmas"] == ["48:101", 0]
    assert all(not k.startswith("48:") or depth[k]["class_type"] != "Reroute" for k in depth)
    started = ui_to_api(json.loads((folder / "01_get_started_text_to_image.json").read_text()), registry)
    assert started["60"]["inputs"]["images"] == ["104:88", 0]
    assert started["104:90"]["inputs"]["text"].startswith("Giant blue and purple big billboard")
    assert started["104:92"]["inputs"]["model"] == ["104:93", 0]
    assert "104" not in started and not any(k.startswith("104:in") or k.startswith("104:out") for k in started)
