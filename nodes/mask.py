"""Mask nodes: conversions to and from images, solid, invert, crop, composite, feather, grow, threshold."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from graph.memory_estimate import MemoryEstimate, TensorSpec
from graph.node import Boolean, Combo, Float, Int, Node, Output, Socket
from graph.types import IMAGE, MASK
from nodes.estimates import describe_image, host_op, image_spec, mask_spec, tensor_of
from nodes.tensor_ops import MAX_RESOLUTION, as_mask_batch, edge_ramp

CHANNELS = ["red", "green", "blue", "alpha"]


def _coord(name: str, default: int = 0, minimum: int = 0) -> Int:
    return Int(name, default=default, min=minimum, max=MAX_RESOLUTION)


def _masks(value: Any) -> TensorSpec | None:
    """A MASK's spec as a batch [B, H, W] (a single [H, W] mask is one of one)."""
    if isinstance(value, TensorSpec) and len(value.shape) == 2:
        return mask_spec(1, *value.shape)
    return tensor_of(value, 3)


def _mask_op(mask: Any, copies: float = 1.0, kept: int | None = None, **dims: int) -> MemoryEstimate | None:
    """An op making a new mask shaped like `mask` (dims `b`, `h`, `w` changed) with `copies` temporaries."""
    spec = _masks(mask)
    if spec is None:
        return None
    b, h, w = spec.shape
    out = mask_spec(dims.get("b", b), dims.get("h", h), dims.get("w", w))
    return host_op((out,), copies, f"a {'×'.join(map(str, out.shape))} mask", kept=kept)


class MaskToImage(Node):
    display_name = "Convert Mask to Image"
    category = "mask"
    inputs = [Socket("mask", MASK)]
    outputs = [Output(IMAGE)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        spec = _masks(shapes.get("mask"))
        if spec is None:
            return None
        out = image_spec(*spec.shape)
        return MemoryEstimate(outputs=(out,), what=describe_image(out))

    def execute(self, mask):
        return (as_mask_batch(mask).unsqueeze(-1).expand(-1, -1, -1, 3).clone(),)


class ImageToMask(Node):
    display_name = "Convert Image to Mask"
    category = "mask"
    inputs = [Socket("image", IMAGE), Combo("channel", CHANNELS)]
    outputs = [Output(MASK)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        spec = tensor_of(shapes.get("image"), 4)
        return None if spec is None else _mask_op(mask_spec(*spec.shape[:3]), copies=0.0)

    def execute(self, image, channel):
        index = CHANNELS.index(channel)
        if index >= image.shape[-1]:
            raise ValueError(f"ImageToMask: the image has {image.shape[-1]} channels, no {channel} channel")
        return (image[..., index].clone(),)


class ImageColorToMask(Node):
    display_name = "ImageColorToMask"
    category = "mask"
    inputs = [Socket("image", IMAGE), Int("color", default=0, min=0, max=0xFFFFFF, extra={"display": "color"})]
    outputs = [Output(MASK)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        spec = tensor_of(shapes.get("image"), 4)
        if spec is None:
            return None
        b, h, w, _ = spec.shape
        return _mask_op(mask_spec(b, h, w), copies=8.0)  # int64 RGB (3 × 8 bytes), the packed int64, the compare

    def execute(self, image, color):
        rgb = (image[..., :3].clamp(0, 1) * 255).round().to(torch.int64)
        packed = (rgb[..., 0] << 16) + (rgb[..., 1] << 8) + rgb[..., 2]
        return ((packed == color).float(),)


class SolidMask(Node):
    category = "mask"
    inputs = [Float("value", default=1.0, min=0.0, max=1.0, step=0.01), _coord("width", 512, 1),
              _coord("height", 512, 1)]
    outputs = [Output(MASK)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        return _mask_op(mask_spec(1, inputs["height"], inputs["width"]), copies=0.0)

    def execute(self, value, width, height):
        return (torch.full((1, height, width), value, dtype=torch.float32),)


class InvertMask(Node):
    category = "mask"
    inputs = [Socket("mask", MASK)]
    outputs = [Output(MASK)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        return _mask_op(shapes.get("mask"), copies=0.0)

    def execute(self, mask):
        return (1.0 - as_mask_batch(mask),)


class CropMask(Node):
    category = "mask"
    inputs = [Socket("mask", MASK), _coord("x"), _coord("y"), _coord("width", 512, 1), _coord("height", 512, 1)]
    outputs = [Output(MASK)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        spec = _masks(shapes.get("mask"))
        if spec is None:
            return None
        _, h, w = spec.shape
        return _mask_op(spec, copies=0.0, h=max(0, min(inputs["height"], h - inputs["y"])),
                        w=max(0, min(inputs["width"], w - inputs["x"])))

    def execute(self, mask, x, y, width, height):
        return (as_mask_batch(mask)[:, y:y + height, x:x + width].clone(),)


OPERATIONS = ["multiply", "add", "subtract", "and", "or", "xor"]


class MaskComposite(Node):
    category = "mask"
    inputs = [Socket("destination", MASK), Socket("source", MASK), _coord("x"), _coord("y"),
              Combo("operation", OPERATIONS)]
    outputs = [Output(MASK)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        return _mask_op(shapes.get("destination"), copies=3.0)

    def execute(self, destination, source, x, y, operation):
        out = as_mask_batch(destination).clone()
        source = as_mask_batch(source).to(out)
        h = max(0, min(source.shape[1], out.shape[1] - y))
        w = max(0, min(source.shape[2], out.shape[2] - x))
        if h == 0 or w == 0:
            return (out,)
        dst, src = out[:, y:y + h, x:x + w], source[:, :h, :w]
        if operation == "multiply":
            result = dst * src
        elif operation == "add":
            result = dst + src
        elif operation == "subtract":
            result = dst - src
        else:
            a, b = dst.round().bool(), src.round().bool()
            result = {"and": a & b, "or": a | b, "xor": a ^ b}[operation].float()
        out[:, y:y + h, x:x + w] = result
        return (out.clamp(0, 1),)


class FeatherMask(Node):
    category = "mask"
    inputs = [Socket("mask", MASK), *(_coord(side) for side in ("left", "top", "right", "bottom"))]
    outputs = [Output(MASK)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        return _mask_op(shapes.get("mask"), copies=1.0)

    def execute(self, mask, left, top, right, bottom):
        out = as_mask_batch(mask)
        return (out * edge_ramp(out.shape[1], out.shape[2], left, top, right, bottom).to(out),)


class GrowMask(Node):
    category = "mask"
    inputs = [Socket("mask", MASK), Int("expand", default=0, min=-MAX_RESOLUTION, max=MAX_RESOLUTION),
              Boolean("tapered_corners", default=True)]
    outputs = [Output(MASK)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        """Each step unfolds 3×3 neighbourhoods: nine copies of the mask, plus the padded one."""
        return _mask_op(shapes.get("mask"), copies=11.0 if inputs["expand"] else 0.0)

    def execute(self, mask, expand, tapered_corners):
        out = as_mask_batch(mask).unsqueeze(1)
        c = 0.0 if tapered_corners else 1.0
        kernel = torch.tensor([[c, 1.0, c], [1.0, 1.0, 1.0], [c, 1.0, c]], dtype=out.dtype)
        reduce = torch.amax if expand > 0 else torch.amin  # dilation or erosion over the neighbourhood
        for _ in range(abs(expand)):
            out = _morph(out, kernel, reduce)
        return (out.squeeze(1),)


def _morph(x: torch.Tensor, kernel: torch.Tensor, reduce) -> torch.Tensor:
    patches = F.unfold(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3)  # [B, 9, H*W]
    selected = kernel.flatten().bool()
    return reduce(patches[:, selected], dim=1).view_as(x)


class ThresholdMask(Node):
    category = "mask"
    inputs = [Socket("mask", MASK), Float("value", default=0.5, min=0.0, max=1.0, step=0.01)]
    outputs = [Output(MASK)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        return _mask_op(shapes.get("mask"), copies=0.25)  # the boolean compare

    def execute(self, mask, value):
        return ((as_mask_batch(mask) > value).float(),)


NODE_CLASSES = [MaskToImage, ImageToMask, ImageColorToMask, SolidMask, InvertMask, CropMask, MaskComposite,
                FeatherMask, GrowMask, ThresholdMask]
