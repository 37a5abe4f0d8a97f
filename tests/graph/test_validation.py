from __future__ import annotations

import copy

import pytest

from graph.validation import validate_prompt
from tests.graph.testnodes import build_registry

REG = build_registry()


def check(prompt, targets=None):
    return validate_prompt(prompt, REG, {"state": {}}, targets)


def errors_of(validation, node_id):
    return [e["type"] for e in validation.node_errors[node_id]["errors"]]


def with_show(node: dict, out_type_ok=True) -> dict:
    return {"1": node, "9": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}


def test_valid_prompt_and_json_not_mutated():
    prompt = {"1": {"class_type": "Number", "inputs": {"value": "5"}},
              "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    before = copy.deepcopy(prompt)
    v = check(prompt)
    assert v.ok and v.prompt.nodes["1"].literals == {"value": 5}
    assert prompt == before


def test_no_prompt():
    assert check(None).error["type"] == "no_prompt"


@pytest.mark.parametrize("prompt, needle", [
    ({"1": {"class_type": "Nope", "inputs": {}}}, "node Nope does not exist"),
    ({"1": {"inputs": {}}}, "missing the class_type"),
    ([1, 2], "JSON object"),
])
def test_invalid_prompt(prompt, needle):
    v = check(prompt)
    assert v.error["type"] == "invalid_prompt" and needle in v.error["message"] + v.error["details"]


def test_prompt_no_outputs():
    assert check({"1": {"class_type": "Number", "inputs": {"value": 1}}}).error["type"] == "prompt_no_outputs"
    prompt = with_show({"class_type": "Number", "inputs": {"value": 1}})
    assert check(prompt, targets=[]).error["type"] == "prompt_no_outputs"


def test_required_input_missing():
    v = check(with_show({"class_type": "Number", "inputs": {}}))
    assert v.error["type"] == "prompt_outputs_failed_validation"
    assert errors_of(v, "1") == ["required_input_missing"]
    err = v.node_errors["1"]
    assert err["class_type"] == "Number" and err["dependent_outputs"] == ["9"]
    assert err["errors"][0]["extra_info"]["input_name"] == "value"


@pytest.mark.parametrize("link", [["1"], ["1", 0, 2], ["1", "zero"]])
def test_bad_linked_input(link):
    prompt = {"1": {"class_type": "Number", "inputs": {"value": 1}},
              "2": {"class_type": "Add", "inputs": {"a": link, "b": 1}},
              "9": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}
    assert errors_of(check(prompt), "2") == ["bad_linked_input"]


def test_link_to_missing_node_or_slot():
    prompt = {"1": {"class_type": "Number", "inputs": {"value": 1}},
              "2": {"class_type": "Add", "inputs": {"a": ["77", 0], "b": 1}},
              "3": {"class_type": "Add", "inputs": {"a": ["1", 3], "b": 1}},
              "8": {"class_type": "Show", "inputs": {"value": ["2", 0]}},
              "9": {"class_type": "Show", "inputs": {"value": ["3", 0]}}}
    v = check(prompt)
    assert errors_of(v, "2") == ["bad_linked_input"] and "'77'" in v.node_errors["2"]["errors"][0]["details"]
    assert errors_of(v, "3") == ["bad_linked_input"]


def test_return_type_mismatch():
    prompt = {"1": {"class_type": "Number", "inputs": {"value": 1}},
              "2": {"class_type": "ToFloat", "inputs": {"x": ["1", 0]}},
              "3": {"class_type": "Add", "inputs": {"a": ["2", 0], "b": 1}},
              "9": {"class_type": "Show", "inputs": {"value": ["3", 0]}}}
    v = check(prompt)
    assert errors_of(v, "3") == ["return_type_mismatch"]
    extra = v.node_errors["3"]["errors"][0]["extra_info"]
    assert extra["received_type"] == "FLOAT" and extra["input_name"] == "a" and extra["linked_node"] == ["2", 0]


@pytest.mark.parametrize("value", ["foo", 5.5, {"__value__": [1]}, None, {"a": 1}])
def test_invalid_input_type(value):
    v = check(with_show({"class_type": "Number", "inputs": {"value": value}}))
    assert errors_of(v, "1") == ["invalid_input_type"]


@pytest.mark.parametrize("value, ok", [(5, True), (5.0, True), ("6", True), (True, True)])
def test_int_casts(value, ok):
    assert check(with_show({"class_type": "Number", "inputs": {"value": value}})).ok is ok


def test_socket_input_given_a_literal():
    v = check(with_show({"class_type": "Keys", "inputs": {"data": 3}}))
    assert errors_of(v, "1") == ["invalid_input_type"]
    assert "must be linked" in v.node_errors["1"]["errors"][0]["message"]


def test_min_and_max():
    assert errors_of(check(with_show({"class_type": "Number", "inputs": {"value": -1001}})), "1") == \
        ["value_smaller_than_min"]
    v = check(with_show({"class_type": "Number", "inputs": {"value": 1001}}))
    assert errors_of(v, "1") == ["value_bigger_than_max"]
    assert v.node_errors["1"]["errors"][0]["message"] == "Value 1001 bigger than max of 1000"


def test_value_not_in_list():
    v = check(with_show({"class_type": "Pick", "inputs": {"choice": "purple"}}))
    assert errors_of(v, "1") == ["value_not_in_list"]
    assert "'purple' not in ['red', 'green', 'blue']" in v.node_errors["1"]["errors"][0]["details"]


def test_custom_validation_failed():
    v = check(with_show({"class_type": "Even", "inputs": {"value": 3}}))
    assert errors_of(v, "1") == ["custom_validation_failed"]
    assert "value 3 is odd" in v.node_errors["1"]["errors"][0]["details"]
    assert check(with_show({"class_type": "Even", "inputs": {"value": 4}})).ok


def test_exception_during_inner_validation():
    prompt = {"1": {"class_type": "BrokenOptions", "inputs": {"choice": "a"}},
              "9": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    v = check(prompt)
    assert errors_of(v, "1") == ["exception_during_validation"]
    assert "ZeroDivisionError" in v.node_errors["1"]["errors"][0]["details"]
    assert errors_of(v, "9") == ["exception_during_inner_validation"]


def test_cycle_names_every_node():
    prompt = {"1": {"class_type": "Number", "inputs": {"value": 1}},
              "2": {"class_type": "Add", "inputs": {"a": ["4", 0], "b": 1}},
              "3": {"class_type": "Add", "inputs": {"a": ["2", 0], "b": 1}},
              "4": {"class_type": "Add", "inputs": {"a": ["3", 0], "b": 1}},
              "9": {"class_type": "Show", "inputs": {"value": ["4", 0]}}}
    v = check(prompt)
    assert v.error["type"] == "prompt_outputs_failed_validation"
    for node in ("2", "3", "4"):
        err = v.node_errors[node]["errors"][0]
        assert err["type"] == "dependency_cycle" and err["extra_info"]["cycle"] == ["2", "3", "4"]
    assert "1" not in v.node_errors and "9" not in v.node_errors


def test_invalid_output_does_not_stop_valid_one():
    prompt = {"1": {"class_type": "Number", "inputs": {"value": 1}},
              "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}},
              "3": {"class_type": "Number", "inputs": {"value": 5000}},
              "4": {"class_type": "Show", "inputs": {"value": ["3", 0]}}}
    v = check(prompt)
    assert v.ok and v.prompt.outputs == ["2"] and set(v.prompt.nodes) == {"1", "2"}
    assert errors_of(v, "3") == ["value_bigger_than_max"] and v.node_errors["3"]["dependent_outputs"] == ["4"]


def test_partial_execution_targets():
    prompt = {"1": {"class_type": "Number", "inputs": {"value": 1}},
              "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}},
              "3": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    v = check(prompt, targets=["3"])
    assert v.prompt.outputs == ["3"] and set(v.prompt.nodes) == {"1", "3"}


def test_list_literal_wrapper_and_undeclared_inputs_dropped():
    prompt = with_show({"class_type": "Show", "inputs": {"value": 1, "label": {"__value__": ["x"]}}})
    prompt["1"] = {"class_type": "Number", "inputs": {"value": 2, "junk": {"__value__": [1, 2]}}}
    v = check(prompt)
    assert v.ok and v.prompt.nodes["1"].literals == {"value": 2}
