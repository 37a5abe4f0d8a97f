"""IPAdapterEncoder's optional mask, as the ComfyUI_IPAdapter_plus pack applies it: cut to its centre square, resized
to the CLIP vision input and multiplied into the normalised pixels, so the masked-out part of the reference image
stops mattering (a full mask changes nothing, a zero mask makes every image the same); the negative is unmasked;
several masks are refused by name."""

from __future__ import annotations

import pytest
import torch

from diffusion.models.ip_adapter import IPAdapterError
from diffusion.patches.ip_adapter_patch import encoder_pixel_mask
from nodes.ip_adapter import IPAdapterEncoder
from tests.nodes.test_ip_adapter_nodes import advanced, setup_files, with_adapter


def test_the_pixel_mask_is_the_masks_centre_square_at_the_input_size():
    mask = torch.zeros(1, 48, 64)
    mask[:, :, 8:56] = 1.0  # exactly the centre square
    torch.testing.assert_close(encoder_pixel_mask(mask, 32), torch.ones(1, 32, 32), rtol=0, atol=1e-5)
    outside = torch.zeros(1, 48, 64)
    outside[:, :, :8] = 1.0  # cut away with the image's sides
    assert torch.equal(encoder_pixel_mask(outside, 32), torch.zeros(1, 32, 32))
    left = torch.zeros(48, 64)  # a 2-D mask; the left half of the centre square
    left[:, 8:32] = 1.0
    half = encoder_pixel_mask(left, 32)
    assert half.shape == (1, 32, 32) and float(half[0, :, :14].min()) > 0.9 and float(half[0, :, 18:].abs().max()) < 0.1
    exact = torch.rand(1, 32, 32)
    assert encoder_pixel_mask(exact, 32) is not None and torch.equal(encoder_pixel_mask(exact, 32), exact)
    with pytest.raises(IPAdapterError, match=r"IPAdapterEncoder: mask must be one MASK \[1, H, W\].*\[2, 8, 8\]"):
        encoder_pixel_mask(torch.ones(2, 8, 8), 32)


@pytest.fixture
def parts(engine, model_dir):
    """The loaded plus and plain adapters, the CLIP vision model and the two 48 x 64 reference pictures."""
    setup_files(engine, model_dir)
    plus, plain = with_adapter(advanced("plus.bin", image=["32", 0])), with_adapter(advanced())
    out = {name: engine.outputs(plus, node)[0][0] for name, node in
           (("plus", "20"), ("vision", "40"), ("ref0", "30"), ("ref1", "31"))}
    out["plain"] = engine.outputs(plain, "20")[0][0]
    return out


def test_the_mask_blanks_part_of_the_reference_image(parts):
    encode = IPAdapterEncoder().execute
    vision, ref0, ref1 = parts["vision"], parts["ref0"], parts["ref1"]  # 48 x 64 pictures
    for adapter in ("plus", "plain"):
        handle = parts[adapter]
        plain_pos, plain_neg = encode(handle, ref0, 1.0, clip_vision=vision)
        full_pos, full_neg = encode(handle, ref0, 1.0, torch.ones(1, 48, 64), vision)
        torch.testing.assert_close(full_pos, plain_pos, rtol=1e-4, atol=1e-5)
        assert torch.equal(full_neg, plain_neg)  # the negative is never masked
        zero0, _ = encode(handle, ref0, 1.0, torch.zeros(1, 48, 64), vision)
        zero1, _ = encode(handle, ref1, 1.0, torch.zeros(1, 48, 64), vision)
        torch.testing.assert_close(zero0, zero1, rtol=0, atol=1e-6)  # nothing of the image is left
        assert float((zero0 - plain_pos).abs().max()) > 1e-3
        # keep only the left half: a change confined to the right half no longer matters, one on the left does
        keep_left = torch.zeros(1, 48, 64)
        keep_left[:, :, :28] = 1.0
        right = ref0.clone()
        right[:, :, 40:] = torch.tensor([0.1, 0.9, 0.3])
        left = ref0.clone()
        left[:, :, 8:24] = torch.tensor([0.1, 0.9, 0.3])
        base, _ = encode(handle, ref0, 1.0, keep_left, vision)
        torch.testing.assert_close(encode(handle, right, 1.0, keep_left, vision)[0], base, rtol=0, atol=1e-6)
        assert float((encode(handle, left, 1.0, keep_left, vision)[0] - base).abs().max()) > 1e-3
        assert float((encode(handle, right, 1.0, clip_vision=vision)[0] - plain_pos).abs().max()) > 1e-3
        doubled, _ = encode(handle, ref0, 2.0, keep_left, vision)
        torch.testing.assert_close(doubled, base * 2)


def test_several_masks_are_refused(engine, parts):
    with pytest.raises(IPAdapterError, match=r"IPAdapterEncoder: mask must be one MASK"):
        IPAdapterEncoder().execute(parts["plus"], parts["ref0"], 1.0, torch.ones(2, 48, 64), parts["vision"])
