"""The procedural data set: deterministic, captions agree with the pixels, held-out combinations stay out."""

from __future__ import annotations

import numpy as np
import pytest

from train import shapes


def test_same_seed_same_images_other_seed_differs():
    a, sa = shapes.batch(3, "train", [0, 5, 9])
    b, sb = shapes.batch(3, "train", [0, 5, 9])
    c, _ = shapes.batch(4, "train", [0, 5, 9])
    assert np.array_equal(a, b) and sa == sb and not np.array_equal(a, c)
    assert a.shape == (3, 64, 64, 3) and a.dtype == np.uint8


@pytest.mark.parametrize("split", ["train", "test"])
def test_caption_matches_pixels(split):
    images, samples = shapes.batch(1, split, range(150))
    for image, s in zip(images, samples, strict=True):
        words = s.caption.split()
        assert [s.size, s.colour, s.shape] == words[1:4] and f"on a {s.background} background" in s.caption
        assert tuple(image[round(s.cy), round(s.cx)]) == s.rgb  # the shape's centre has its colour
        for y, x in ((0, 0), (0, 63), (63, 0), (63, 63)):
            assert tuple(image[y, x]) == shapes.BACKGROUNDS[s.background]
        col, row = shapes.POSITIONS[s.position]
        for centre, index in ((s.cx, col), (s.cy, row)):
            assert (centre < 30, 26 < centre < 38, centre > 34)[index]
        lo, hi = shapes.SIZES[s.size]
        assert lo <= s.radius <= hi
        if s.shape == "circle":  # anti-aliased: some pixels lie strictly between the two colours
            assert len({tuple(p) for p in image.reshape(-1, 3)}) > 2


def test_shape_area_differs_by_shape():
    """Same place and size, different shape -> different coverage (circle > square > triangle, star)."""
    areas = {}
    for shape in shapes.SHAPES:
        s = shapes.Sample(shape, "red", "white", "large", "center", 32.0, 32.0, 18.0)
        areas[shape] = (np.abs(shapes.render(s).astype(int) - 240).sum(-1) > 60).sum()
    assert areas["circle"] > areas["square"] > max(areas["triangle"], areas["star"])
    assert areas["triangle"] != areas["star"]


def test_held_out_combinations_never_in_training():
    held = set(shapes.held_out_combinations())
    assert len(held) == 12
    train = {(s.shape, s.colour, s.background) for s in (shapes.draw_sample(0, "train", i) for i in range(2000))}
    test = {(s.shape, s.colour, s.background) for s in (shapes.draw_sample(0, "test", i) for i in range(300))}
    assert not train & held and test == held
    assert {c for _, c, _ in train} == set(shapes.COLOURS) and {s for s, _, _ in train} == set(shapes.SHAPES)
    assert all(shapes.COLOURS[c] != shapes.BACKGROUNDS[b] for _, c, b in train | test)


def test_new_colour_only_when_asked_and_partial_captions():
    assert all(shapes.draw_sample(0, "train", i).colour != shapes.NEW_COLOUR for i in range(500))
    s = shapes.draw_sample(0, "train", 1, colour=shapes.NEW_COLOUR)
    assert s.colour == "orange" and tuple(shapes.render(s)[round(s.cy), round(s.cx)]) == (250, 135, 20)
    assert s.partial_caption({"colour"}) == "a orange shape"
    assert s.partial_caption({"shape", "background"}) == f"a {s.shape} on a {s.background} background"
    with pytest.raises(ValueError, match="split"):
        shapes.draw_sample(0, "valid", 0)
