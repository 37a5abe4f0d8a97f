"""Image nodes: scale, crop, invert, batch, empty, pad for outpainting, composite, blend, blur, sharpen.

Names, inputs, defaults and ranges are ComfyUI's, so existing workflows run unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from graph.memory_estimate import MemoryEstimate
from graph.node import Boolean, Combo, Float, Int, Node, Output, Socket
from graph.types import IMAGE, INT, MASK
from nodes.estimates import describe_image, host_op, image_spec, mask_spec, resized, tensor_of
from nodes.tensor_ops import MAX_RESOLUTION, UPSCALE_METHODS, blur, composite, resize, to_bchw, to_bhwc

CROP_METHODS = ["disabled", "center"]


def _size(name: str, default: int = 512, minimum: int = 0, step: int = 1) -> Int:
    return Int(name, default=default, min=minimum, max=MAX_RESOLUTION, step=step)


def _image_op(image: Any, height: int | None = None, width: int | None = None, batch: int | None = None,
              copies: float = 1.0) -> MemoryEstimate | None:
    """An op making a new IMAGE shaped like `image` with the given dimensions changed, while `copies`
    temporaries of the result's size live (a resize's contiguous input, the result before a clamp)."""
    spec = tensor_of(image, 4)
    if spec is None:
        return None
    b, h, w, c = spec.shape
    out = image_spec(batch or b, height or h, width or w, c)
    return host_op((out,), copies, describe_image(out))


def _scaled(image: Any, size: Callable[[int, int], tuple[int, int]]) -> MemoryEstimate | None:
    spec = tensor_of(image, 4)
    if spec is None:
        return None
    h, w = size(spec.shape[1], spec.shape[2])
    return _image_op(image, h, w, copies=2.0)  # the resize's result, then the clamped one; and the input's copy


class ImageScale(Node):
    display_name = "Upscale Image"
    category = "image/upscaling"
    inputs = [Socket("image", IMAGE), Combo("upscale_method", UPSCALE_METHODS), _size("width"), _size("height"),
              Combo("crop", CROP_METHODS)]
    outputs = [Output(IMAGE)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        return _scaled(shapes.get("image"), lambda h, w: resized(h, w, inputs["width"], inputs["height"]))

    def execute(self, image, upscale_method, width, height, crop):
        return (to_bhwc(resize(to_bchw(image), width, height, upscale_method, crop)).clamp(0, 1),)


class ImageScaleBy(Node):
    display_name = "Upscale Image By"
    category = "image/upscaling"
    inputs = [Socket("image", IMAGE), Combo("upscale_method", UPSCALE_METHODS),
              Float("scale_by", default=1.0, min=0.01, max=8.0, step=0.01)]
    outputs = [Output(IMAGE)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        scale = inputs["scale_by"]
        return _scaled(shapes.get("image"), lambda h, w: (max(1, round(h * scale)), max(1, round(w * scale))))

    def execute(self, image, upscale_method, scale_by):
        height, width = (max(1, round(s * scale_by)) for s in image.shape[1:3])
        return (to_bhwc(resize(to_bchw(image), width, height, upscale_method)).clamp(0, 1),)


class ImageScaleToTotalPixels(Node):
    display_name = "Scale Image to Total Pixels"
    category = "image/upscaling"
    inputs = [Socket("image", IMAGE), Combo("upscale_method", UPSCALE_METHODS),
              Float("megapixels", default=1.0, min=0.01, max=16.0, step=0.01)]
    outputs = [Output(IMAGE)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        def size(h: int, w: int) -> tuple[int, int]:
            scale = math.sqrt(inputs["megapixels"] * 1024 * 1024 / (h * w))
            return max(1, round(h * scale)), max(1, round(w * scale))

        return _scaled(shapes.get("image"), size)

    def execute(self, image, upscale_method, megapixels):
        h, w = image.shape[1:3]
        scale = math.sqrt(megapixels * 1024 * 1024 / (h * w))
        width, height = max(1, round(w * scale)), max(1, round(h * scale))
        return (to_bhwc(resize(to_bchw(image), width, height, upscale_method)).clamp(0, 1),)


class ImageCrop(Node):
    display_name = "Image Crop"
    category = "image/transform"
    inputs = [Socket("image", IMAGE), _size("width", minimum=1), _size("height", minimum=1),
              _size("x", default=0), _size("y", default=0)]
    outputs = [Output(IMAGE)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        spec = tensor_of(shapes.get("image"), 4)
        if spec is None:
            return None
        h, w = spec.shape[1:3]
        x, y = min(inputs["x"], w - 1), min(inputs["y"], h - 1)
        out = image_spec(spec.shape[0], min(inputs["height"], h - y), min(inputs["width"], w - x), spec.shape[3])
        return MemoryEstimate(outputs=(out,), kept_bytes=0, what=describe_image(out))  # a view of the input

    def execute(self, image, width, height, x, y):
        h, w = image.shape[1:3]
        x, y = min(x, w - 1), min(y, h - 1)
        return (image[:, y:y + height, x:x + width, :],)


class ImageInvert(Node):
    display_name = "Invert Image"
    category = "image"
    inputs = [Socket("image", IMAGE)]
    outputs = [Output(IMAGE)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        return _image_op(shapes.get("image"), copies=0.0)

    def execute(self, image):
        return (1.0 - image,)


class ImageBatch(Node):
    display_name = "Batch Images"
    category = "image"
    inputs = [Socket("image1", IMAGE), Socket("image2", IMAGE)]
    outputs = [Output(IMAGE)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        first, second = tensor_of(shapes.get("image1"), 4), tensor_of(shapes.get("image2"), 4)
        if first is None or second is None:
            return None
        return _image_op(first, batch=first.shape[0] + second.shape[0], copies=0.5)

    def execute(self, image1, image2):
        if image2.shape[1:3] != image1.shape[1:3]:
            image2 = to_bhwc(resize(to_bchw(image2), image1.shape[2], image1.shape[1], "bilinear", "center"))
        return (torch.cat([image1, image2[..., : image1.shape[-1]]], dim=0),)


class EmptyImage(Node):
    category = "image"
    inputs = [_size("width", minimum=1), _size("height", minimum=1),
              Int("batch_size", default=1, min=1, max=4096, step=None),
              Int("color", default=0, min=0, max=0xFFFFFF, step=1, extra={"display": "color"})]
    outputs = [Output(IMAGE)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        out = image_spec(inputs["batch_size"], inputs["height"], inputs["width"])
        return MemoryEstimate(outputs=(out,), what=describe_image(out))

    def execute(self, width, height, batch_size, color):
        rgb = torch.tensor([(color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF], dtype=torch.float32) / 255
        return (rgb.expand(batch_size, height, width, 3).clone(),)


class ImagePadForOutpaint(Node):
    display_name = "Pad Image for Outpainting"
    category = "image"
    description = "Grows the canvas with grey and returns a mask of the new area, feathered into the image."
    inputs = [Socket("image", IMAGE), *(_size(side, default=0, step=8) for side in ("left", "top", "right",
                                                                                     "bottom")),
              Int("feathering", default=40, min=0, max=MAX_RESOLUTION)]
    outputs = [Output(IMAGE), Output(MASK)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        spec = tensor_of(shapes.get("image"), 4)
        if spec is None:
            return None
        b, h, w, c = spec.shape
        height, width = h + inputs["top"] + inputs["bottom"], w + inputs["left"] + inputs["right"]
        out = image_spec(b, height, width, c)
        return host_op((out, mask_spec(1, height, width)), 0.0, describe_image(out),
                       extra=6 * h * w * 4)  # the feathering's distance maps

    def execute(self, image, left, top, right, bottom, feathering):
        b, h, w, c = image.shape
        out = torch.full((b, h + top + bottom, w + left + right, c), 0.5, dtype=image.dtype)
        out[:, top:top + h, left:left + w, :] = image
        mask = torch.ones((h + top + bottom, w + left + right), dtype=torch.float32)
        inner = torch.zeros((h, w), dtype=torch.float32)
        if feathering > 0 and feathering * 2 < min(h, w):
            ys = torch.arange(h, dtype=torch.float32)[:, None]
            xs = torch.arange(w, dtype=torch.float32)[None, :]
            distances = [d for d, pad in ((ys, top), (h - 1 - ys, bottom), (xs, left), (w - 1 - xs, right)) if pad]
            if distances:
                nearest = torch.stack([d.expand(h, w) for d in distances]).amin(0)
                ramp = ((feathering - nearest) / feathering).clamp(min=0)
                inner = ramp * ramp  # quadratic fall-off into the image
        mask[top:top + h, left:left + w] = inner
        return (out, mask.unsqueeze(0))


class ImageCompositeMasked(Node):
    category = "image"
    inputs = [Socket("destination", IMAGE), Socket("source", IMAGE), _size("x", default=0), _size("y", default=0),
              Boolean("resize_source", default=False), Socket("mask", MASK, optional=True)]
    outputs = [Output(IMAGE)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        return _image_op(shapes.get("destination"), copies=2.0)

    def execute(self, destination, source, x, y, resize_source, mask=None):
        out = composite(to_bchw(destination), to_bchw(source), x, y, mask, 1, resize_source)
        return (to_bhwc(out),)


BLEND_MODES = ["normal", "multiply", "screen", "overlay", "soft_light", "difference"]


def _blend(a: torch.Tensor, b: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "normal":
        return b
    if mode == "multiply":
        return a * b
    if mode == "screen":
        return 1 - (1 - a) * (1 - b)
    if mode == "overlay":
        return torch.where(a <= 0.5, 2 * a * b, 1 - 2 * (1 - a) * (1 - b))
    if mode == "soft_light":
        g = torch.where(a <= 0.25, ((16 * a - 12) * a + 4) * a, torch.sqrt(a))
        return torch.where(b <= 0.5, a - (1 - 2 * b) * a * (1 - a), a + (2 * b - 1) * (g - a))
    if mode == "difference":
        return (a - b).abs()
    raise ValueError(f"unknown blend mode {mode!r}")


class ImageBlend(Node):
    display_name = "Image Blend"
    category = "image/postprocessing"
    inputs = [Socket("image1", IMAGE), Socket("image2", IMAGE),
              Float("blend_factor", default=0.5, min=0.0, max=1.0, step=0.01), Combo("blend_mode", BLEND_MODES)]
    outputs = [Output(IMAGE)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        return _image_op(shapes.get("image1"), copies=4.0)  # the blend, its weighting, the sum, the clamp

    def execute(self, image1, image2, blend_factor, blend_mode):
        if image2.shape[1:3] != image1.shape[1:3]:
            image2 = to_bhwc(resize(to_bchw(image2), image1.shape[2], image1.shape[1], "bicubic", "center"))
        blended = _blend(image1, image2.to(image1.dtype), blend_mode)
        return ((image1 * (1 - blend_factor) + blended * blend_factor).clamp(0, 1),)


class ImageBlur(Node):
    display_name = "Image Blur"
    category = "image/postprocessing"
    inputs = [Socket("image", IMAGE), Int("blur_radius", default=1, min=1, max=31),
              Float("sigma", default=1.0, min=0.1, max=10.0, step=0.1)]
    outputs = [Output(IMAGE)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        return _image_op(shapes.get("image"), copies=2.0)  # the padded input and the first pass

    def execute(self, image, blur_radius, sigma):
        return (to_bhwc(blur(to_bchw(image), blur_radius, sigma)),)


class ImageSharpen(Node):
    display_name = "Image Sharpen"
    category = "image/postprocessing"
    inputs = [Socket("image", IMAGE), Int("sharpen_radius", default=1, min=1, max=31),
              Float("sigma", default=1.0, min=0.1, max=10.0, step=0.01),
              Float("alpha", default=1.0, min=0.0, max=5.0, step=0.01)]
    outputs = [Output(IMAGE)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        return _image_op(shapes.get("image"), copies=5.0)  # the blur's, the detail, its scaling, the sum

    def execute(self, image, sharpen_radius, sigma, alpha):
        x = to_bchw(image)
        detail = x - blur(x, sharpen_radius, sigma)  # unsharp masking
        return (to_bhwc(x + alpha * detail).clamp(0, 1),)


class GetImageSize(Node):
    display_name = "Get Image Size"
    category = "image"
    # ComfyUI declares the node's id as a hidden input and shows the size as text on the node; so do we, through
    # the execution context (which /object_info does not list).
    hidden = ("unique_id", "context")
    inputs = [Socket("image", IMAGE)]
    outputs = [Output(INT, "width"), Output(INT, "height"), Output(INT, "batch_size")]

    def execute(self, image, unique_id=None, context=None):
        width, height, batch = int(image.shape[2]), int(image.shape[1]), int(image.shape[0])
        if context is not None:
            context.progress_text(f"width: {width}, height: {height}\n batch size: {batch}")
        return (width, height, batch)


NODE_CLASSES = [ImageScale, ImageScaleBy, ImageScaleToTotalPixels, ImageCrop, ImageInvert, ImageBatch, EmptyImage,
                ImagePadForOutpaint, ImageCompositeMasked, ImageBlend, ImageBlur, ImageSharpen, GetImageSize]
