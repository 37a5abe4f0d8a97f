"""Mask nodes: conversions to and from images, solid, invert, crop, composite, feather, grow, threshold."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from graph.node import Boolean, Combo, Float, Int, Node, Output, Socket
from graph.types import IMAGE, MASK
from nodes.tensor_ops import MAX_RESOLUTION, as_mask_batch, edge_ramp

CHANNELS = ["red", "green", "blue", "alpha"]


def _coord(name: str, default: int = 0, minimum: int = 0) -> Int:
    return Int(name, default=default, min=minimum, max=MAX_RESOLUTION)


class MaskToImage(Node):
    display_name = "Convert Mask to Image"
    category = "mask"
    inputs = [Socket("mask", MASK)]
    outputs = [Output(IMAGE)]

    def execute(self, mask):
        return (as_mask_batch(mask).unsqueeze(-1).expand(-1, -1, -1, 3).clone(),)


class ImageToMask(Node):
    display_name = "Convert Image to Mask"
    category = "mask"
    inputs = [Socket("image", IMAGE), Combo("channel", CHANNELS)]
    outputs = [Output(MASK)]

    def execute(self, image, channel):
        index = CHANNELS.index(channel)
        if index >= image.shape[-1]:
            raise ValueError(f"ImageToMask: the image has {image.shape[-1]} channels, no {channel} channel")
        return (image[..., index].clone(),)


class ImageColorToMask(Node):
    display_name = "Image Color to Mask"
    category = "mask"
    inputs = [Socket("image", IMAGE), Int("color", default=0, min=0, max=0xFFFFFF, extra={"display": "color"})]
    outputs = [Output(MASK)]

    def execute(self, image, color):
        rgb = (image[..., :3].clamp(0, 1) * 255).round().to(torch.int64)
        packed = (rgb[..., 0] << 16) + (rgb[..., 1] << 8) + rgb[..., 2]
        return ((packed == color).float(),)


class SolidMask(Node):
    category = "mask"
    inputs = [Float("value", default=1.0, min=0.0, max=1.0, step=0.01), _coord("width", 512, 1),
              _coord("height", 512, 1)]
    outputs = [Output(MASK)]

    def execute(self, value, width, height):
        return (torch.full((1, height, width), value, dtype=torch.float32),)


class InvertMask(Node):
    category = "mask"
    inputs = [Socket("mask", MASK)]
    outputs = [Output(MASK)]

    def execute(self, mask):
        return (1.0 - as_mask_batch(mask),)


class CropMask(Node):
    category = "mask"
    inputs = [Socket("mask", MASK), _coord("x"), _coord("y"), _coord("width", 512, 1), _coord("height", 512, 1)]
    outputs = [Output(MASK)]

    def execute(self, mask, x, y, width, height):
        return (as_mask_batch(mask)[:, y:y + height, x:x + width].clone(),)


OPERATIONS = ["multiply", "add", "subtract", "and", "or", "xor"]


class MaskComposite(Node):
    category = "mask"
    inputs = [Socket("destination", MASK), Socket("source", MASK), _coord("x"), _coord("y"),
              Combo("operation", OPERATIONS)]
    outputs = [Output(MASK)]

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

    def execute(self, mask, left, top, right, bottom):
        out = as_mask_batch(mask)
        return (out * edge_ramp(out.shape[1], out.shape[2], left, top, right, bottom).to(out),)


class GrowMask(Node):
    category = "mask"
    inputs = [Socket("mask", MASK), Int("expand", default=0, min=-MAX_RESOLUTION, max=MAX_RESOLUTION),
              Boolean("tapered_corners", default=True)]
    outputs = [Output(MASK)]

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

    def execute(self, mask, value):
        return ((as_mask_batch(mask) > value).float(),)


NODE_CLASSES = [MaskToImage, ImageToMask, ImageColorToMask, SolidMask, InvertMask, CropMask, MaskComposite,
                FeatherMask, GrowMask, ThresholdMask]
