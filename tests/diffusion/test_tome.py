"""Token merging (diffusion/patches/tome.py): one destination per 2x2 cell, merge/unmerge shapes and their exact
round trip where what merges is equal, ratio 0 = the unpatched UNet bit for bit, reproducible per timestep, and a
merged UNet whose output stays finite and close to the plain one."""

from __future__ import annotations

import pytest
import torch

from diffusion.patches.tome import bipartite_merge, destinations, tome_patches
from tests.diffusion.tiny_models import TINY_SD1, tiny_unet, unet_inputs


@pytest.mark.parametrize(("size", "cells"), [((4, 4), 4), ((5, 7), 6), ((1, 9), 0), ((2, 2), 1)])
def test_one_destination_in_every_full_2x2_cell(size, cells):
    for generator in (None, torch.Generator().manual_seed(3)):
        grid = destinations(size, generator).reshape(size)
        assert int(grid.sum()) == cells
        h, w = size
        for i in range(0, h - 1, 2):
            for j in range(0, w - 1, 2):
                assert int(grid[i:i + 2, j:j + 2].sum()) == 1
        assert not grid[2 * (h // 2):].any() and not grid[:, 2 * (w // 2):].any()  # odd edges: sources only


def test_random_destinations_follow_the_generator():
    a = destinations((16, 16), torch.Generator().manual_seed(1))
    assert torch.equal(a, destinations((16, 16), torch.Generator().manual_seed(1)))
    assert not torch.equal(a, destinations((16, 16), torch.Generator().manual_seed(2)))
    assert not torch.equal(a, destinations((16, 16)))


@pytest.mark.parametrize(("size", "r", "merged"), [((4, 4), 5, 5), ((5, 7), 100, 29), ((4, 4), 0, 0)])
def test_merge_and_unmerge_shapes(size, r, merged):
    n = size[0] * size[1]
    x = torch.randn(3, n, 6, generator=torch.Generator().manual_seed(0))
    merge, unmerge = bipartite_merge(x, size, r, torch.Generator().manual_seed(0))
    y = merge(x)
    assert y.shape == (3, n - merged, 6)
    assert unmerge(y[..., :2]).shape == (3, n, 2)  # unmerge takes any width (the attention's output)


def test_round_trip_is_exact_when_nothing_merges_or_what_merges_is_equal():
    x = torch.randn(2, 64, 5, generator=torch.Generator().manual_seed(1))
    merge, unmerge = bipartite_merge(x, (8, 8), 0)
    assert merge(x) is x and unmerge(x) is x
    # each 2x2 cell holds one value four times: the 48 sources all match their own cell's destination exactly
    cells = torch.randn(2, 4, 4, 5, generator=torch.Generator().manual_seed(2))
    blocky = cells.repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(2, 64, 5)
    merge, unmerge = bipartite_merge(blocky, (8, 8), 48, torch.Generator().manual_seed(5))
    merged = merge(blocky)
    assert merged.shape == (2, 16, 5)
    assert torch.equal(unmerge(merged), blocky)


def test_merging_averages_the_best_matches_into_their_destinations():
    x = torch.randn(1, 16, 4, generator=torch.Generator().manual_seed(4))
    merge, unmerge = bipartite_merge(x, (4, 4), 3, None)  # top-left destinations: tokens 0, 2, 8, 10
    out = unmerge(merge(x))
    changed = (out != x).any(-1)[0]
    dst = destinations((4, 4))
    # merged sources took a destination's row, and only destinations that received a source changed
    assert int(changed[~dst].sum()) == 3
    for i in changed.nonzero().squeeze(1).tolist():
        assert any(torch.equal(out[0, i], out[0, j]) for j in dst.nonzero().squeeze(1).tolist())


def run(unet, patches=None, t=None):
    x, t0, context = unet_inputs(TINY_SD1)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    context = context.expand(2, -1, -1)
    t = t0.expand(2) if t is None else t
    with torch.no_grad():
        return unet(x, t, context) if patches is None else unet(x, t, context, patches=patches)


def test_ratio_zero_is_the_unpatched_unet_bit_for_bit():
    unet = tiny_unet(TINY_SD1)
    assert torch.equal(run(unet, tome_patches(0.0)), run(unet))


def test_merged_unet_is_finite_close_and_reproducible():
    unet = tiny_unet(TINY_SD1)
    plain = run(unet)
    merged = run(unet, tome_patches(0.5))
    assert torch.isfinite(merged).all()
    rel = float((merged - plain).norm() / plain.norm())
    assert 1e-4 < rel < 0.5, rel  # it changed something, and not everything
    assert torch.equal(run(unet, tome_patches(0.5)), merged)  # same timestep, same merges
    other_step = run(unet, tome_patches(0.5), t=torch.tensor([654.0, 654.0]))
    assert not torch.equal(other_step, run(unet, t=torch.tensor([654.0, 654.0])))


def test_ratio_outside_0_1_is_refused():
    with pytest.raises(ValueError, match=r"TomePatchModel ratio must be within 0\.\.1, got -0\.1"):
        tome_patches(-0.1)
