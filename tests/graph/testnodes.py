"""Small nodes used only by the engine's tests."""

from __future__ import annotations

import time
from typing import Any

from graph.node import Boolean, Combo, Float, Input, Int, Node, NodeOutput, Output, Socket, String
from graph.types import FLOAT, INT, STRING


class Number(Node):
    category = "test"
    inputs = [Int("value", default=0, min=-1000, max=1000)]
    outputs = [Output(INT, "value")]

    def execute(self, value):
        return (value,)


class Add(Node):
    category = "test"
    inputs = [Socket("a", INT), Int("b", default=1, min=-1000, max=1000)]
    outputs = [Output(INT)]

    def execute(self, a, b):
        return (a + b,)


class ToFloat(Node):
    category = "test"
    inputs = [Socket("x", INT)]
    outputs = [Output(FLOAT)]

    def execute(self, x):
        return (float(x),)


class Show(Node):
    category = "test"
    output_node = True
    inputs = [Socket("value", "*"), String("label", default="", optional=True)]
    outputs = []

    def execute(self, value, label=""):
        return NodeOutput(ui={"values": [value]})


class Fail(Node):
    category = "test"
    inputs = [Socket("x", INT)]
    outputs = [Output(INT)]

    def execute(self, x):
        raise RuntimeError(f"boom on {x}")


class Choose(Node):
    """Returns a if use_a else b; both lazy."""

    category = "test"
    inputs = [Boolean("use_a", default=True), Input("a", INT, lazy=True), Input("b", INT, lazy=True)]
    outputs = [Output(INT)]

    def check_lazy_status(self, inputs):
        return ["a"] if inputs["use_a"] else ["b"]

    def execute(self, use_a, a=None, b=None):
        return (a if use_a else b,)


class OutsideState(Node):
    """Reads env["state"]; its fingerprint is that state."""

    category = "test"
    inputs = [String("key", default="x")]
    outputs = [Output(STRING)]

    @classmethod
    def fingerprint(cls, inputs, env):
        return env["state"].get(inputs["key"])

    def execute(self, key):
        return (f"{key}",)


class Range(Node):
    category = "test"
    inputs = [Int("count", default=3, min=0, max=100)]
    outputs = [Output(INT, "item", is_list=True)]

    def execute(self, count):
        return (list(range(count)),)


class Total(Node):
    category = "test"
    input_is_list = True
    inputs = [Socket("values", INT)]
    outputs = [Output(INT)]

    def execute(self, values):
        return (sum(values),)


class Slow(Node):
    """Ticks progress `steps` times, sleeping `delay` seconds per tick."""

    category = "test"
    hidden = ("context",)
    inputs = [Socket("x", INT), Int("steps", default=5, min=1, max=1000), Float("delay", default=0.01, min=0, max=5)]
    outputs = [Output(INT)]

    def execute(self, x, steps, delay, context):
        for i in range(steps):
            time.sleep(delay)
            context.progress(i + 1, steps)
        return (x,)


class Pick(Node):
    category = "test"
    inputs = [Combo("choice", ["red", "green", "blue"], default="red")]
    outputs = [Output(STRING)]

    def execute(self, choice):
        return (choice,)


class Even(Node):
    """Only even values pass its own validation hook."""

    category = "test"
    inputs = [Int("value", default=0)]
    outputs = [Output(INT)]

    @classmethod
    def validate_inputs(cls, inputs, env):
        return None if inputs["value"] % 2 == 0 else f"value {inputs['value']} is odd"

    def execute(self, value):
        return (value,)


class BrokenOptions(Node):
    category = "test"
    inputs = [Combo("choice", lambda env: 1 / 0)]
    outputs = [Output(STRING)]

    def execute(self, choice):
        return (choice,)


class Seeded(Node):
    category = "test"
    inputs = [Int("seed", default=0, min=0, control_after_generate=True), Int("steps", default=20, min=1)]
    outputs = [Output(INT)]

    def execute(self, seed, steps):
        return (seed + steps,)


class Hidden(Node):
    category = "test"
    hidden = ("prompt", "unique_id", "extra_pnginfo")
    inputs = [Int("value", default=0)]
    outputs = [Output("DICT")]

    def execute(self, value, prompt, unique_id, extra_pnginfo):
        return ({"prompt": prompt, "unique_id": unique_id, "extra": extra_pnginfo},)


class Keys(Node):
    category = "test"
    inputs = [Socket("data", "DICT")]
    outputs = [Output(INT)]

    def execute(self, data):
        return (len(data),)


NODE_CLASSES: list[type[Node]] = [Keys, Number, Add, ToFloat, Show, Fail, Choose, OutsideState, Range, Total, Slow,
                                  Pick, Even, BrokenOptions, Seeded, Hidden]


def build_registry() -> Any:
    from graph.registry import NodeRegistry

    registry = NodeRegistry()
    for cls in NODE_CLASSES:
        registry.register(cls)
    return registry
