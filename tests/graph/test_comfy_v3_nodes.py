"""A ComfyUI V3 node pack (tests/packs/v3_pack: comfy_api.latest io.ComfyNode, ComfyExtension) loaded and run."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from tests.graph.test_comfy_v1_nodes import PackEngine


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return PackEngine(tmp_path_factory.mktemp("v3data"), ("v3_pack",))


def calls():
    return sys.modules["latentloom_custom_nodes.v3_pack"].CALLS


def test_schema_is_declared_in_comfyui_shape(engine):
    assert not engine.registry.load_errors
    info = engine.registry.object_info(engine.env)["V3Brighten"]
    assert info["display_name"] == "V3 Brighten" and info["category"] == "v3 pack"
    assert info["description"] == "Scales an image." and info["python_module"] == "custom_nodes.v3_pack"
    assert info["input"]["required"] == {
        "image": ["IMAGE", {"tooltip": "what to brighten"}],
        "factor": ["FLOAT", {"default": 1.5, "min": 0.0, "max": 3.0, "step": 0.1, "round": 0.01,
                             "display": "slider"}],
        "clamp": ["COMBO", {"options": ["yes", "no"], "default": "yes"}]}
    assert info["output"] == ["IMAGE"] and info["output_name"] == ["brightened"]
    assert info["output_tooltips"] == ["the brighter image"]
    pick = engine.registry.object_info(engine.env)["V3Pick"]
    assert pick["output_node"] is True and pick["input"]["hidden"] == {"unique_id": "UNIQUE_ID"}
    assert pick["input"]["required"]["a"] == ["INT", {"lazy": True, "forceInput": True}]
    assert pick["output_name"] == ["INT", "who"]


def test_execute_returns_node_output(engine):
    prompt = {"b": {"class_type": "V3Blank", "inputs": {"size": 2}},
              "x": {"class_type": "V3Brighten", "inputs": {"image": ["b", 0], "factor": 2.0, "clamp": "yes"}},
              "y": {"class_type": "V3Brighten", "inputs": {"image": ["b", 0], "factor": 3.0, "clamp": "no"}},
              "o": {"class_type": "V3Sink", "inputs": {"value": ["x", 0], "more": ["y", 0]}}}
    torch.testing.assert_close(engine.value(prompt, "x")[0], torch.full((1, 2, 2, 3), 0.8))
    torch.testing.assert_close(engine.value(prompt, "y")[0], torch.full((1, 2, 2, 3), 1.2))


def test_lazy_hidden_ui_validation_and_fingerprint(engine):
    prompt = {"n1": {"class_type": "V3Number", "inputs": {"value": 31}},
              "n2": {"class_type": "V3Number", "inputs": {"value": 32}},
              "p": {"class_type": "V3Pick", "inputs": {"first": False, "a": ["n1", 0], "b": ["n2", 0], "bound": 2}}}
    calls().clear()
    result = engine.run(prompt)
    assert calls() == [32]  # the lazy input not asked for never ran
    assert result.outputs["p"] == {"text": ["node p picked 32"]}  # cls.hidden.unique_id; ui.PreviewText
    engine.run(prompt)
    assert calls() == [32]  # V3Number's result is cached, V3Pick (fingerprint NaN) ran again:
    assert [d["node"] for e, d in engine.events if e == "executing"] == ["p"]
    assert math.isnan(engine.registry.get("V3Pick").fingerprint({}, engine.env))
    assert engine.registry.get("V3Number").fingerprint({"value": 1}, engine.env) is None
    bad = {"p": {"class_type": "V3Pick", "inputs": {"first": True, "a": ["n1", 0], "b": ["n2", 0], "bound": 4}},
           **{k: v for k, v in prompt.items() if k != "p"}}
    errors = engine.validate(bad).node_errors["p"]["errors"]
    assert errors[0]["type"] == "custom_validation_failed" and "bound may not be 4" in errors[0]["details"]
