"""ComfyUI V3 dynamic inputs (tests/packs/v3_dynamic_pack): Autogrow groups, DynamicCombo options and MatchType
sockets, declared and run with the prompt keys ComfyUI uses ("<group>.<name>")."""

from __future__ import annotations

import pytest
import torch

from nodes import image
from tests.graph.test_comfy_v1_nodes import PackEngine


class DynamicEngine(PackEngine):
    core_modules = (image,)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    e = DynamicEngine(tmp_path_factory.mktemp("v3dyn"), ("v3_pack", "v3_dynamic_pack"))
    assert not e.registry.load_errors
    return e


def blank(size: int, value: float) -> dict:
    return {"class_type": "EmptyImage", "inputs": {"width": size, "height": size, "batch_size": 1,
                                                   "color": int(value * 255) * 0x010101}}


def test_autogrow_declares_one_input_per_slot(engine):
    info = engine.registry.object_info(engine.env)["V3Stack"]["input"]
    assert list(info["required"]) == ["images.image_0"]
    assert list(info["optional"]) == ["images.image_1", "images.image_2", "images.image_3"]
    assert info["required"]["images.image_0"] == ["IMAGE", {}]
    named = engine.registry.object_info(engine.env)["V3NamedSum"]["input"]
    assert not named.get("required") and list(named["optional"]) == ["terms.a", "terms.b", "terms.c"]


def test_autogrow_passes_the_connected_slots_as_a_dict(engine):
    prompt = {"a": blank(4, 0.2), "b": blank(4, 0.6),
              "s": {"class_type": "V3Stack", "inputs": {"images.image_0": ["a", 0], "images.image_2": ["b", 0]}},
              "o": {"class_type": "V3Sink", "inputs": {"value": ["s", 0]}}}
    stacked = engine.value(prompt, "s")[0]
    assert stacked.shape == (2, 4, 4, 3)
    torch.testing.assert_close(stacked[:, 0, 0, 0], torch.tensor([51 / 255, 153 / 255]), atol=1e-6, rtol=0)
    assert engine.value(prompt, "s", 1) == ["image_0,image_2"]


def test_autogrow_min_slots_are_required(engine):
    prompt = {"b": blank(4, 0.6),
              "s": {"class_type": "V3Stack", "inputs": {"images.image_1": ["b", 0]}},
              "o": {"class_type": "V3Sink", "inputs": {"value": ["s", 0]}}}
    result = engine.validate(prompt)
    assert not result.ok and "images.image_0" in str(result.response())


def test_autogrow_by_names_with_widget_values(engine):
    prompt = {"n": {"class_type": "V3NamedSum", "inputs": {"terms.a": 3, "terms.c": 5}},
              "o": {"class_type": "V3Sink", "inputs": {"value": ["n", 0]}}}
    assert engine.value(prompt, "n") == [3 + 5 * 10]  # the given slots, in the template's order: a, c


def test_dynamic_combo_passes_the_chosen_option_and_its_inputs(engine):
    info = engine.registry.object_info(engine.env)["V3Adjust"]["input"]
    assert info["required"]["mode"] == ["COMBO", {"options": ["scale", "offset"], "default": "scale"}]
    assert set(info["optional"]) == {"mode.factor", "mode.amount", "mode.repeat"}
    base = {"i": blank(2, 0.2), "f": {"class_type": "V3Float", "inputs": {"value": 0.25}}}
    # an input of the other option ("mode.repeat") is not the chosen option's: execute does not see it
    scale = {**base, "x": {"class_type": "V3Adjust", "inputs": {"image": ["i", 0], "mode": "scale",
                                                                 "mode.factor": 3.0, "mode.repeat": 5}},
             "o": {"class_type": "V3Sink", "inputs": {"value": ["x", 0]}}}
    torch.testing.assert_close(engine.value(scale, "x")[0], torch.full((1, 2, 2, 3), 3 * 51 / 255))
    assert engine.value(scale, "x", 1) == ["factor=3.0,mode=scale"]
    offset = {**base, "x": {"class_type": "V3Adjust", "inputs": {"image": ["i", 0], "mode": "offset",
                                                                  "mode.amount": ["f", 0], "mode.repeat": 2}},
              "o": {"class_type": "V3Sink", "inputs": {"value": ["x", 0]}}}
    torch.testing.assert_close(engine.value(offset, "x")[0], torch.full((1, 2, 2, 3), 51 / 255 + 0.5))
    assert engine.value(offset, "x", 1) == ["amount=0.25,mode=offset,repeat=2"]


def test_dynamic_combo_refuses_a_missing_input_of_the_chosen_option(engine):
    prompt = {"i": blank(2, 0.2),
              "x": {"class_type": "V3Adjust", "inputs": {"image": ["i", 0], "mode": "offset"}},
              "o": {"class_type": "V3Sink", "inputs": {"value": ["x", 0]}}}
    result = engine.run(prompt, ok=False)
    assert result.status != "success" and "mode.amount" in result.error["exception_message"]


def test_match_type_sockets_take_any_type_and_pass_it_on(engine):
    info = engine.registry.object_info(engine.env)["V3Either"]
    assert info["input"]["required"]["a"] == ["COMFY_MATCHTYPE_V3", {"template": {"template_id": "either",
                                                                                  "allowed_types": "*"}}]
    assert info["output"] == ["*"] and info["output_name"] == ["picked"]
    images = {"i": blank(2, 0.2), "j": blank(2, 0.6),
              "e": {"class_type": "V3Either", "inputs": {"first": False, "a": ["i", 0], "b": ["j", 0]}},
              "inv": {"class_type": "ImageInvert", "inputs": {"image": ["e", 0]}},
              "o": {"class_type": "V3Sink", "inputs": {"value": ["inv", 0]}}}
    torch.testing.assert_close(engine.value(images, "inv")[0], torch.full((1, 2, 2, 3), 1 - 153 / 255))
    floats = {"f": {"class_type": "V3Float", "inputs": {"value": 1.5}},
              "e": {"class_type": "V3Either", "inputs": {"first": True, "a": ["f", 0], "b": ["f", 0]}},
              "o": {"class_type": "V3Sink", "inputs": {"value": ["e", 0]}}}
    assert engine.value(floats, "e") == [1.5]
