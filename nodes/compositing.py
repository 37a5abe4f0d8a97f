"""Alpha compositing: split an RGBA image into colour and mask, join them back, Porter-Duff composites.

Conventions (ComfyUI's): a MASK from an image's alpha is 1 − alpha (1 = transparent, what LoadImage gives), so
SplitImageWithAlpha and JoinImageWithAlpha invert; PorterDuffImageComposite takes its two masks as the alphas
themselves (1 = opaque) and returns the result's alpha.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from graph.node import Combo, Node, Output, Socket
from graph.types import IMAGE, MASK
from nodes.estimates import describe_image, host_op, image_spec, mask_spec, tensor_of
from nodes.image_ops import image_like
from nodes.tensor_ops import PORTER_DUFF, as_mask_batch, porter_duff, resize, to_bchw, to_bhwc

PORTER_DUFF_MODES = sorted(PORTER_DUFF)


def resize_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, H, W] resized bilinearly to height × width (unchanged when it already is)."""
    mask = as_mask_batch(mask)
    if tuple(mask.shape[-2:]) == (height, width):
        return mask
    return F.interpolate(mask.unsqueeze(1), size=(height, width), mode="bilinear", align_corners=False).squeeze(1)


class SplitImageWithAlpha(Node):
    display_name = "Split Image with Alpha"
    category = "mask/compositing"
    inputs = [Socket("image", IMAGE)]
    outputs = [Output(IMAGE), Output(MASK)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        spec = tensor_of(shapes.get("image"), 4)
        if spec is None:
            return None
        b, h, w, _ = spec.shape
        return host_op((image_spec(b, h, w), mask_spec(b, h, w)), 0.0, describe_image(spec))

    def execute(self, image):
        alpha = image[..., 3] if image.shape[-1] > 3 else torch.ones_like(image[..., 0])
        return (image[..., :3].clone(), 1.0 - alpha)


class JoinImageWithAlpha(Node):
    display_name = "Join Image with Alpha"
    category = "mask/compositing"
    inputs = [Socket("image", IMAGE), Socket("alpha", MASK)]
    outputs = [Output(IMAGE)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        return image_like(shapes.get("image"), channels=4)

    def execute(self, image, alpha):
        """The mask is resized to the image; the batch is the shorter of the two (as ComfyUI)."""
        alpha = resize_mask(alpha, image.shape[1], image.shape[2]).to(image)
        batch = min(image.shape[0], alpha.shape[0])
        return (torch.cat([image[:batch, ..., :3], (1.0 - alpha[:batch]).unsqueeze(-1)], dim=-1),)


class PorterDuffImageComposite(Node):
    """The source and its alpha are scaled to the destination's size (bicubic) where they differ; the batch is the
    shortest of the four inputs."""

    display_name = "Porter-Duff Image Composite"
    category = "mask/compositing"
    inputs = [Socket("source", IMAGE), Socket("source_alpha", MASK), Socket("destination", IMAGE),
              Socket("destination_alpha", MASK), Combo("mode", PORTER_DUFF_MODES, default="DST")]
    outputs = [Output(IMAGE), Output(MASK)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        specs = [tensor_of(shapes.get("source"), 4), tensor_of(shapes.get("source_alpha"), 3),
                 tensor_of(shapes.get("destination"), 4), tensor_of(shapes.get("destination_alpha"), 3)]
        if any(spec is None for spec in specs):
            return None
        b = min(spec.shape[0] for spec in specs)
        _, h, w, c = specs[2].shape
        out = image_spec(b, h, w, c)
        return host_op((out, mask_spec(b, h, w)), 4.0, describe_image(out))  # the scaled source, the formula's terms

    def execute(self, source, source_alpha, destination, destination_alpha, mode):
        source_alpha, destination_alpha = as_mask_batch(source_alpha), as_mask_batch(destination_alpha)
        batch = min(source.shape[0], source_alpha.shape[0], destination.shape[0], destination_alpha.shape[0])
        if source.shape[-1] != destination.shape[-1]:
            raise ValueError(f"PorterDuffImageComposite: source has {source.shape[-1]} channels and destination "
                             f"{destination.shape[-1]}; they must have the same number")
        height, width = destination.shape[1:3]
        source, destination = source[:batch], destination[:batch]
        if tuple(source.shape[1:3]) != (height, width):
            source = to_bhwc(resize(to_bchw(source), width, height, "bicubic", "center")).clamp(0, 1)

        def fit(mask: torch.Tensor) -> torch.Tensor:
            mask = mask[:batch].to(destination)
            if tuple(mask.shape[-2:]) == (height, width):
                return mask
            return resize(mask.unsqueeze(1), width, height, "bicubic", "center").squeeze(1).clamp(0, 1)

        return porter_duff(source, fit(source_alpha), destination, fit(destination_alpha), mode)


NODE_CLASSES = [SplitImageWithAlpha, JoinImageWithAlpha, PorterDuffImageComposite]
