"""Nodes for the server's tests, loaded as a plugin from the data directory's custom_nodes/.

With the SD nodes in place, an end-to-end test swaps `image_prompt` for a tiny-checkpoint workflow; the
rest of the flow (events, history, /view) stays the same.
"""

from __future__ import annotations

import math
import time

import torch
from PIL import Image

from graph.node import Float, Int, Node, Output, Socket, String
from graph.types import FLOAT, IMAGE, INT
from tests.graph.testnodes import NODE_CLASSES as BASE


class MakeImage(Node):
    """A solid-colour IMAGE [1, H, W, 3]."""

    category = "test"
    inputs = [Int("width", default=8, min=1, max=4096), Int("height", default=8, min=1, max=4096),
              Float("value", default=0.5, min=0, max=1)]
    outputs = [Output(IMAGE)]

    def execute(self, width, height, value):
        return (torch.full((1, height, width, 3), float(value)),)


class PreviewSteps(Node):
    """Passes an IMAGE through, ticking progress with a preview image at every step."""

    category = "test"
    hidden = ("context",)
    inputs = [Socket("images", IMAGE), Int("steps", default=3, min=1, max=100),
              Float("delay", default=0.0, min=0, max=5)]
    outputs = [Output(IMAGE)]

    def execute(self, images, steps, delay, context):
        array = (images[0].clamp(0, 1) * 255).to(torch.uint8).numpy()
        for i in range(steps):
            time.sleep(delay)
            context.progress(i + 1, steps, preview=Image.fromarray(array))
        return (images,)


class WaitForFile(Node):
    """Waits (checking for interruption) until DATA_DIR/signals/NAME exists."""

    category = "test"
    hidden = ("context",)
    inputs = [Socket("x", INT), String("name", default="go"), Float("timeout", default=60, min=0, max=600)]
    outputs = [Output(INT)]

    def execute(self, x, name, timeout, context):
        marker = context.env.data_dir / "signals" / name
        started = time.monotonic()
        context.progress(0, 1)
        while not marker.exists():
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"{marker} did not appear within {timeout} s")
            context.check_interrupted()
            time.sleep(0.02)
        context.progress(1, 1)
        return (x,)


class Power(Node):
    """base ** exponent as a float: 10.0 ** 400 is inf, a non-finite value a real node can produce."""

    category = "test"
    inputs = [Float("base", default=10.0, min=-1e6, max=1e6), Float("exponent", default=2.0, min=-1e6, max=1e6)]
    outputs = [Output(FLOAT)]

    def execute(self, base, exponent):
        try:
            return (float(base) ** float(exponent),)
        except OverflowError:
            return (math.inf,)


NODE_CLASSES = [*BASE, MakeImage, PreviewSteps, WaitForFile, Power]
