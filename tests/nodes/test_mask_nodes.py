from __future__ import annotations

import pytest
import torch

from nodes import mask as m


def test_mask_image_conversions():
    mask = torch.rand(2, 4, 5)
    (image,) = m.MaskToImage().execute(mask)
    assert image.shape == (2, 4, 5, 3) and torch.equal(image[..., 1], mask)
    rgb = torch.rand(1, 4, 5, 3)
    assert torch.equal(m.ImageToMask().execute(rgb, "green")[0], rgb[..., 1])
    with pytest.raises(ValueError, match="no alpha channel"):
        m.ImageToMask().execute(rgb, "alpha")


def test_image_color_to_mask():
    image = torch.zeros(1, 2, 2, 3)
    image[0, 0, 1] = torch.tensor([1.0, 0.0, 128 / 255])
    (mask,) = m.ImageColorToMask().execute(image, 0xFF0080)
    assert mask.tolist() == [[[0.0, 1.0], [0.0, 0.0]]]


def test_solid_invert_crop_threshold():
    (solid,) = m.SolidMask().execute(0.25, 6, 4)
    assert solid.shape == (1, 4, 6) and torch.all(solid == 0.25)
    assert torch.all(m.InvertMask().execute(solid)[0] == 0.75)
    ramp = torch.arange(24, dtype=torch.float32).view(1, 4, 6) / 23
    assert torch.equal(m.CropMask().execute(ramp, 1, 2, 3, 2)[0], ramp[:, 2:4, 1:4])
    assert torch.equal(m.ThresholdMask().execute(ramp, 0.5)[0], (ramp > 0.5).float())
    assert m.InvertMask().execute(torch.zeros(3, 3))[0].shape == (1, 3, 3)  # a single [H, W] mask


@pytest.mark.parametrize("op, expected", [("multiply", 0.42), ("add", 1.0), ("subtract", 0.0), ("and", 1.0),
                                          ("or", 1.0), ("xor", 0.0)])
def test_mask_composite(op, expected):
    dst = torch.full((1, 4, 4), 0.6)
    src = torch.full((1, 2, 2), 0.7)
    (out,) = m.MaskComposite().execute(dst, src, 2, 2, op)
    assert out[0, 2, 2].item() == pytest.approx(expected)
    assert out[0, 0, 0].item() == pytest.approx(0.6)  # outside the pasted region unchanged


def test_feather_mask():
    (out,) = m.FeatherMask().execute(torch.ones(1, 4, 8), 4, 0, 0, 2)
    assert out[0, 0, :4].tolist() == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert out[0, 3, 5].item() == pytest.approx(0.5) and out[0, 2, 5].item() == 1.0


def test_grow_mask():
    mask = torch.zeros(1, 7, 7)
    mask[0, 3, 3] = 1
    (grown,) = m.GrowMask().execute(mask, 1, True)
    assert grown.sum() == 5  # a plus shape with tapered corners
    (square,) = m.GrowMask().execute(mask, 1, False)
    assert square.sum() == 9
    (shrunk,) = m.GrowMask().execute(square, -1, False)
    assert torch.equal(shrunk, mask)
