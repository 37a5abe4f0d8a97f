"""The utils/string nodes, and the time limit that keeps a workflow's regex from hanging a worker."""

from __future__ import annotations

import time

import pytest

from graph.executor import Executor
from graph.node import Node, NodeOutput, Socket
from graph.types import STRING
from graph.validation import validate_prompt
from nodes import build_registry, strings
from nodes.environment import Environment
from nodes.strings import (
    CaseConverter,
    RegexExtract,
    RegexMatch,
    RegexReplace,
    StringCompare,
    StringConcatenate,
    StringContains,
    StringLength,
    StringReplace,
    StringSubstring,
    StringTrim,
)


def test_plain_string_nodes():
    assert StringConcatenate().execute("a", "b", ", ")[0] == "a, b"
    assert StringConcatenate().execute("a", "b", "")[0] == "ab"
    assert StringSubstring().execute("hello world", 0, 5)[0] == "hello"
    assert StringSubstring().execute("hello world", -5, 11)[0] == "world"
    assert StringSubstring().execute("abc", 2, 1)[0] == ""
    assert StringLength().execute("héllo\n")[0] == 6
    assert StringReplace().execute("a.b.c", ".", "-")[0] == "a-b-c"  # literal, not a pattern
    assert StringTrim().execute("  x y \n", "Both")[0] == "x y"
    assert StringTrim().execute("  x ", "Left")[0] == "x "
    assert StringTrim().execute("  x ", "Right")[0] == "  x"


@pytest.mark.parametrize(("mode", "expected"), [("UPPERCASE", "HELLO WORLD"), ("lowercase", "hello world"),
                                                ("Capitalize", "Hello world"), ("Title Case", "Hello World")])
def test_case_converter(mode, expected):
    assert CaseConverter().execute("hEllo wOrld", mode)[0] == expected


def test_contains_and_compare():
    assert StringContains().execute("Hello", "ell", True)[0] is True
    assert StringContains().execute("Hello", "ELL", True)[0] is False
    assert StringContains().execute("Hello", "ELL", False)[0] is True
    compare = StringCompare().execute
    assert compare("Hello", "he", "Starts With", False)[0] is True
    assert compare("Hello", "he", "Starts With", True)[0] is False
    assert compare("Hello", "LO", "Ends With", False)[0] is True
    assert compare("abc", "abc", "Equal", True)[0] is True
    assert compare("abc", "ABC", "Equal", True)[0] is False


def test_regex_match_flags():
    assert RegexMatch().execute("Cat", "cat", True, False, False)[0] is True
    assert RegexMatch().execute("Cat", "cat", False, False, False)[0] is False
    assert RegexMatch().execute("a\nb", "^b", False, True, False)[0] is True
    assert RegexMatch().execute("a\nb", "^b", False, False, False)[0] is False
    assert RegexMatch().execute("a\nb", "a.b", False, False, True)[0] is True
    assert RegexMatch().execute("a\nb", "a.b", False, False, False)[0] is False


def test_regex_extract_modes():
    text = "w=512, h=768; w=1024"
    extract = RegexExtract().execute
    assert extract(text, r"(\w)=(\d+)", "First Match", True, False, False, 1)[0] == "w=512"
    assert extract(text, r"(\w)=(\d+)", "All Matches", True, False, False, 1)[0] == "w=512\nh=768\nw=1024"
    assert extract(text, r"(\w)=(\d+)", "First Group", True, False, False, 2)[0] == "512"
    assert extract(text, r"(\w)=(\d+)", "All Groups", True, False, False, 2)[0] == "512\n768\n1024"
    assert extract(text, r"(\w)=(\d+)", "First Group", True, False, False, 0)[0] == "w=512"
    assert extract(text, r"(\w)=(\d+)", "First Group", True, False, False, 3)[0] == ""  # no such group
    assert extract(text, r"x=(\d+)", "All Groups", True, False, False, 1)[0] == ""  # no match
    assert extract("ab", r"a(x)?b", "First Group", True, False, False, 1)[0] == ""  # a group that took no part


def test_regex_replace():
    replace = RegexReplace().execute
    assert replace("a1b22c333", r"\d+", "#")[0] == "a#b#c#"
    assert replace("a1b22c333", r"\d+", "#", count=2)[0] == "a#b#c333"
    assert replace("John Smith", r"(\w+) (\w+)", r"\2, \1")[0] == "Smith, John"
    assert replace("ABC", "b", "x", case_insensitive=False)[0] == "ABC"
    assert replace("ABC", "b", "x")[0] == "AxC"
    with pytest.raises(ValueError, match=r"RegexReplace: replace '\\\\3'"):
        replace("ab", "(a)", r"\3")


def test_bad_patterns_name_the_node_and_the_pattern():
    with pytest.raises(ValueError, match=r"RegexMatch: regex_pattern '\(unclosed' is not a valid"):
        RegexMatch().execute("x", "(unclosed", True, False, False)


@pytest.mark.parametrize("node", ["RegexMatch", "RegexExtract", "RegexReplace"])
def test_catastrophic_backtracking_is_stopped(node, monkeypatch):
    """(x+x+)+y on a long run of x backtracks exponentially; the node gives up after REGEX_TIMEOUT_S."""
    monkeypatch.setattr(strings, "REGEX_TIMEOUT_S", 0.2)
    text, pattern = "x" * 5000, r"(x+x+)+y"
    calls = {"RegexMatch": lambda: RegexMatch().execute(text, pattern, False, False, False),
             "RegexExtract": lambda: RegexExtract().execute(text, pattern, "All Matches", False, False, False, 1),
             "RegexReplace": lambda: RegexReplace().execute(text, pattern, "")}
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=rf"{node}: regex_pattern .* ran longer than 0.2 s"):
        calls[node]()
    assert time.monotonic() - start < 15


class ShowText(Node):
    """A test output node: reports the text it gets."""

    output_node = True
    inputs = [Socket("text", STRING)]
    outputs = []

    def execute(self, text):
        return NodeOutput(ui={"text": [text]})


def run(prompt, tmp_path):
    env = Environment(tmp_path)
    env.ensure_dirs()
    registry = build_registry(env, plugins=False)
    registry.register(ShowText)
    validation = validate_prompt(prompt, registry, env)
    assert validation.ok, validation.response()
    return Executor(env=env).execute(validation.prompt, "p", lambda *_: None)


def test_string_nodes_in_a_workflow(tmp_path):
    """Through validation and the executor with ComfyUI's input names."""
    prompt = {"1": {"class_type": "StringConcatenate", "inputs": {"string_a": " a cat ", "string_b": "sat",
                                                                  "delimiter": "|"}},
              "2": {"class_type": "StringTrim", "inputs": {"string": ["1", 0], "mode": "Both"}},
              "3": {"class_type": "RegexReplace", "inputs": {"string": ["2", 0], "regex_pattern": r"\s*\|\s*",
                                                             "replace": " "}},
              "4": {"class_type": "CaseConverter", "inputs": {"string": ["3", 0], "mode": "Title Case"}},
              "5": {"class_type": "ShowText", "inputs": {"text": ["4", 0]}}}
    result = run(prompt, tmp_path)
    assert result.status == "success", result.error
    assert result.outputs["5"]["text"] == ["A Cat Sat"]


def test_a_runaway_regex_fails_its_prompt_with_a_message(tmp_path, monkeypatch):
    monkeypatch.setattr(strings, "REGEX_TIMEOUT_S", 0.2)
    prompt = {"1": {"class_type": "RegexExtract", "inputs": {
                  "string": "x" * 5000, "regex_pattern": "(x+x+)+y", "mode": "First Match", "case_insensitive": False,
                  "multiline": False, "dotall": False, "group_index": 1}},
              "2": {"class_type": "ShowText", "inputs": {"text": ["1", 0]}}}
    result = run(prompt, tmp_path)
    assert result.status == "error"
    assert result.error["node_id"] == "1" and "ran longer than 0.2 s" in result.error["exception_message"]
