"""Classifier-free guidance: batching, cfg 1 shortcut, areas, masks, strength, timestep ranges, extra kwargs."""

from __future__ import annotations

import pytest
import torch

from diffusion.sampling.guidance import CFGGuider
from diffusion.sampling.model_sampling import ModelSampling
from diffusion.sampling.schedules import DiscreteSchedule


class FakeDenoiser:
    """Returns, for each batch row, the mean of its context (so each entry's output is identifiable)."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, context, **kwargs):
        self.calls.append({"x": x.shape, "context": context.shape, "sigma": sigma.clone(), **kwargs})
        value = context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        if "y" in kwargs:
            value = value + kwargs["y"].sum(dim=1).reshape(-1, 1, 1, 1)
        return torch.zeros_like(x) + value


@pytest.fixture(scope="module")
def ms():
    return ModelSampling(DiscreteSchedule.from_config())


def ctx(value, tokens=77, dim=8):
    return torch.full((1, tokens, dim), float(value))


def test_cfg_formula_and_single_batched_call(ms):
    net = FakeDenoiser()
    guider = CFGGuider(net, ms, [(ctx(2.0, 154), {})], [(ctx(0.5, 77), {})], cfg=7.0)
    x = torch.randn(2, 4, 8, 8)
    out = guider(x, torch.tensor([3.0, 3.0]))
    assert len(net.calls) == 1
    assert net.calls[0]["x"] == (4, 4, 8, 8) and net.calls[0]["context"] == (4, 154, 8)  # 77 tokens repeated to 154
    torch.testing.assert_close(out, torch.full_like(x, 0.5 + (2.0 - 0.5) * 7.0))


def test_cfg_one_skips_uncond(ms):
    net = FakeDenoiser()
    out = CFGGuider(net, ms, [(ctx(2.0), {})], [(ctx(0.5), {})], cfg=1.0)(torch.zeros(1, 4, 8, 8), torch.tensor([1.0]))
    assert len(net.calls) == 1 and net.calls[0]["x"][0] == 1
    torch.testing.assert_close(out, torch.full_like(out, 2.0))


def test_area_with_strength_blends_and_feathers(ms):
    net = FakeDenoiser()
    positive = [(ctx(1.0), {}), (ctx(5.0), {"area": (16, 16, 0, 16), "strength": 2.0})]
    out = CFGGuider(net, ms, positive, [], cfg=1.0)(torch.zeros(1, 4, 32, 32), torch.tensor([1.0]))
    assert len(net.calls) == 2  # different spatial sizes cannot share a batch
    assert out[0, 0, 20, 0].item() == pytest.approx(1.0)  # outside the area: only the global entry
    # Deep inside the area: (1 * 1 + 5 * 2) / (1 + 2); the area's inner edges (bottom, left) ramp over 8 px.
    assert out[0, 0, 0, 31].item() == pytest.approx(11 / 3)
    w = 2.0 * 1 / 8  # first row/column inside an inner edge
    assert out[0, 0, 0, 16].item() == pytest.approx((1 + 5 * w) / (1 + w))
    assert out[0, 0, 15, 31].item() == pytest.approx((1 + 5 * w) / (1 + w))


def test_uncovered_pixels_are_zero_and_area_only_cond(ms):
    net = FakeDenoiser()
    out = CFGGuider(net, ms, [(ctx(3.0), {"area": (4, 4, 0, 0)})], [], cfg=1.0)(torch.zeros(1, 1, 8, 8),
                                                                               torch.tensor([1.0]))
    assert net.calls[0]["x"] == (1, 1, 4, 4)
    assert out[0, 0, 0, 0].item() == pytest.approx(3.0) and out[0, 0, 7, 7].item() == 0.0


def test_mask_weights_and_bounds(ms):
    net = FakeDenoiser()
    mask = torch.zeros(16, 16)
    mask[:8, :] = 1.0
    mask[8:, :] = 0.25
    positive = [(ctx(0.0), {}), (ctx(4.0), {"mask": mask, "mask_strength": 1.0, "strength": 1.0})]
    out = CFGGuider(net, ms, positive, [], cfg=1.0)(torch.zeros(1, 2, 16, 16), torch.tensor([1.0]))
    assert out[0, 0, 0, 0].item() == pytest.approx(4.0 / 2)
    assert out[0, 0, 15, 0].item() == pytest.approx(4.0 * 0.25 / 1.25)
    # Mask at another resolution, cropped to its bounding box.
    net = FakeDenoiser()
    big = torch.zeros(1, 64, 64)
    big[:, 32:, 32:] = 1.0
    positive = [(ctx(2.0), {"mask": big, "set_area_to_bounds": True})]
    out = CFGGuider(net, ms, positive, [], cfg=1.0)(torch.zeros(1, 2, 16, 16), torch.tensor([1.0]))
    assert net.calls[0]["x"][-2:][0] <= 9 and out[0, 0, 15, 15].item() == pytest.approx(2.0)
    assert out[0, 0, 0, 0].item() == 0.0


def test_timestep_range(ms):
    net = FakeDenoiser()
    positive = [(ctx(1.0), {"start_percent": 0.0, "end_percent": 0.5}), (ctx(9.0), {"start_percent": 0.5})]
    guider = CFGGuider(net, ms, positive, [], cfg=1.0)
    x = torch.zeros(1, 1, 4, 4)
    high, low = ms.percent_to_sigma(0.2), ms.percent_to_sigma(0.8)
    assert guider(x, torch.tensor([high]))[0, 0, 0, 0].item() == pytest.approx(1.0)
    assert guider(x, torch.tensor([low]))[0, 0, 0, 0].item() == pytest.approx(9.0)


def test_extra_cond_kwargs(ms):
    net = FakeDenoiser()

    def extra_cond(options, x):
        return {"y": options["pooled_output"]}

    positive = [(ctx(1.0), {"pooled_output": torch.tensor([[2.0, 1.0]])})]
    negative = [(ctx(0.0), {"pooled_output": torch.tensor([[0.5, 0.0]])})]
    out = CFGGuider(net, ms, positive, negative, cfg=2.0, extra_cond=extra_cond)(torch.zeros(2, 1, 4, 4),
                                                                                  torch.tensor([1.0, 1.0]))
    assert len(net.calls) == 1 and net.calls[0]["y"].shape == (4, 2)
    torch.testing.assert_close(out, torch.full_like(out, 0.5 + (4.0 - 0.5) * 2.0))


def test_bad_conditioning_is_named(ms):
    with pytest.raises(ValueError, match="positive conditioning is empty"):
        CFGGuider(FakeDenoiser(), ms, [], [], cfg=1.0)
    with pytest.raises(ValueError, match=r"\[1, tokens, dim\]"):
        CFGGuider(FakeDenoiser(), ms, [(torch.ones(77, 8), {})], [], cfg=1.0)(torch.zeros(1, 1, 4, 4), torch.ones(1))


def test_percentage_area_scales_to_the_latent(ms):
    net = FakeDenoiser()
    positive = [(ctx(3.0), {"area": ("percentage", 0.5, 0.25, 0.5, 0.75)})]
    out = CFGGuider(net, ms, positive, [], cfg=1.0)(torch.zeros(1, 1, 8, 16), torch.tensor([1.0]))
    assert net.calls[0]["x"] == (1, 1, 4, 4)  # h 0.5·8, w 0.25·16, at y 4, x 12
    assert out[0, 0, 7, 15].item() == pytest.approx(3.0) and out[0, 0, 0, 0].item() == 0.0


def test_guidance_hooks_replace_the_combination_and_post_process_it():
    from diffusion.sampling.guidance import GuidanceHooks

    seen = []

    def denoiser(x, sigma, context=None, **_):
        return x * 0 + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)  # the positive gives 1, the negative 0

    def combine(step):
        seen.append(("combine", float(step.cond.mean()), float(step.uncond.mean()), step.cond_scale))
        return step.cond * 2

    def post(step):
        seen.append(("post", float(step.denoised.mean())))
        return step.denoised + 1

    sampling = ModelSampling(DiscreteSchedule.from_config())
    positive, negative = [(torch.ones(1, 2, 3), {})], [(torch.zeros(1, 2, 3), {})]
    x, sigma = torch.zeros(1, 4, 2, 2), torch.tensor([1.0])
    plain = CFGGuider(denoiser, sampling, positive, negative, 3.0)
    assert torch.allclose(plain(x, sigma), torch.full_like(x, 3.0))  # 0 + (1 - 0) * 3
    hooked = CFGGuider(denoiser, sampling, positive, negative, 3.0, hooks=GuidanceHooks(combine, [post]))
    assert torch.allclose(hooked(x, sigma), torch.full_like(x, 3.0))  # 1 * 2, then + 1
    assert seen == [("combine", 1.0, 0.0, 3.0), ("post", 2.0)]
    # a hook for one call only (CFG++ samplers capture the unconditional prediction this way)
    captured = []
    out = plain(x, sigma, model_options={"guidance_hooks": GuidanceHooks(post=[lambda s: captured.append(s.uncond)
                                                                                or s.denoised])})
    assert torch.allclose(out, torch.full_like(x, 3.0)) and torch.allclose(captured[0], torch.zeros_like(x))
    # at cfg 1 the negative is not evaluated: uncond is cond
    single = CFGGuider(denoiser, sampling, positive, negative, 1.0, hooks=GuidanceHooks(post=[post]))
    assert torch.allclose(single(x, sigma), torch.full_like(x, 2.0))
