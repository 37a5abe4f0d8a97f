from __future__ import annotations

import pytest
import torch

from nodes import image as n
from nodes.utility import PrimitiveBoolean, PrimitiveFloat, PrimitiveInt, PrimitiveString, PrimitiveStringMultiline


def img(b=1, h=8, w=12, value=None, seed=0):
    if value is not None:
        return torch.full((b, h, w, 3), float(value))
    return torch.rand((b, h, w, 3), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"])
def test_image_scale_methods_shapes_and_constant_preserved(method):
    (out,) = n.ImageScale().execute(img(value=0.25), method, 24, 16, "disabled")
    assert out.shape == (1, 16, 24, 3)
    assert torch.allclose(out, torch.full_like(out, 0.25), atol=1 / 255)


def test_image_scale_keep_aspect_and_center_crop():
    (out,) = n.ImageScale().execute(img(h=8, w=16), "bilinear", 0, 4, "disabled")
    assert out.shape == (1, 4, 8, 3)
    x = torch.zeros(1, 8, 16, 3)
    x[:, :, 4:12] = 1.0  # the centre square is white
    (out,) = n.ImageScale().execute(x, "nearest-exact", 8, 8, "center")
    assert out.shape == (1, 8, 8, 3) and out.min() == 1.0


def test_scale_by_and_total_pixels():
    assert n.ImageScaleBy().execute(img(h=10, w=20), "area", 0.5)[0].shape == (1, 5, 10, 3)
    (out,) = n.ImageScaleToTotalPixels().execute(img(h=16, w=32), "bilinear", 0.01)
    assert abs(out.shape[1] * out.shape[2] - 0.01 * 1024 * 1024) < 200 and abs(out.shape[2] - 2 * out.shape[1]) <= 1


def test_crop_invert_batch():
    x = img(h=10, w=10)
    (crop,) = n.ImageCrop().execute(x, 4, 3, 2, 5)
    assert torch.equal(crop, x[:, 5:8, 2:6])
    assert n.ImageCrop().execute(x, 50, 50, 8, 8)[0].shape == (1, 2, 2, 3)  # clipped at the border
    assert torch.allclose(n.ImageInvert().execute(x)[0], 1 - x)
    (batch,) = n.ImageBatch().execute(x, img(h=20, w=20, seed=1))
    assert batch.shape == (2, 10, 10, 3) and torch.equal(batch[0], x[0])


def test_empty_image_colour():
    (out,) = n.EmptyImage().execute(4, 3, 2, 0xFF8000)
    assert out.shape == (2, 3, 4, 3)
    assert torch.allclose(out[0, 0, 0], torch.tensor([1.0, 128 / 255, 0.0]))


def test_pad_for_outpaint():
    x = img(h=100, w=100, value=0.9)
    out, mask = n.ImagePadForOutpaint().execute(x, 16, 0, 8, 0, 10)
    assert out.shape == (1, 100, 124, 3) and mask.shape == (1, 100, 124)
    assert torch.all(out[0, :, :16] == 0.5) and torch.all(out[0, :, 16:116] == 0.9)
    assert torch.all(mask[0, :, :16] == 1) and torch.all(mask[0, :, 116:] == 1)
    assert mask[0, 50, 16] == 1.0  # feathered: full at the edge ...
    assert mask[0, 50, 16 + 5] == pytest.approx(0.25)  # ... quadratic inside: ((10-5)/10)^2
    assert mask[0, 50, 16 + 10] == 0 and mask[0, 50, 60] == 0
    _, no_feather = n.ImagePadForOutpaint().execute(x, 8, 8, 8, 8, 0)
    assert no_feather[0, 8:108, 8:108].sum() == 0


def test_composite_masked():
    dst, src = img(h=10, w=10, value=0.0), img(h=4, w=4, value=1.0)
    (out,) = n.ImageCompositeMasked().execute(dst, src, 8, 2, False)
    assert out[0, 2:6, 8:10].min() == 1.0 and out[0, :2].max() == 0 and out[0, 2:6, :8].max() == 0
    mask = torch.zeros(4, 4)
    mask[:2] = 1
    (out,) = n.ImageCompositeMasked().execute(dst, src, 0, 0, False, mask)
    assert out[0, :2, :4].min() == 1.0 and out[0, 2:4, :4].max() == 0.0
    (out,) = n.ImageCompositeMasked().execute(dst, src, 0, 0, True)
    assert torch.allclose(out, torch.ones_like(out))


@pytest.mark.parametrize("mode, expected", [("normal", 0.8), ("multiply", 0.16), ("screen", 0.84),
                                            ("difference", 0.6), ("overlay", 0.32)])
def test_blend_modes(mode, expected):
    (out,) = n.ImageBlend().execute(img(value=0.2), img(value=0.8), 1.0, mode)
    assert torch.allclose(out, torch.full_like(out, expected), atol=1e-6)
    (half,) = n.ImageBlend().execute(img(value=0.2), img(value=0.8), 0.5, "normal")
    assert torch.allclose(half, torch.full_like(half, 0.5))


def test_blur_and_sharpen():
    x = img(h=16, w=16)
    (blurred,) = n.ImageBlur().execute(x, 2, 1.5)
    assert blurred.shape == x.shape and blurred.std() < x.std()
    flat = img(h=16, w=16, value=0.4)
    assert torch.allclose(n.ImageBlur().execute(flat, 3, 2.0)[0], flat, atol=1e-6)
    (sharp,) = n.ImageSharpen().execute(x, 1, 1.0, 1.0)
    assert sharp.shape == x.shape and (sharp - x).abs().max() > 0.01
    assert torch.allclose(n.ImageSharpen().execute(flat, 1, 1.0, 2.0)[0], flat, atol=1e-6)


def test_get_image_size_and_primitives():
    assert n.GetImageSize().execute(img(b=2, h=5, w=7)) == (7, 5, 2)
    assert PrimitiveInt().execute(3) == (3,) and PrimitiveFloat().execute(0.5) == (0.5,)
    assert PrimitiveString().execute("a") == ("a",) and PrimitiveStringMultiline().execute("a\nb") == ("a\nb",)
    assert PrimitiveBoolean().execute(True) == (True,)


def test_declared_ranges_match_comfyui():
    from nodes import build_registry

    info = build_registry(plugins=False).object_info()
    assert info["ImageScale"]["input"]["required"]["width"] == ["INT", {"default": 512, "min": 0, "max": 16384,
                                                                        "step": 1}]
    assert info["ImageScaleBy"]["input"]["required"]["scale_by"][1]["max"] == 8.0
    assert info["ImagePadForOutpaint"]["input"]["required"]["left"][1]["step"] == 8
    assert info["ImageBlend"]["input"]["required"]["blend_mode"][0][:2] == ["normal", "multiply"]
    assert info["ImageCompositeMasked"]["input"]["optional"] == {"mask": ["MASK", {}]}
    assert info["GetImageSize"]["output_name"] == ["width", "height", "batch_size"]
