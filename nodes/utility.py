"""Primitive value nodes: a constant of each widget type, for wiring one value into several inputs.

Their inputs declare no default (and the float no step), as ComfyUI's do: a client starts the widget at 0, "" or
false, and a workflow must carry the value."""

from __future__ import annotations

import sys

from graph.node import Boolean, Float, Int, Node, Output, String
from graph.types import BOOLEAN, FLOAT, INT, STRING


class PrimitiveInt(Node):
    display_name = "Int"
    category = "utils/primitive"
    inputs = [Int("value", default=None, min=-sys.maxsize, max=sys.maxsize, step=None,
                  control_after_generate=True)]
    outputs = [Output(INT)]

    def execute(self, value):
        return (value,)


class PrimitiveFloat(Node):
    display_name = "Float"
    category = "utils/primitive"
    inputs = [Float("value", default=None, min=-sys.maxsize, max=sys.maxsize, step=None)]
    outputs = [Output(FLOAT)]

    def execute(self, value):
        return (value,)


class PrimitiveString(Node):
    display_name = "String"
    category = "utils/primitive"
    inputs = [String("value", default=None)]
    outputs = [Output(STRING)]

    def execute(self, value):
        return (value,)


class PrimitiveStringMultiline(Node):
    display_name = "String (Multiline)"
    category = "utils/primitive"
    inputs = [String("value", default=None, multiline=True)]
    outputs = [Output(STRING)]

    def execute(self, value):
        return (value,)


class PrimitiveBoolean(Node):
    display_name = "Boolean"
    category = "utils/primitive"
    inputs = [Boolean("value", default=None)]
    outputs = [Output(BOOLEAN)]

    def execute(self, value):
        return (value,)


NODE_CLASSES = [PrimitiveInt, PrimitiveFloat, PrimitiveString, PrimitiveStringMultiline, PrimitiveBoolean]
