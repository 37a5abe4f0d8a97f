"""Primitive value nodes: a constant of each widget type, for wiring one value into several inputs."""

from __future__ import annotations

import sys

from graph.node import Boolean, Float, Int, Node, Output, String
from graph.types import BOOLEAN, FLOAT, INT, STRING


class PrimitiveInt(Node):
    display_name = "Int"
    category = "utils/primitive"
    inputs = [Int("value", default=0, min=-sys.maxsize, max=sys.maxsize, control_after_generate=True)]
    outputs = [Output(INT)]

    def execute(self, value):
        return (value,)


class PrimitiveFloat(Node):
    display_name = "Float"
    category = "utils/primitive"
    inputs = [Float("value", default=0.0, min=-sys.maxsize, max=sys.maxsize)]
    outputs = [Output(FLOAT)]

    def execute(self, value):
        return (value,)


class PrimitiveString(Node):
    display_name = "String"
    category = "utils/primitive"
    inputs = [String("value")]
    outputs = [Output(STRING)]

    def execute(self, value):
        return (value,)


class PrimitiveStringMultiline(Node):
    display_name = "String (Multiline)"
    category = "utils/primitive"
    inputs = [String("value", multiline=True)]
    outputs = [Output(STRING)]

    def execute(self, value):
        return (value,)


class PrimitiveBoolean(Node):
    display_name = "Boolean"
    category = "utils/primitive"
    inputs = [Boolean("value")]
    outputs = [Output(BOOLEAN)]

    def execute(self, value):
        return (value,)


NODE_CLASSES = [PrimitiveInt, PrimitiveFloat, PrimitiveString, PrimitiveStringMultiline, PrimitiveBoolean]
