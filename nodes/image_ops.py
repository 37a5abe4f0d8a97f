"""Image transforms and batch operations: flip, rotate, stitch, scale to a largest side, repeat, pick from a batch,
rebatch.

Names, inputs, defaults and ranges are ComfyUI's, so its workflows run unchanged. Rotations turn clockwise (what
ComfyUI's "90 degrees" does); flips are named by the axis they mirror across ("x-axis: vertically" turns the
image upside down).
"""

from __future__ import annotations

from typing import Any

import torch

from graph.memory_estimate import MemoryEstimate
from graph.node import Boolean, Combo, Int, Node, Output, Socket
from graph.types import IMAGE
from nodes.estimates import describe_image, host_op, image_spec, tensor_of
from nodes.tensor_ops import MAX_RESOLUTION, resize, to_bchw, to_bhwc

FLIP_METHODS = ["x-axis: vertically", "y-axis: horizontally"]
ROTATIONS = ["none", "90 degrees", "180 degrees", "270 degrees"]
# ComfyUI's list for ImageScaleToMaxDimension, "bilinear" twice included (a combo's options are its wire contract)
MAX_DIMENSION_METHODS = ["area", "lanczos", "bilinear", "nearest-exact", "bilinear", "bicubic"]
STITCH_DIRECTIONS = ["right", "down", "left", "up"]
SPACING_COLORS = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "red": (1.0, 0.0, 0.0),
                  "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}


def image_like(image: Any, height: int | None = None, width: int | None = None, batch: int | None = None,
               channels: int | None = None, copies: float = 1.0) -> MemoryEstimate | None:
    """The estimate of an op making a new IMAGE shaped like `image` with the given dimensions changed."""
    spec = tensor_of(image, 4)
    if spec is None:
        return None
    b, h, w, c = spec.shape
    out = image_spec(batch or b, height or h, width or w, channels or c)
    return host_op((out,), copies, describe_image(out))


def flip_dims(flip_method: str, height_dim: int) -> list[int]:
    """The tensor dimension a flip mirrors: "x-axis" mirrors across the horizontal axis (rows reverse)."""
    if flip_method.startswith("x"):
        return [height_dim]
    if flip_method.startswith("y"):
        return [height_dim + 1]
    raise ValueError(f"flip_method {flip_method!r}: expected one of {FLIP_METHODS}")


def quarter_turns(rotation: str) -> int:
    """How many clockwise quarter turns a rotation name means."""
    try:
        return ROTATIONS.index(rotation)
    except ValueError:
        raise ValueError(f"rotation {rotation!r}: expected one of {ROTATIONS}") from None


def rotate_clockwise(x: torch.Tensor, turns: int, height_dim: int) -> torch.Tensor:
    """Turn by quarter turns clockwise: torch.rot90 turns from its first dim towards its second, so going from
    width towards height is clockwise as an image is shown (rows downwards)."""
    return torch.rot90(x, k=turns, dims=[height_dim + 1, height_dim]) if turns else x


class ImageFlip(Node):
    category = "image/transform"
    inputs = [Socket("image", IMAGE), Combo("flip_method", FLIP_METHODS)]
    outputs = [Output(IMAGE)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        return image_like(shapes.get("image"))

    def execute(self, image, flip_method):
        return (torch.flip(image, dims=flip_dims(flip_method, 1)),)


class ImageRotate(Node):
    category = "image/transform"
    inputs = [Socket("image", IMAGE), Combo("rotation", ROTATIONS)]
    outputs = [Output(IMAGE)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        spec = tensor_of(shapes.get("image"), 4)
        if spec is None or quarter_turns(inputs["rotation"]) % 2 == 0:
            return image_like(shapes.get("image"))
        return image_like(shapes.get("image"), height=spec.shape[2], width=spec.shape[1])

    def execute(self, image, rotation):
        return (rotate_clockwise(image, quarter_turns(rotation), 1),)


def _match_batch(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batches of equal size: the shorter one is extended with copies of its last image."""
    n = max(a.shape[0], b.shape[0])
    extend = [t if t.shape[0] == n else torch.cat([t, t[-1:].expand(n - t.shape[0], -1, -1, -1)]) for t in (a, b)]
    return extend[0], extend[1]


def _match_channels(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """When one image has alpha (4 channels) and the other not, the other gets an opaque alpha channel."""
    channels = max(a.shape[-1], b.shape[-1])

    def widen(t: torch.Tensor) -> torch.Tensor:
        if t.shape[-1] == channels:
            return t
        if t.shape[-1] == 3 and channels == 4:
            return torch.cat([t, torch.ones_like(t[..., :1])], dim=-1)
        raise ValueError(f"ImageStitch: images with {a.shape[-1]} and {b.shape[-1]} channels cannot be joined")

    return widen(a), widen(b)


def _pad_centered(t: torch.Tensor, size: int, dim: int, value: float) -> torch.Tensor:
    """Pad dim (1: height, 2: width) of [B, H, W, C] with `value` in every channel to `size`, the extra split evenly
    (the odd pixel after)."""
    missing = size - t.shape[dim]
    if missing <= 0:
        return t
    before = missing // 2
    pad_shape = list(t.shape)
    pad_shape[dim] = before
    first = t.new_full(pad_shape, value)
    pad_shape[dim] = missing - before
    return torch.cat([first, t, t.new_full(pad_shape, value)], dim=dim)


def stitch(image1: torch.Tensor, image2: torch.Tensor, direction: str, match_image_size: bool, spacing_width: int,
           spacing_color: str) -> torch.Tensor:
    """image2 placed beside image1 (right, left) or above/below it (down, up), with an optional strip of a solid
    colour between. With match_image_size, image2 is scaled (lanczos, aspect kept) to image1's height (beside) or
    width (above/below); without, the smaller one is padded, centred, in white when the spacing colour is white and
    in black otherwise (ComfyUI's documented behaviour)."""
    if direction not in STITCH_DIRECTIONS:
        raise ValueError(f"ImageStitch: direction {direction!r}: expected one of {STITCH_DIRECTIONS}")
    if spacing_color not in SPACING_COLORS:
        raise ValueError(f"ImageStitch: spacing_color {spacing_color!r}: expected one of {list(SPACING_COLORS)}")
    image1, image2 = _match_batch(image1, image2)
    image1, image2 = _match_channels(image1, image2)
    beside = direction in ("right", "left")
    across = 1 if beside else 2  # the dim both must share: height beside, width above/below
    if match_image_size and image2.shape[across] != image1.shape[across]:
        h2, w2 = image2.shape[1:3]
        if beside:
            size = (max(1, round(w2 * image1.shape[1] / h2)), image1.shape[1])
        else:
            size = (image1.shape[2], max(1, round(h2 * image1.shape[2] / w2)))
        image2 = to_bhwc(resize(to_bchw(image2), size[0], size[1], "lanczos")).clamp(0, 1)
    elif not match_image_size:
        common = max(image1.shape[across], image2.shape[across])
        fill = 1.0 if spacing_color == "white" else 0.0
        image1, image2 = _pad_centered(image1, common, across, fill), _pad_centered(image2, common, across, fill)
    parts = [image1, image2] if direction in ("right", "down") else [image2, image1]
    along = 2 if beside else 1
    if spacing_width > 0:
        width = spacing_width + spacing_width % 2  # ComfyUI's step is 2: an odd width from the API is rounded up
        shape = list(image1.shape)
        shape[along] = width
        colour = list(SPACING_COLORS[spacing_color]) + [1.0] * (image1.shape[-1] - 3)
        strip = torch.tensor(colour, dtype=image1.dtype, device=image1.device).expand(shape)
        parts.insert(1, strip)
    return torch.cat(parts, dim=along)


class ImageStitch(Node):
    display_name = "Image Stitch"
    category = "image/transform"
    description = "Places image2 beside image1 (or above or below it), with an optional spacing strip."
    inputs = [Socket("image1", IMAGE), Combo("direction", STITCH_DIRECTIONS, default="right"),
              Boolean("match_image_size", default=True), Int("spacing_width", default=0, min=0, max=1024, step=2),
              Combo("spacing_color", list(SPACING_COLORS), default="white"), Socket("image2", IMAGE, optional=True)]
    outputs = [Output(IMAGE)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        first, second = tensor_of(shapes.get("image1"), 4), tensor_of(shapes.get("image2"), 4)
        if first is None or second is None:
            return image_like(first, copies=0.0) if first is not None and "image2" not in shapes else None
        (b1, h1, w1, c1), (b2, h2, w2, c2) = first.shape, second.shape
        beside = inputs["direction"] in ("right", "left")
        if inputs["match_image_size"]:
            h2, w2 = (h1, max(1, round(w2 * h1 / h2))) if beside else (max(1, round(h2 * w1 / w2)), w1)
        spacing = inputs["spacing_width"] + inputs["spacing_width"] % 2
        height, width = (max(h1, h2), w1 + w2 + spacing) if beside else (h1 + h2 + spacing, max(w1, w2))
        return image_like(first, height=height, width=width, batch=max(b1, b2), channels=max(c1, c2), copies=2.0)

    def execute(self, image1, direction, match_image_size, spacing_width, spacing_color, image2=None):
        if image2 is None:
            return (image1,)
        return (stitch(image1, image2, direction, match_image_size, spacing_width, spacing_color),)


def max_dimension_size(height: int, width: int, largest_size: int) -> tuple[int, int]:
    """(height, width) with the longer side `largest_size` and the aspect ratio kept (a side never below 1)."""
    if height > width:
        return largest_size, max(1, round(width * largest_size / height))
    if width > height:
        return max(1, round(height * largest_size / width)), largest_size
    return largest_size, largest_size


class ImageScaleToMaxDimension(Node):
    category = "image/upscaling"
    inputs = [Socket("image", IMAGE), Combo("upscale_method", MAX_DIMENSION_METHODS),
              Int("largest_size", default=512, min=0, max=MAX_RESOLUTION, step=1)]
    outputs = [Output(IMAGE)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        spec = tensor_of(shapes.get("image"), 4)
        if spec is None or inputs["largest_size"] == 0:
            return image_like(shapes.get("image"))
        h, w = max_dimension_size(spec.shape[1], spec.shape[2], inputs["largest_size"])
        return image_like(shapes.get("image"), height=h, width=w, copies=2.0)

    def execute(self, image, upscale_method, largest_size):
        if largest_size == 0:  # as ImageScale's 0 × 0: nothing to scale to
            return (image,)
        height, width = max_dimension_size(image.shape[1], image.shape[2], largest_size)
        return (to_bhwc(resize(to_bchw(image), width, height, upscale_method)).clamp(0, 1),)


class RepeatImageBatch(Node):
    category = "image/batch"
    inputs = [Socket("image", IMAGE), Int("amount", default=1, min=1, max=4096, step=None)]
    outputs = [Output(IMAGE)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        spec = tensor_of(shapes.get("image"), 4)
        return None if spec is None else image_like(spec, batch=spec.shape[0] * inputs["amount"], copies=0.0)

    def execute(self, image, amount):
        return (image.repeat(amount, 1, 1, 1),)


class ImageFromBatch(Node):
    category = "image/batch"
    inputs = [Socket("image", IMAGE), Int("batch_index", default=0, min=0, max=4095, step=None),
              Int("length", default=1, min=1, max=4096, step=None)]
    outputs = [Output(IMAGE)]

    @staticmethod
    def span(batch: int, batch_index: int, length: int) -> tuple[int, int]:
        """(start, stop): an index past the end takes the last image; the length is cut at the batch's end."""
        start = min(batch - 1, batch_index)
        return start, start + min(batch - start, length)

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        spec = tensor_of(shapes.get("image"), 4)
        if spec is None:
            return None
        start, stop = cls.span(spec.shape[0], inputs["batch_index"], inputs["length"])
        return image_like(spec, batch=stop - start, copies=0.0)

    def execute(self, image, batch_index, length):
        start, stop = self.span(image.shape[0], batch_index, length)
        return (image[start:stop].clone(),)


class RebatchImages(Node):
    """Takes every image of every incoming batch, in order, and regroups them into batches of batch_size (the last
    one smaller): a list output, so the nodes after it run once per batch."""

    display_name = "Rebatch Images"
    category = "image/batch"
    input_is_list = True
    inputs = [Socket("images", IMAGE), Int("batch_size", default=1, min=1, max=4096, step=None)]
    outputs = [Output(IMAGE, is_list=True)]

    def execute(self, images, batch_size):
        size = batch_size[0]
        singles = [batch[i:i + 1] for batch in images for i in range(batch.shape[0])]
        shapes = {tuple(s.shape[1:]) for s in singles}
        if len(shapes) > 1:
            raise ValueError(f"RebatchImages: images of different sizes cannot share a batch: "
                             f"{sorted(f'{w}x{h}x{c}' for h, w, c in shapes)} (width x height x channels)")
        return ([torch.cat(singles[i:i + size]) for i in range(0, len(singles), size)],)


NODE_CLASSES = [ImageFlip, ImageRotate, ImageStitch, ImageScaleToMaxDimension, RepeatImageBatch, ImageFromBatch,
                RebatchImages]
