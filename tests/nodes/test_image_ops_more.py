"""Image transforms, batch ops, filters and alpha compositing against hand-computed small tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from graph.executor import Executor
from graph.validation import validate_prompt
from nodes import build_registry
from nodes.compositing import JoinImageWithAlpha, PorterDuffImageComposite, SplitImageWithAlpha
from nodes.environment import Environment
from nodes.image_filters import ImageAddNoise, ImageQuantize, Morphology, bayer_matrix
from nodes.image_ops import (
    ImageFlip,
    ImageFromBatch,
    ImageRotate,
    ImageScaleToMaxDimension,
    ImageStitch,
    RebatchImages,
    RepeatImageBatch,
)
from nodes.tensor_ops import PORTER_DUFF


def grid(values, channels=1):
    """[1, H, W, C] from a 2-D list, the value repeated over channels."""
    t = torch.tensor(values, dtype=torch.float32)
    return t[None, :, :, None].expand(1, -1, -1, channels).clone()


def plane(image):
    return image[0, :, :, 0].tolist()


SQUARE = [[1, 2], [3, 4]]


def test_flip_mirrors_across_the_named_axis():
    assert plane(ImageFlip().execute(grid(SQUARE), "x-axis: vertically")[0]) == [[3, 4], [1, 2]]
    assert plane(ImageFlip().execute(grid(SQUARE), "y-axis: horizontally")[0]) == [[2, 1], [4, 3]]


def test_rotate_turns_clockwise():
    rotate = ImageRotate().execute
    assert plane(rotate(grid(SQUARE), "90 degrees")[0]) == [[3, 1], [4, 2]]
    assert plane(rotate(grid(SQUARE), "180 degrees")[0]) == [[4, 3], [2, 1]]
    assert plane(rotate(grid(SQUARE), "270 degrees")[0]) == [[2, 4], [1, 3]]
    assert plane(rotate(grid(SQUARE), "none")[0]) == SQUARE
    tall = torch.zeros(2, 5, 3, 3)
    assert rotate(tall, "90 degrees")[0].shape == (2, 3, 5, 3)


def test_stitch_places_and_pads_and_spaces():
    a, b = torch.full((1, 2, 2, 3), 0.2), torch.full((1, 4, 1, 3), 0.8)
    out = ImageStitch().execute(a, "right", False, 0, "black", b)[0]
    assert out.shape == (1, 4, 3, 3)
    # a (height 2) is padded with black to 4, centred: one row above, one below
    assert out[0, :, 0, 0].tolist() == pytest.approx([0.0, 0.2, 0.2, 0.0])
    # white spacing pads with white; another colour pads with black
    assert ImageStitch().execute(a, "right", False, 0, "white", b)[0][0, :, 0, 0].tolist() == \
        pytest.approx([1.0, 0.2, 0.2, 1.0])
    assert ImageStitch().execute(a, "right", False, 0, "blue", b)[0][0, :, 0, 2].tolist() == \
        pytest.approx([0.0, 0.2, 0.2, 0.0])
    assert out[0, :, 2, 0].tolist() == pytest.approx([0.8] * 4)
    left = ImageStitch().execute(a, "left", False, 0, "white", b)[0]
    assert left[0, :, 0, 0].tolist() == pytest.approx([0.8] * 4)
    down = ImageStitch().execute(a, "down", False, 2, "red", a)[0]
    assert down.shape == (1, 6, 2, 3)
    assert down[0, 2:4, :, :].reshape(-1, 3).tolist() == [[1.0, 0.0, 0.0]] * 4  # the spacing strip
    up = ImageStitch().execute(grid([[0.1]], 3), "up", False, 0, "white", grid([[0.9]], 3))[0]
    assert up[0, :, 0, 0].tolist() == pytest.approx([0.9, 0.1])
    assert ImageStitch().execute(a, "right", True, 0, "white", None)[0] is a


def test_stitch_matches_sizes_batches_and_alpha():
    a = torch.full((2, 4, 4, 3), 0.5)
    b = torch.full((1, 2, 3, 4), 0.25)  # half a's height, with alpha; one image for a batch of two
    out = ImageStitch().execute(a, "right", True, 0, "white", b)[0]
    assert out.shape == (2, 4, 4 + 6, 4)  # b scaled to height 4 keeps its 3:2 aspect: width 6
    assert out[..., 3][:, :, :4].eq(1.0).all()  # a got an opaque alpha
    assert out[1, :, 4:, :3] == pytest.approx(torch.full((4, 6, 3), 0.25), abs=1e-3)
    assert ImageStitch().execute(a, "right", False, 3, "black", a)[0].shape[2] == 4 + 4 + 4  # odd width rounds up


def test_scale_to_max_dimension_keeps_the_aspect_ratio():
    node = ImageScaleToMaxDimension()
    assert node.execute(torch.rand(1, 30, 60, 3), "area", 20)[0].shape == (1, 10, 20, 3)
    assert node.execute(torch.rand(1, 60, 30, 3), "bilinear", 20)[0].shape == (1, 20, 10, 3)
    assert node.execute(torch.rand(1, 8, 8, 3), "lanczos", 16)[0].shape == (1, 16, 16, 3)
    image = torch.rand(1, 8, 8, 3)
    assert node.execute(image, "nearest-exact", 0)[0] is image


def test_batch_ops():
    batch = torch.arange(3, dtype=torch.float32).view(3, 1, 1, 1).expand(3, 2, 2, 3)
    assert RepeatImageBatch().execute(batch, 2)[0][:, 0, 0, 0].tolist() == [0, 1, 2, 0, 1, 2]
    pick = ImageFromBatch().execute
    assert pick(batch, 1, 5)[0][:, 0, 0, 0].tolist() == [1, 2]  # cut at the end
    assert pick(batch, 9, 2)[0][:, 0, 0, 0].tolist() == [2]  # past the end: the last one


def test_rebatch_images_regroups_every_image_in_order():
    first = torch.arange(3, dtype=torch.float32).view(3, 1, 1, 1).expand(3, 2, 2, 3)
    second = torch.full((2, 2, 2, 3), 7.0)
    out = RebatchImages().execute([first, second], [2])[0]
    assert [b[:, 0, 0, 0].tolist() for b in out] == [[0, 1], [2, 7], [7]]
    with pytest.raises(ValueError, match="different sizes"):
        RebatchImages().execute([first, torch.zeros(1, 3, 3, 3)], [2])


def test_rebatch_images_runs_downstream_once_per_batch(tmp_path):
    env = Environment(tmp_path)
    env.ensure_dirs()
    registry = build_registry(env, plugins=False)
    prompt = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 5, "color": 0}},
              "2": {"class_type": "RebatchImages", "inputs": {"images": ["1", 0], "batch_size": 2}},
              "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
    validation = validate_prompt(prompt, registry, env)
    assert validation.ok, validation.response()
    result = Executor(env=env).execute(validation.prompt, "p", lambda *_: None)
    assert result.status == "success", result.error
    assert len(result.outputs["3"]["images"]) == 5  # three batches (2, 2, 1) of previews


def test_add_noise_is_comfyui_noise_for_the_seed_clipped():
    image = torch.full((1, 4, 4, 3), 0.5)
    out = ImageAddNoise().execute(image, 42, 0.1)[0]
    noise = torch.randn((1, 4, 4, 3), generator=torch.Generator().manual_seed(42))
    assert torch.allclose(out, (0.5 + 0.1 * noise).clamp(0, 1), atol=1e-6)
    assert torch.equal(ImageAddNoise().execute(image, 42, 0.1)[0], out)
    assert not torch.equal(ImageAddNoise().execute(image, 43, 0.1)[0], out)
    assert torch.equal(ImageAddNoise().execute(image, 42, 0.0)[0], image)
    assert ImageAddNoise().execute(image, 0xFFFFFFFFFFFFFFFF, 1.0)[0].min() >= 0  # the largest seed works


def test_bayer_matrix_is_the_recursive_one():
    assert bayer_matrix(2).tolist() == [[0, 2], [3, 1]]
    m4 = bayer_matrix(4)
    assert m4.tolist()[0] == [0, 8, 2, 10] and sorted(m4.ravel().tolist()) == list(range(16))
    assert sorted(bayer_matrix(16).ravel().tolist()) == list(range(256))


def gradient(width=64, height=8):
    return torch.linspace(0, 1, width).view(1, 1, width, 1).expand(1, height, width, 3).clone()


@pytest.mark.parametrize("dither", ["none", "floyd-steinberg", "bayer-2", "bayer-4", "bayer-8", "bayer-16"])
def test_quantize_uses_at_most_n_colours(dither):
    out = ImageQuantize().execute(gradient(), 4, dither)[0]
    colours = {tuple(p) for p in (out[0] * 255).round().int().reshape(-1, 3).tolist()}
    assert 1 < len(colours) <= 4


def test_quantize_keeps_an_image_that_already_fits_and_dithering_tracks_the_mean():
    two = torch.zeros(1, 4, 4, 3)
    two[:, :, 2:] = 1.0
    assert torch.equal(ImageQuantize().execute(two, 2, "none")[0], two)
    assert ImageQuantize().execute(two, 1, "none")[0].unique().numel() == 1
    source = gradient()
    errors = {}
    for dither in ("none", "floyd-steinberg", "bayer-2", "bayer-4", "bayer-16"):
        out = ImageQuantize().execute(source, 2, dither)[0]
        assert len(out.unique()) == 2  # the palette of two greys (about 0.24 and 0.75: median cut's box means)
        # the local mean (over 8×8 blocks) follows the gradient when dithered, between the two palette greys
        blocks = (out[0, :, :, 0] - source[0, :, :, 0]).reshape(8, 8, 8).mean(dim=(0, 2))
        errors[dither] = blocks[2:6].abs().mean().item()
    assert errors["none"] > 0.1
    for dither in ("floyd-steinberg", "bayer-2", "bayer-4", "bayer-16"):
        assert errors[dither] < errors["none"] / 4, errors


def test_quantize_keeps_alpha():
    image = torch.rand(1, 4, 4, 4)
    assert torch.equal(ImageQuantize().execute(image, 8, "none")[0][..., 3], image[..., 3])


DOT = [[0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]


def test_morphology_by_hand():
    run = Morphology().execute
    dilated = plane(run(grid(DOT), "dilate", 3)[0])
    assert dilated == [[0] * 5, [0, 1, 1, 1, 0], [0, 1, 1, 1, 0], [0, 1, 1, 1, 0], [0] * 5]
    assert plane(run(grid(DOT), "erode", 3)[0]) == [[0] * 5] * 5
    assert plane(run(grid(DOT), "open", 3)[0]) == [[0] * 5] * 5  # a speck smaller than the square goes
    assert plane(run(grid(DOT), "top_hat", 3)[0]) == DOT  # ...and is what the top hat keeps
    assert plane(run(grid(DOT), "gradient", 3)[0]) == dilated
    hole = [[1 - v for v in row] for row in DOT]
    assert plane(run(grid(hole), "close", 3)[0]) == [[1] * 5] * 5
    assert plane(run(grid(hole), "bottom_hat", 3)[0]) == DOT
    # the border is geodesic: eroding an all-ones image keeps it all ones (outside pixels are not 0)
    assert plane(run(grid([[1] * 4] * 4), "erode", 3)[0]) == [[1] * 4] * 4
    # an even square's window spans size // 2 pixels before a pixel and one fewer after: a dot grows 1 up/left and
    # 2 down/right
    even = plane(run(grid(DOT), "dilate", 4)[0])
    assert even == [[0] * 5] + [[0, 1, 1, 1, 1]] * 4
    assert run(torch.rand(2, 6, 7, 3), "close", 5)[0].shape == (2, 6, 7, 3)


def test_split_and_join_alpha_round_trip():
    rgba = torch.rand(2, 3, 3, 4)
    rgb, mask = SplitImageWithAlpha().execute(rgba)
    assert torch.equal(rgb, rgba[..., :3]) and torch.allclose(mask, 1 - rgba[..., 3])
    assert torch.equal(SplitImageWithAlpha().execute(rgba[..., :3])[1], torch.zeros(2, 3, 3))
    joined = JoinImageWithAlpha().execute(rgb, mask)[0]
    assert torch.allclose(joined, rgba, atol=1e-6)
    small = JoinImageWithAlpha().execute(rgb, torch.zeros(1, 1, 1))[0]  # resized, batch the shorter
    assert small.shape == (1, 3, 3, 4) and small[..., 3].eq(1).all()


def test_porter_duff_by_hand():
    cs, a_s, cd, ad = (torch.tensor([v]) for v in (0.6, 0.5, 0.2, 0.25))
    expected = {  # colours premultiplied: (colour, alpha) by the formulas' definitions
        "SRC_OVER": (0.6 + 0.5 * 0.2, 0.5 + 0.5 * 0.25), "DST_OVER": (0.2 + 0.75 * 0.6, 0.25 + 0.75 * 0.5),
        "SRC_IN": (0.6 * 0.25, 0.125), "DST_IN": (0.2 * 0.5, 0.125), "SRC_OUT": (0.75 * 0.6, 0.75 * 0.5),
        "DST_OUT": (0.5 * 0.2, 0.5 * 0.25), "SRC_ATOP": (0.25 * 0.6 + 0.5 * 0.2, 0.25),
        "DST_ATOP": (0.5 * 0.2 + 0.75 * 0.6, 0.5), "XOR": (0.75 * 0.6 + 0.5 * 0.2, 0.75 * 0.5 + 0.5 * 0.25),
        "CLEAR": (0.0, 0.0), "SRC": (0.6, 0.5), "DST": (0.2, 0.25), "ADD": (0.8, 0.75), "MULTIPLY": (0.12, 0.125),
        "SCREEN": (0.6 + 0.2 - 0.12, 0.625), "DARKEN": (0.75 * 0.6 + 0.5 * 0.2 + 0.2, 0.625),
        "LIGHTEN": (0.75 * 0.6 + 0.5 * 0.2 + 0.6, 0.625),
        "OVERLAY": (0.5 * 0.25 - 2 * (0.25 - 0.6) * (0.5 - 0.2), 0.625),  # 2·Cd ≥ Ad: the screen branch
    }
    assert set(expected) == set(PORTER_DUFF)
    for mode, (colour, alpha) in expected.items():
        out, out_alpha = PORTER_DUFF[mode](cs, a_s.unsqueeze(-1), cd, ad.unsqueeze(-1))
        assert out.item() == pytest.approx(colour) and out_alpha.item() == pytest.approx(alpha), mode
    dark = PORTER_DUFF["OVERLAY"](torch.tensor([0.6]), torch.tensor([0.5]), torch.tensor([0.05]), torch.tensor([0.25]))
    assert dark[0].item() == pytest.approx(2 * 0.6 * 0.05)  # 2·Cd < Ad: the multiply branch


def test_porter_duff_node_fits_the_source_to_the_destination():
    source, destination = torch.full((1, 2, 2, 3), 0.5), torch.full((2, 4, 4, 3), 0.2)
    image, alpha = PorterDuffImageComposite().execute(source, torch.ones(1, 2, 2), destination,
                                                      torch.full((2, 4, 4), 0.5), "SRC_OVER")
    assert image.shape == (1, 4, 4, 3) and alpha.shape == (1, 4, 4)
    assert torch.allclose(image, torch.full((1, 4, 4, 3), 0.5)) and torch.allclose(alpha, torch.ones(1, 4, 4))
    with pytest.raises(ValueError, match="channels"):
        PorterDuffImageComposite().execute(torch.zeros(1, 2, 2, 4), torch.ones(1, 2, 2), destination,
                                           torch.ones(1, 4, 4), "SRC")


def test_noise_image_through_numpy_is_unchanged_by_quantize_at_256_colours_for_few_colours():
    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, size=(5, 3))
    pixels = palette[rng.integers(0, 5, size=(6, 6))].astype(np.float32) / 255
    image = torch.from_numpy(pixels)[None]
    assert torch.allclose(ImageQuantize().execute(image, 256, "floyd-steinberg")[0], image, atol=1 / 255 + 1e-6)
