"""Context windows: schedules, blending (a hand-computed two-window case), the guidance wrapper."""

from __future__ import annotations

import pytest
import torch

from diffusion.sampling.context_windows import (
    ContextOptions,
    ContextWindowWrapper,
    blend_windows,
    fuse_weights,
    ordered_halving,
    static_windows,
    uniform_windows,
)
from diffusion.sampling.guidance import CFGGuider, GuidanceHooks
from diffusion.sampling.model_sampling import discrete_model_sampling


def test_two_windows_blend_as_computed_by_hand() -> None:
    # frames 0..5 hold the values 0..5; windows [0,1,2,3] and [2,3,4,5]; pyramid weights 1,2,2,1.
    x = torch.arange(6.0).reshape(6, 1, 1, 1)
    windows = static_windows(6, 4, 2)
    assert windows == [[0, 1, 2, 3], [2, 3, 4, 5]]

    def inner(xw: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:  # 2x plus the window's first value
        return 2 * xw + xw[0]

    out = blend_windows(x, torch.tensor(1.0), inner, windows, "pyramid").flatten()
    # window A gives 2f, window B 2f + 2. Frame 2: (2*4 + 1*6) / 3; frame 3: (1*6 + 2*8) / 3.
    expected = torch.tensor([0.0, 2.0, 14 / 3, 22 / 3, 10.0, 12.0])
    assert torch.allclose(out, expected, atol=1e-6)
    flat = blend_windows(x, torch.tensor(1.0), inner, windows, "flat").flatten()
    assert torch.allclose(flat, torch.tensor([0.0, 2.0, 5.0, 7.0, 10.0, 12.0]), atol=1e-6)


def test_fuse_weights() -> None:
    assert fuse_weights(4, "pyramid").tolist() == [1, 2, 2, 1]
    assert fuse_weights(5, "pyramid").tolist() == [1, 2, 3, 2, 1]
    assert fuse_weights(3, "flat").tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="gauss-sigma"):
        fuse_weights(3, "gauss-sigma")


def test_ordered_halving() -> None:
    assert [ordered_halving(s) for s in range(5)] == [0.0, 0.5, 0.25, 0.75, 0.125]


def test_uniform_windows_shift_per_step_and_cover_every_frame() -> None:
    assert uniform_windows(20, 16, 4, step=0) == [list(range(16)), list(range(4, 20))]
    # step 1 shifts by 10 frames: [10..25] wraps and moves back to [4..19], [22..37] % 20 is [2..17]; frames 0
    # and 1 are then left out and get a window of their own
    assert uniform_windows(20, 16, 4, step=1) == [list(range(4, 20)), list(range(2, 18)), list(range(16))]
    for frames in (17, 24, 33, 64):
        for stride in (1, 2, 3):
            for step in range(6):
                windows = uniform_windows(frames, 16, 4, stride, step)
                assert {f for w in windows for f in w} == set(range(frames))
                assert all(len(w) == 16 and min(w) >= 0 and max(w) < frames for w in windows)
                assert len({tuple(w) for w in windows}) == len(windows)
    spaced = uniform_windows(64, 16, 4, stride=2, step=0)
    assert any(w[1] - w[0] == 2 for w in spaced)  # the second level takes every 2nd frame
    assert uniform_windows(8, 16, 4) == [list(range(8))]


def test_bad_options_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"context_overlap 16 .* context_length 16"):
        ContextOptions(length=16, overlap=16)
    with pytest.raises(ValueError, match="fuse_method 'random' is not supported"):
        ContextOptions(fuse="random")


def test_wrapper_runs_the_guider_per_window() -> None:
    ms = discrete_model_sampling("eps")
    seen = []

    def denoiser(x, sigma, context=None, **_):
        seen.append(x.shape[0])
        return x * 0.5 + context.mean() + torch.arange(x.shape[0], dtype=x.dtype).reshape(-1, 1, 1, 1)

    pos = [(torch.ones(1, 3, 4), {})]
    neg = [(torch.zeros(1, 3, 4), {})]
    options = ContextOptions(length=4, overlap=2, schedule="static")
    guider = CFGGuider(denoiser, ms, pos, neg, 3.0, hooks=GuidanceHooks(wrap=[ContextWindowWrapper(options)]))
    plain = CFGGuider(denoiser, ms, pos, neg, 3.0)
    x = torch.randn(6, 2, 3, 3)
    sigma = torch.tensor(2.0)
    out = guider(x, sigma)
    assert seen and max(seen) <= 2 * 4  # positive and negative rows of one window at a time
    expected = blend_windows(x, sigma, plain, [[0, 1, 2, 3], [2, 3, 4, 5]], "pyramid")
    assert torch.allclose(out, expected, atol=1e-6)
    assert not torch.allclose(out, plain(x, sigma))  # the frame index term differs per window


def test_wrapper_counts_steps_and_restarts_with_a_new_run() -> None:
    wrapper = ContextWindowWrapper(ContextOptions(length=4, overlap=1, start_sigma=5.0))
    calls = []

    def inner(x, sigma):
        calls.append(x.shape[0])
        return x

    x = torch.zeros(10, 1, 1, 1)
    wrapper(x, torch.tensor(9.0), inner)  # above start_sigma: the whole clip at once
    assert calls == [10]
    steps = []
    for sigma in (4.0, 4.0, 3.0, 9.0, 2.0):
        wrapper(x, torch.tensor(sigma), inner)
        steps.append(wrapper._step)
    assert steps == [1, 1, 2, 0, 1]


def test_per_frame_conditioning_is_cut_to_each_window() -> None:
    ms = discrete_model_sampling("eps")

    def denoiser(x, sigma, context=None, **_):
        return x * 0.5 + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)

    gen = torch.Generator().manual_seed(0)
    per_frame = torch.randn(6, 3, 4, generator=gen)  # prompt travel: one context per frame
    mask = torch.rand(6, 3, 3, generator=gen)
    pos = [(per_frame, {"mask": mask})]
    neg = [(torch.zeros(1, 3, 4), {})]
    options = ContextOptions(length=4, overlap=2, schedule="static")
    guider = CFGGuider(denoiser, ms, pos, neg, 2.0, hooks=GuidanceHooks(wrap=[ContextWindowWrapper(options)]))
    x = torch.randn(6, 2, 3, 3, generator=gen)
    out = guider(x, torch.tensor(2.0))
    parts = []
    for window in ([0, 1, 2, 3], [2, 3, 4, 5]):
        sliced = CFGGuider(denoiser, ms, [(per_frame[window], {"mask": mask[window]})], neg, 2.0)
        parts.append(sliced(x[window], torch.tensor(2.0)))
    weights = torch.tensor([1.0, 2.0, 2.0, 1.0]).reshape(-1, 1, 1, 1)
    expected = torch.zeros_like(x)
    total = torch.zeros(6, 1, 1, 1)
    for window, part in zip(([0, 1, 2, 3], [2, 3, 4, 5]), parts, strict=True):
        expected[window] += part * weights
        total[window] += weights
    assert torch.allclose(out, expected / total, atol=1e-5)
