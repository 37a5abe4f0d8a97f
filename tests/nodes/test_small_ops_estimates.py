"""The memory estimates of the image and latent ops declare the shapes their outputs really have."""

from __future__ import annotations

import pytest
import torch

from graph.memory_estimate import EstimateContext, TensorSpec
from nodes.compositing import PorterDuffImageComposite, SplitImageWithAlpha
from nodes.image_filters import ImageAddNoise, ImageQuantize, Morphology
from nodes.image_ops import (
    ImageFlip,
    ImageFromBatch,
    ImageRotate,
    ImageScaleToMaxDimension,
    ImageStitch,
    RepeatImageBatch,
)
from nodes.latent_ops import LatentAdd, LatentCrop, LatentFlip, LatentMultiply, LatentRotate, LatentSubtract

IMAGE = torch.rand(3, 10, 6, 3)
LATENT = {"samples": torch.rand(2, 4, 12, 10)}
IMAGE_CASES = [
    (ImageFlip, {"flip_method": "x-axis: vertically"}), (ImageRotate, {"rotation": "90 degrees"}),
    (ImageRotate, {"rotation": "180 degrees"}), (ImageScaleToMaxDimension, {"upscale_method": "area",
                                                                            "largest_size": 25}),
    (ImageScaleToMaxDimension, {"upscale_method": "area", "largest_size": 0}), (RepeatImageBatch, {"amount": 3}),
    (ImageFromBatch, {"batch_index": 1, "length": 9}), (ImageAddNoise, {"seed": 1, "strength": 0.1}),
    (ImageQuantize, {"colors": 4, "dither": "none"}), (Morphology, {"operation": "open", "kernel_size": 3}),
]
LATENT_CASES = [
    (LatentFlip, {"flip_method": "y-axis: horizontally"}), (LatentRotate, {"rotation": "270 degrees"}),
    (LatentCrop, {"width": 64, "height": 72, "x": 16, "y": 8}), (LatentMultiply, {"multiplier": 2.0}),
]


@pytest.mark.parametrize(("cls", "inputs"), IMAGE_CASES, ids=lambda c: getattr(c, "__name__", ""))
def test_image_op_estimates_match_the_output(cls, inputs):
    estimate = cls.estimate_memory(inputs, {"image": TensorSpec(tuple(IMAGE.shape))}, EstimateContext())
    out = cls().execute(IMAGE, **inputs)[0]
    assert estimate.outputs[0].shape == tuple(out.shape)


@pytest.mark.parametrize(("cls", "inputs"), LATENT_CASES, ids=lambda c: getattr(c, "__name__", ""))
def test_latent_op_estimates_match_the_output(cls, inputs):
    shape = {"samples": TensorSpec(tuple(LATENT["samples"].shape))}
    estimate = cls.estimate_memory(inputs, {"samples": shape}, EstimateContext())
    out = cls().execute(LATENT, **inputs)[0]
    assert estimate.outputs[0]["samples"].shape == tuple(out["samples"].shape)


@pytest.mark.parametrize("cls", [LatentAdd, LatentSubtract])
def test_latent_arithmetic_estimates_match_the_output(cls):
    shape = {"samples": TensorSpec(tuple(LATENT["samples"].shape))}
    estimate = cls.estimate_memory({}, {"samples1": shape, "samples2": shape}, EstimateContext())
    assert estimate.outputs[0]["samples"].shape == tuple(cls().execute(LATENT, LATENT)[0]["samples"].shape)


def spec(t):
    return TensorSpec(tuple(t.shape))


@pytest.mark.parametrize("direction", ["right", "up"])
@pytest.mark.parametrize(("match", "spacing"), [(True, 0), (False, 3)])
def test_stitch_estimate_matches_the_output(direction, match, spacing):
    a, b = torch.rand(2, 10, 6, 3), torch.rand(1, 5, 9, 4)
    inputs = {"direction": direction, "match_image_size": match, "spacing_width": spacing, "spacing_color": "red"}
    estimate = ImageStitch.estimate_memory(inputs, {"image1": spec(a), "image2": spec(b)}, EstimateContext())
    assert estimate.outputs[0].shape == tuple(ImageStitch().execute(a, image2=b, **inputs)[0].shape)


def test_compositing_estimates_match_the_outputs():
    image = torch.rand(2, 5, 4, 4)
    outs = SplitImageWithAlpha().execute(image)
    estimate = SplitImageWithAlpha.estimate_memory({}, {"image": spec(image)}, EstimateContext())
    assert [o.shape for o in estimate.outputs] == [tuple(o.shape) for o in outs]
    inputs = {"source": torch.rand(3, 2, 2, 3), "source_alpha": torch.rand(3, 2, 2),
              "destination": torch.rand(2, 6, 5, 3), "destination_alpha": torch.rand(2, 6, 5)}
    outs = PorterDuffImageComposite().execute(mode="SRC_OVER", **inputs)
    estimate = PorterDuffImageComposite.estimate_memory({"mode": "SRC_OVER"}, {k: spec(v) for k, v in inputs.items()},
                                                        EstimateContext())
    assert [o.shape for o in estimate.outputs] == [tuple(o.shape) for o in outs]
