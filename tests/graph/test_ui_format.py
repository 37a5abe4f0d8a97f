from __future__ import annotations

import copy

from graph.executor import Executor
from graph.ui_format import to_api_prompt, ui_to_api
from graph.validation import validate_prompt
from tests.graph.testnodes import build_registry

REG = build_registry()


def node(id_, type_, widgets=None, inputs=(), outputs=(), mode=0, title=None):
    entry = {"id": id_, "type": type_, "pos": [0, 0], "size": [200, 100], "flags": {}, "order": id_,
             "mode": mode, "inputs": [dict(i) for i in inputs], "outputs": [dict(o) for o in outputs],
             "properties": {}}
    if widgets is not None:
        entry["widgets_values"] = widgets
    if title:
        entry["title"] = title
    return entry


def ui_workflow():
    """Seeded(seed 5 + 'randomize', steps 3) -> Reroute -> Add(b from a PrimitiveNode) -> Show;
    a muted Add, a bypassed Add between Number and a second Show, and a Note."""
    nodes = [
        node(1, "Seeded", [5, "randomize", 3], outputs=[{"name": "INT", "type": "INT", "links": [1]}]),
        node(2, "Reroute", inputs=[{"name": "", "type": "*", "link": 1}],
             outputs=[{"name": "", "type": "INT", "links": [2]}]),
        node(3, "Add", [0], inputs=[{"name": "a", "type": "INT", "link": 2},
                                    {"name": "b", "type": "INT", "link": 3, "widget": {"name": "b"}}],
             outputs=[{"name": "INT", "type": "INT", "links": [4]}], title="My add"),
        node(4, "PrimitiveNode", [40, "fixed"], outputs=[{"name": "INT", "type": "INT", "links": [3]}]),
        node(5, "Show", [""], inputs=[{"name": "value", "type": "*", "link": 4}]),
        node(6, "Number", [7], outputs=[{"name": "value", "type": "INT", "links": [5, 7]}]),
        node(7, "Add", [100], inputs=[{"name": "a", "type": "INT", "link": 5}],
             outputs=[{"name": "INT", "type": "INT", "links": [6]}], mode=4),
        node(8, "Show", [""], inputs=[{"name": "value", "type": "*", "link": 6}]),
        node(9, "Add", [1], inputs=[{"name": "a", "type": "INT", "link": 7}],
             outputs=[{"name": "INT", "type": "INT", "links": []}], mode=2),
        node(10, "Note", ["just a note"]),
    ]
    links = [[1, 1, 0, 2, 0, "INT"], [2, 2, 0, 3, 0, "INT"], [3, 4, 0, 3, 1, "INT"], [4, 3, 0, 5, 0, "INT"],
             [5, 6, 0, 7, 0, "INT"], [6, 7, 0, 8, 0, "INT"], [7, 6, 0, 9, 0, "INT"]]
    return {"last_node_id": 10, "last_link_id": 7, "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {}, "version": 0.4}


EXPECTED_API = {
    "1": {"class_type": "Seeded", "inputs": {"seed": 5, "steps": 3}, "_meta": {"title": "Seeded"}},
    "3": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 40}, "_meta": {"title": "My add"}},
    "5": {"class_type": "Show", "inputs": {"value": ["3", 0], "label": ""}, "_meta": {"title": "Show"}},
    "6": {"class_type": "Number", "inputs": {"value": 7}, "_meta": {"title": "Number"}},
    "8": {"class_type": "Show", "inputs": {"value": ["6", 0], "label": ""}, "_meta": {"title": "Show"}},
}


def test_ui_to_api_resolves_frontend_nodes_mute_and_bypass():
    workflow = ui_workflow()
    before = copy.deepcopy(workflow)
    assert ui_to_api(workflow, REG) == EXPECTED_API
    assert workflow == before


def test_seed_control_value_absent_is_tolerated():
    workflow = ui_workflow()
    workflow["nodes"][0]["widgets_values"] = [5, 3]  # a saver that does not store the control mode
    assert ui_to_api(workflow, REG)["1"]["inputs"] == {"seed": 5, "steps": 3}


def test_widgets_values_as_dict():
    workflow = ui_workflow()
    workflow["nodes"][0]["widgets_values"] = {"seed": 9, "steps": 2}
    assert ui_to_api(workflow, REG)["1"]["inputs"] == {"seed": 9, "steps": 2}


def test_link_objects_format():
    workflow = ui_workflow()
    workflow["links"] = [{"id": lk[0], "origin_id": lk[1], "origin_slot": lk[2], "target_id": lk[3],
                          "target_slot": lk[4], "type": lk[5]} for lk in workflow["links"]]
    assert ui_to_api(workflow, REG) == EXPECTED_API


def test_to_api_prompt_passes_api_format_through():
    assert to_api_prompt(EXPECTED_API, REG) is EXPECTED_API


def test_ui_and_api_yield_same_graph_and_cache_keys():
    from_ui = validate_prompt(to_api_prompt(ui_workflow(), REG), REG, {"state": {}})
    from_api = validate_prompt(EXPECTED_API, REG, {"state": {}})
    assert from_ui.ok and from_api.ok
    assert sorted(from_ui.prompt.graph.edges) == sorted(from_api.prompt.graph.edges)
    executor = Executor(env={"state": {}})
    assert executor.cache_keys(from_ui.prompt) == executor.cache_keys(from_api.prompt)
    result = executor.execute(from_ui.prompt, "ui")
    assert result.outputs == {"5": {"values": [48]}, "8": {"values": [7]}}


def test_malformed_ui_workflow_is_a_clear_error():
    import pytest

    from graph.workflow import WorkflowFormatError

    with pytest.raises(WorkflowFormatError, match="malformed node"):
        ui_to_api({"nodes": [{"id": 1}], "links": []}, REG)
    with pytest.raises(WorkflowFormatError, match="malformed link"):
        ui_to_api({"nodes": [], "links": [[1, 2]]}, REG)


def test_missing_and_short_widgets_values_get_declared_defaults():
    workflow = ui_workflow()
    del workflow["nodes"][0]["widgets_values"]  # as ComfyUI's default template saves SaveImage
    assert ui_to_api(workflow, REG)["1"]["inputs"] == {"seed": 0, "steps": 20}
    workflow["nodes"][0]["widgets_values"] = [5]  # shorter than the widgets
    assert ui_to_api(workflow, REG)["1"]["inputs"] == {"seed": 5, "steps": 20}
    workflow["nodes"][0]["widgets_values"] = [5, "increment"]  # the control value, then nothing
    assert ui_to_api(workflow, REG)["1"]["inputs"] == {"seed": 5, "steps": 20}
    workflow["nodes"][0]["widgets_values"] = {"steps": 4}  # a dict without every name
    assert ui_to_api(workflow, REG)["1"]["inputs"] == {"seed": 0, "steps": 4}
    del workflow["nodes"][4]["widgets_values"]  # Show's optional label
    assert ui_to_api(workflow, REG)["5"]["inputs"]["label"] == ""


def test_combo_without_saved_value_gets_its_default_or_first_option():
    from graph.node import Combo, Node, Output
    from graph.registry import NodeRegistry

    class Palette(Node):
        category = "test"
        inputs = [Combo("colour", ["cyan", "magenta"]), Combo("shade", ["light", "dark"], default="dark")]
        outputs = [Output("STRING")]

        def execute(self, colour, shade):
            return (colour + shade,)

    registry = NodeRegistry()
    registry.register(Palette)
    workflow = {"nodes": [{"id": 1, "type": "Palette", "mode": 0}], "links": []}
    assert ui_to_api(workflow, registry)["1"]["inputs"] == {"colour": "cyan", "shade": "dark"}


def test_control_values_recognised_by_flag_or_seed_name_and_never_assumed():
    from graph.node import Int, Node, Output
    from graph.registry import NodeRegistry

    class Noisy(Node):  # a seed-like INT without the flag, as older declarations of noise_seed were
        category = "test"
        inputs = [Int("noise_seed", default=0), Int("count", default=1), Int("other", default=2)]
        outputs = [Output("INT")]

        def execute(self, noise_seed, count, other):
            return (noise_seed,)

    registry = NodeRegistry()
    registry.register(Noisy)

    def convert(values):
        workflow = {"nodes": [{"id": 1, "type": "Noisy", "mode": 0, "widgets_values": values}], "links": []}
        return ui_to_api(workflow, registry)["1"]["inputs"]

    assert convert([9, "randomize", 3, 4]) == {"noise_seed": 9, "count": 3, "other": 4}
    assert convert([9, 3, 4]) == {"noise_seed": 9, "count": 3, "other": 4}  # absent: not assumed
    assert convert([9, "fixed"]) == {"noise_seed": 9, "count": 1, "other": 2}
    workflow = ui_workflow()
    workflow["nodes"][0]["widgets_values"] = [5, "decrement", 3]  # the flagged seed of the test nodes
    assert ui_to_api(workflow, REG)["1"]["inputs"] == {"seed": 5, "steps": 3}


def test_primitive_feeding_several_widgets_and_reroute_chains():
    workflow = ui_workflow()
    primitive = workflow["nodes"][3]
    primitive["outputs"][0]["links"] = [3, 8]
    workflow["nodes"].append(node(11, "Add", [0, 1], inputs=[{"name": "a", "type": "INT", "link": 9},
                                                            {"name": "b", "type": "INT", "link": 8,
                                                             "widget": {"name": "b"}}],
                                  outputs=[{"name": "INT", "type": "INT", "links": []}]))
    workflow["nodes"].append(node(12, "Reroute", inputs=[{"name": "", "type": "*", "link": 10}],
                                  outputs=[{"name": "", "type": "INT", "links": [9]}]))
    workflow["links"] += [[8, 4, 0, 11, 1, "INT"], [9, 12, 0, 11, 0, "INT"], [10, 2, 0, 12, 0, "INT"]]
    api = ui_to_api(workflow, REG)
    assert api["11"]["inputs"] == {"a": ["1", 0], "b": 40}  # through two Reroutes; the same primitive as node 3
    assert api["3"]["inputs"]["b"] == 40


def test_widgets_without_a_declared_default_start_empty_within_their_range():
    from graph.node import Boolean, Float, Int, String
    from graph.ui_format import widget_default

    assert widget_default(String("text", default=None)) == ""
    assert widget_default(Boolean("flag", default=None)) is False
    assert widget_default(Int("count", default=None, min=1, max=10)) == 1  # 0 is below the range
    assert widget_default(Int("offset", default=None, min=-5, max=5)) == 0
    assert widget_default(Float("scale", default=None, min=-3.0, max=-1.0)) == -1.0
    assert widget_default(Int("steps", default=20, min=1)) == 20
