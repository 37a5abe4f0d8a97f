"""The adherence checker: colour by pixel statistics, shape by a small classifier, on generator ground truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from train import shapes
from train.checker import Checker, classify_colour, degrade, ground_truth_accuracy, normalised_mask


@pytest.fixture(scope="module")
def checker():
    return Checker.train(seed=0, images=1536, epochs=4, width=8)


@pytest.mark.parametrize("colour", sorted(shapes.all_colours()))
def test_colour_of_every_palette_colour_on_every_background(colour):
    for i, background in enumerate(shapes.BACKGROUNDS):
        if shapes.all_colours()[colour] == shapes.BACKGROUNDS[background]:
            continue
        sample = shapes.Sample("star", colour, background, "small", "left", 12.0, 30.0 + i, 8.0)
        image = shapes.render(sample)
        assert classify_colour(image) == colour
        assert classify_colour(torch.from_numpy(image).float() / 255.0) == colour  # IMAGE-socket floats too


def test_no_shape_no_colour():
    assert classify_colour(np.full((64, 64, 3), 128, np.uint8)) is None
    assert torch.equal(normalised_mask(np.zeros((64, 64, 3), np.uint8)), torch.zeros(1, 24, 24))


def test_mask_ignores_colour_position_and_size():
    a = shapes.Sample("triangle", "red", "white", "large", "center", 32.0, 32.0, 18.0)
    b = shapes.Sample("triangle", "cyan", "black", "small", "top left", 14.0, 12.0, 9.0)
    ma, mb = normalised_mask(shapes.render(a)), normalised_mask(shapes.render(b))
    assert ma.shape == (1, 24, 24) and (ma - mb).abs().mean() < 0.08


def test_checker_is_accurate_on_ground_truth_and_deterministic(checker):
    scores = ground_truth_accuracy(checker, seed=3, count=200)
    assert scores["colour"] == 1.0 and scores["shape"] >= 0.9
    again = Checker.train(seed=0, images=1536, epochs=4, width=8)
    assert all(torch.equal(p, q) for p, q in zip(checker.net.parameters(), again.net.parameters(), strict=True))


def test_checker_survives_blur_and_noise(checker):
    images, samples = shapes.batch(9, "test", range(200))
    scores = checker.judge(degrade(images, np.random.default_rng(1)), samples)
    assert scores["colour"] >= 0.95 and scores["shape"] >= 0.85


def test_checker_rejects_wrong_captions(checker):
    images, samples = shapes.batch(4, "test", range(100))
    wrong = [shapes.Sample(shapes.SHAPES[(shapes.SHAPES.index(s.shape) + 1) % 4],
                           "red" if s.colour != "red" else "blue", s.background, s.size, s.position, s.cx, s.cy,
                           s.radius) for s in samples]
    scores = checker.judge(images, wrong)
    assert scores["colour"] == 0.0 and scores["shape"] <= 0.1
