"""Model patches' math against hand-computed expectations on small tensors, and the UNet patch mechanism."""

from __future__ import annotations

import math
import random

import pytest
import torch

from diffusion.models.unet import UNetConfig
from diffusion.patches.attention_patches import (
    PERTURBED_MIDDLE,
    attention_mask,
    bipartite_merge,
    gaussian_blur,
    hypertile_patches,
    perturbed_attention_hooks,
    tile_count,
    tome_patches,
)
from diffusion.patches.differential_diffusion import differential_mask, differential_mask_fn
from diffusion.patches.guidance_patches import cfg_zero_star, optimized_scale, perp_neg, rescale_cfg
from diffusion.patches.unet_patches import (
    Site,
    UNetPatches,
    deep_shrink_patches,
    fourier_low_pass_scale,
    freeu_patches,
    resize,
)
from diffusion.sampling.guidance import GuidanceStep
from diffusion.sampling.model_sampling import DistilledModelSampling, discrete_model_sampling
from diffusion.sampling.schedules import DiscreteSchedule
from tests.diffusion.tiny_models import TINY_SD1, tiny_unet, unet_inputs


def _step(cond, uncond, x, sigma, scale):
    cfg = uncond + (cond - uncond) * scale
    return GuidanceStep(cond, uncond, scale, x, torch.tensor([sigma]), cfg, None)


def test_rescale_cfg_in_v_space():
    gen = torch.Generator().manual_seed(0)
    x, cond, uncond = (torch.randn(1, 4, 3, 3, generator=gen) for _ in range(3))
    sigma, w, phi = 2.0, 7.0, 0.7
    # v = alpha eps - sigma_vp x0 with alpha = 1/sqrt(1+s^2), sigma_vp = s/sqrt(1+s^2), eps = (x - x0)/s
    alpha, s_vp = 1 / math.sqrt(1 + sigma**2), sigma / math.sqrt(1 + sigma**2)

    def v_of(d):
        return alpha * (x - d) / sigma - s_vp * d

    v_c, v_u = v_of(cond), v_of(uncond)
    v_cfg = v_u + w * (v_c - v_u)
    v_final = phi * v_cfg * v_c.std() / v_cfg.std() + (1 - phi) * v_cfg
    expected = alpha * (x * alpha) - s_vp * v_final  # x0 = alpha x_vp - sigma_vp v, x_vp = alpha x
    got = rescale_cfg(_step(cond, uncond, x, sigma, w), phi)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # multiplier 0 is plain CFG
    torch.testing.assert_close(rescale_cfg(_step(cond, uncond, x, sigma, w), 0.0),
                               uncond + w * (cond - uncond), rtol=1e-5, atol=1e-5)


def test_cfg_zero_star_scale_and_result():
    cond = torch.tensor([[1.0, 0.0]])
    uncond = torch.tensor([[1.0, 1.0]])
    x = torch.zeros(1, 2)
    # noise predictions x - D: p = (-1, 0), n = (-1, -1): s* = 1 / 2
    assert optimized_scale(x - cond, x - uncond).item() == pytest.approx(0.5, abs=1e-6)
    got = cfg_zero_star(_step(cond, uncond, x, 1.0, 2.0))
    # s* D_u + w (D_c - s* D_u) = (0.5, 0.5) + 2 ((1, 0) - (0.5, 0.5)) = (1.5, -0.5)
    torch.testing.assert_close(got, torch.tensor([[1.5, -0.5]]), rtol=0, atol=1e-6)
    # per sample: a second entry with uncond = cond has s* = 1 and gives plain CFG (= cond)
    both = cfg_zero_star(_step(torch.cat([cond, cond]), torch.cat([uncond, cond]), torch.zeros(2, 2), 1.0, 2.0))
    torch.testing.assert_close(both[1], cond[0], rtol=0, atol=1e-6)


def test_perp_neg_removes_only_the_perpendicular_part():
    nocond = torch.zeros(1, 2)
    cond, uncond = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    # pos = (1, 0), neg = (1, 1): perp = (0, 1); D = 2 ((1, 0) - 1 * (0, 1)) = (2, -2)
    torch.testing.assert_close(perp_neg(cond, uncond, nocond, 2.0, 1.0), torch.tensor([[2.0, -2.0]]))
    # a negative parallel to the positive is ignored entirely
    torch.testing.assert_close(perp_neg(cond, 3 * cond, nocond, 2.0, 5.0), 2 * cond)


def test_fourier_filter_scales_only_the_lowest_frequencies():
    h = w = 8
    constant = torch.full((1, 1, h, w), 3.0)
    checker = (torch.arange(h)[:, None] + torch.arange(w)[None, :]).remainder(2).float()[None, None] * 2 - 1
    out = fourier_low_pass_scale(constant + checker, 0.25)
    # the constant is the zero frequency (scaled); the checkerboard is the Nyquist frequency (kept)
    torch.testing.assert_close(out, 0.75 + checker, rtol=0, atol=1e-5)
    # the window is 2x2 from the centre after fftshift: frequencies 0 and -1 on each axis, not +1; so of
    # cos = (e^{iwx} + e^{-iwx}) / 2 only the e^{-iwx} half is scaled, and the real part is (1 + s) / 2 cos
    wave = torch.cos(2 * math.pi * torch.arange(w) / w).expand(1, 1, h, w)
    torch.testing.assert_close(fourier_low_pass_scale(wave, 0.5), 0.75 * wave, rtol=0, atol=1e-5)
    rows = wave.transpose(-1, -2)  # the same along the other axis
    torch.testing.assert_close(fourier_low_pass_scale(rows, 0.5), 0.75 * rows, rtol=0, atol=1e-5)


def test_freeu_scales_half_the_backbone_and_filters_the_skip():
    patches = freeu_patches(model_channels=8, b1=2.0, b2=3.0, s1=1.0, s2=0.0)
    site = Site(("output", 0), (1, 4, 8, 8), torch.tensor([1.0]))
    h, skip = torch.ones(1, 32, 4, 4), torch.ones(1, 32, 4, 4)  # 4 * 8 channels: b1, s1
    h2, skip2 = patches.run_output(h, skip, site)
    assert torch.equal(h2[:, :16], torch.full((1, 16, 4, 4), 2.0)) and torch.equal(h2[:, 16:], h[:, 16:])
    torch.testing.assert_close(skip2, skip)  # s1 = 1 keeps the skip
    h3, skip3 = patches.run_output(torch.ones(1, 16, 4, 4), torch.ones(1, 16, 4, 4), site)  # 2 * 8: b2, s2
    assert torch.equal(h3[:, :8], torch.full((1, 8, 4, 4), 3.0))
    torch.testing.assert_close(skip3, torch.zeros_like(skip3), rtol=0, atol=1e-6)  # a constant is all DC
    other = torch.ones(1, 24, 4, 4)
    assert patches.run_output(other, other, site)[0] is other  # other widths untouched


def test_freeu_v2_scales_by_the_normalised_mean():
    patches = freeu_patches(model_channels=1, b1=3.0, b2=1.0, s1=1.0, s2=1.0, v2=True)
    h = torch.zeros(1, 4, 1, 2)
    h[0, :, 0, 1] = 1.0  # channel mean 0 at pixel 0 (factor 1), 1 at pixel 1 (factor 3)
    out, _ = patches.run_output(h, torch.zeros(1, 4, 1, 2), Site(("output", 0), (1, 4, 1, 2), torch.zeros(1)))
    assert out[0, :2, 0].tolist() == [[0.0, 3.0], [0.0, 3.0]] and out[0, 2:, 0].tolist() == [[0.0, 1.0]] * 2


def _record_shapes(patches: UNetPatches, shapes: list) -> UNetPatches:
    def record(h, site):
        shapes.append((site.block[1], tuple(h.shape[-2:])))
        return h

    return patches.merged(UNetPatches(input_block_after_skip=(record,)))


def test_deep_shrink_shapes_and_sigma_window():
    config = UNetConfig.sd1(model_channels=16, channel_mult=(1, 2, 2), transformer_depth=(1, 1, 0), num_heads=2,
                            context_dim=32, norm_groups=8, num_res_blocks=1)
    unet = tiny_unet(config)
    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 4, 16, 16, generator=gen), torch.randn(1, 5, 32, generator=gen)
    sigma_of = DiscreteSchedule.from_config().t_to_sigma
    shrink = deep_shrink_patches(2, 2.0, sigma_start=float(sigma_of(torch.tensor(900.0))),
                                 sigma_end=float(sigma_of(torch.tensor(500.0))), sigma_of=sigma_of)
    with torch.no_grad():
        plain = unet(x, torch.tensor([700.0]), context)
        shapes: list = []
        inside = unet(x, torch.tensor([700.0]), context, patches=_record_shapes(shrink, shapes))
        outside = unet(x, torch.tensor([200.0]), context, patches=shrink)
    # input block 2 (the first downsample) gives 8x8, shrunk to 4x4; the next blocks stay small
    assert dict(shapes)[1] == (16, 16) and dict(shapes)[2] == (4, 4) and dict(shapes)[4] == (2, 2)
    assert inside.shape == plain.shape and not torch.allclose(inside, plain, atol=1e-4)
    torch.testing.assert_close(outside, unet(x, torch.tensor([200.0]), context))
    # the sampler's sigma, when the UNet is told it, decides instead of the quantized timestep's
    with torch.no_grad():
        told = unet(x, torch.tensor([700.0]), context, patches=shrink, sigmas=sigma_of(torch.tensor([200.0])))
    torch.testing.assert_close(told, plain)


def test_resize_methods_and_bislerp():
    x = torch.randn(1, 3, 4, 6, generator=torch.Generator().manual_seed(1))
    for method in ("bicubic", "nearest-exact", "bilinear", "area", "bislerp"):
        assert resize(x, (2, 3), method).shape == (1, 3, 2, 3)
    # bislerp keeps channel directions: halfway between orthogonal unit vectors is a unit vector at 45 degrees
    pair = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # [1, C=2, 1, 2]
    mid = resize(pair, (1, 3), "bislerp")[0, :, 0, 1]
    torch.testing.assert_close(mid, torch.tensor([math.sqrt(0.5)] * 2), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="unknown resize method 'cubic'"):
        resize(x, (2, 2), "cubic")


def test_patches_compose_and_an_empty_bundle_is_the_plain_unet():
    unet = tiny_unet(TINY_SD1)
    x, t, context = unet_inputs(TINY_SD1)
    a = freeu_patches(TINY_SD1.model_channels, 1.5, 1.5, 0.5, 0.5)
    calls = []

    def count(h, skip, site):
        calls.append(site.block)
        return h, skip

    both = a.merged(UNetPatches(output_block=(count,)))
    with torch.no_grad():
        plain = unet(x, t, context)
        assert torch.equal(unet(x, t, context, patches=UNetPatches()), plain)
        only_a = unet(x, t, context, patches=a)
        composed = unet(x, t, context, patches=both)
    assert not torch.allclose(only_a, plain) and torch.equal(composed, only_a)
    assert len(calls) == len(unet.output_blocks) and a.output_block != both.output_block


def test_model_sampling_discrete_predictions():
    x, out, sigma = torch.full((1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1), 0.5), torch.tensor([3.0])
    assert discrete_model_sampling("x0").calculate_denoised(sigma, out, x).item() == 0.5
    eps = discrete_model_sampling("eps")
    assert eps.calculate_denoised(sigma, out, x).item() == pytest.approx(2.0 - 3 * 0.5)
    assert eps.calculate_input(sigma, x).item() == pytest.approx(2 / math.sqrt(10))
    img = discrete_model_sampling("img_to_img")
    assert img.calculate_input(sigma, x).item() == 2.0 and img.calculate_denoised(sigma, out, x).item() == 0.5
    v = discrete_model_sampling("v_prediction")
    assert v.calculate_denoised(sigma, out, x).item() == pytest.approx(2 / 10 - 0.5 * 3 / math.sqrt(10))
    with pytest.raises(ValueError, match="unknown sampling 'epsilon'"):
        discrete_model_sampling("epsilon")


def test_lcm_is_distilled_to_50_levels_with_its_boundary_condition():
    lcm = discrete_model_sampling("lcm")
    assert isinstance(lcm, DistilledModelSampling) and len(lcm.schedule) == 50
    full = DiscreteSchedule.from_config()
    torch.testing.assert_close(lcm.schedule.sigmas, full.sigmas[19::20])
    assert lcm.timestep(full.sigmas[999:]).tolist() == [999.0]
    assert lcm.timestep(full.sigmas[[0, 19, 500]]).tolist() == [19.0, 19.0, 499.0]
    sigma = full.sigmas[499:500]
    x, out = torch.full((1, 1, 1, 1), 1.0), torch.full((1, 1, 1, 1), 0.2)
    t = 4990.0  # timestep 499 scaled by 10
    c_skip, c_out = 0.25 / (t**2 + 0.25), t / math.sqrt(t**2 + 0.25)
    expected = c_out * (1.0 - float(sigma) * 0.2) + c_skip * 1.0
    assert lcm.calculate_denoised(sigma, out, x).item() == pytest.approx(expected, rel=1e-6)
    assert lcm.percent_to_sigma(0.0) == math.inf and lcm.percent_to_sigma(1.0) == 0.0
    assert lcm.percent_to_sigma(0.5) == pytest.approx(float(full.t_to_sigma(torch.tensor(499.5))), rel=0.1)


def test_zsnr_rescales_the_schedule_to_pure_noise_at_the_end():
    plain, zsnr = discrete_model_sampling("eps"), discrete_model_sampling("eps", zsnr=True)
    assert plain.sigma_max == pytest.approx(14.6146, rel=1e-4)
    assert zsnr.sigma_max > 4000 and zsnr.sigma_min == pytest.approx(plain.sigma_min, rel=1e-5)
    root = zsnr.schedule.alphas_cumprod.sqrt()
    # sqrt(abar) is shifted and scaled linearly: its differences are the original's times one factor
    orig = plain.schedule.alphas_cumprod.sqrt()
    ratio = (root[1:-1] - root[:-2]) / (orig[1:-1] - orig[:-2])
    torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio), rtol=1e-6, atol=0)


# --- attention patches ---------------------------------------------------------------------------------------


def _attention(dim=8, heads=2, seed=3):
    from diffusion.models.unet_blocks import CrossAttention
    torch.manual_seed(seed)
    return CrossAttention(dim, heads, dim // heads).eval().requires_grad_(False)


def _site(size, block=("input", 1), latent=None, t=500.0, attention=None):
    return Site(block, latent or (1, 4, *size), torch.tensor([t]), size=size, transformer=0, attention=attention)


def test_hypertile_attends_within_tiles_and_is_plain_attention_when_tiles_cover_the_image():
    attention = _attention()
    x = torch.randn(1, 64, 8, generator=torch.Generator().manual_seed(0))
    site = _site((8, 8), attention=attention)
    whole = hypertile_patches(tile_size=64, swap_size=1, max_depth=0, scale_depth=False)  # 8-token tiles
    with torch.no_grad():
        assert torch.equal(whole.attention_runner(attention, site)(x), attention(x))
        tiled = hypertile_patches(tile_size=32, swap_size=1, max_depth=0, scale_depth=False)  # 4x4 tiles
        out = tiled.attention_runner(attention, site)(x)
        grid = x.reshape(1, 8, 8, 8)
        expected = torch.empty_like(grid)
        for i in range(2):
            for j in range(2):
                tile = grid[:, 4 * i:4 * i + 4, 4 * j:4 * j + 4].reshape(1, 16, 8)
                expected[:, 4 * i:4 * i + 4, 4 * j:4 * j + 4] = attention(tile).reshape(1, 4, 4, 8)
    torch.testing.assert_close(out, expected.reshape(1, 64, 8), rtol=1e-5, atol=1e-6)
    # a deeper map (depth 1 of a 16x16 latent) is left alone at max_depth 0
    deep = _site((8, 8), latent=(1, 4, 16, 16), attention=attention)
    with torch.no_grad():
        assert torch.equal(tiled.attention_runner(attention, deep)(x), attention(x))


def test_hypertile_tile_choice_is_seeded_and_within_the_allowed_sides():
    rng = random.Random(0)
    counts = {tile_count(24, 4, 3, rng) for _ in range(50)}
    assert counts == {6, 4, 3}  # tile sides 4, 6, 8 (the 3 smallest divisors of 24 >= 4)
    assert tile_count(24, 100, 3, random.Random(1)) == 1  # a tile larger than the side: one tile


def test_hypertile_on_the_unet_equals_plain_when_tiles_cover_the_latent():
    unet = tiny_unet(TINY_SD1)
    x, t, context = unet_inputs(TINY_SD1)
    with torch.no_grad():
        plain = unet(x, t, context)
        same = unet(x, t, context, patches=hypertile_patches(256, 2, 2, True))
        tiled = unet(x, t, context, patches=hypertile_patches(32, 1, 0, False))  # 8x8 latent in 4x4 tiles
    assert torch.equal(same, plain) and not torch.allclose(tiled, plain, atol=1e-5)


def test_token_merging_by_hand():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [-1.0, 0.0]]])  # 2x2 grid, destination top-left
    merge, unmerge = bipartite_merge(x, (2, 2), r=1)
    merged = merge(x)
    # [1, 0.1] is the source most like the destination [1, 0]: they are averaged; the others are kept
    torch.testing.assert_close(merged, torch.tensor([[[0.0, 1.0], [-1.0, 0.0], [1.0, 0.05]]]))
    torch.testing.assert_close(unmerge(merged), torch.tensor([[[1.0, 0.05], [0.0, 1.0], [1.0, 0.05], [-1.0, 0.0]]]))
    identity, _ = bipartite_merge(x, (2, 2), r=0)
    assert identity(x) is x


def test_tome_merges_queries_only_at_full_resolution():
    attention = _attention()
    x = torch.randn(1, 16, 8, generator=torch.Generator().manual_seed(2))
    site = _site((4, 4), attention=attention)
    with torch.no_grad():
        plain = attention(x)
        assert torch.equal(tome_patches(0.0).attention_runner(attention, site)(x), plain)
        out = tome_patches(0.5).attention_runner(attention, site)(x)
        merge, unmerge = bipartite_merge(x, (4, 4), 8, torch.Generator().manual_seed(500))
        torch.testing.assert_close(out, unmerge(attention(merge(x), x)))
        deeper = _site((2, 2), latent=(1, 4, 4, 4), attention=attention)
        y = x[:, :4]
        assert torch.equal(tome_patches(0.5).attention_runner(attention, deeper)(y), attention(y))
    assert (out - plain).abs().max() > 1e-4
    with pytest.raises(ValueError, match=r"ratio must be within 0\.\.1, got 1\.5"):
        tome_patches(1.5)


def test_identity_attention_in_the_middle_block_only():
    attention = _attention()
    x = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(4))
    middle = PERTURBED_MIDDLE.attention_runner(attention, _site((2, 2), block=("middle", 0), latent=(1, 4, 2, 2)))
    outer = PERTURBED_MIDDLE.attention_runner(attention, _site((2, 2)))
    with torch.no_grad():
        torch.testing.assert_close(middle(x), attention.to_out(attention.to_v(x)))
        assert torch.equal(outer(x), attention(x))


class _FakeDenoiser:
    """D(x) = 0.5 x plainly and 0.2 x under any UNet patches (what a perturbed model would change)."""

    def __call__(self, x, sigma, context=None, unet_patches=None, **_):
        return x * (0.2 if unet_patches else 0.5) + context.mean() * 0


def test_pag_adds_the_difference_to_the_perturbed_prediction():
    from diffusion.sampling.guidance import CFGGuider
    ms = discrete_model_sampling("eps")
    positive, negative = [(torch.ones(1, 2, 4), {})], [(torch.zeros(1, 2, 4), {})]
    guider = CFGGuider(_FakeDenoiser(), ms, positive, negative, 3.0, hooks=perturbed_attention_hooks(2.0))
    x = torch.full((1, 4, 2, 2), 2.0)
    # cond = uncond = 1.0; CFG gives 1.0; perturbed positive 0.4: 1.0 + 2 (1.0 - 0.4) = 2.2
    torch.testing.assert_close(guider(x, torch.tensor([1.0])), torch.full_like(x, 2.2))


def test_sag_mask_and_blur():
    probs = torch.zeros(1, 2, 4, 4)
    probs[..., 1] = 1.0  # every query attends to token 1 only: it receives 4 > 1
    mask = attention_mask(probs, (2, 2), (4, 4))
    assert mask[0, 0].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    flat = torch.full((1, 2, 9, 9), 3.0)
    torch.testing.assert_close(gaussian_blur(flat, 2.0), flat)
    impulse = torch.zeros(1, 1, 17, 17)
    impulse[0, 0, 8, 8] = 1.0  # far enough from the edges that no reflection reaches it
    taps = torch.exp(-0.5 * (torch.arange(-4.0, 5.0) / 2.0) ** 2)
    taps = taps / taps.sum()
    blurred = gaussian_blur(impulse, 2.0)[0, 0]
    torch.testing.assert_close(blurred[4:13, 4:13], taps[:, None] * taps[None, :])
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert gaussian_blur(impulse, 0.0) is impulse


# --- Differential Diffusion ----------------------------------------------------------------------------------


def test_differential_mask_threshold_falls_with_the_timestep():
    ms = discrete_model_sampling("eps")
    sigmas = torch.cat([ms.sigma(torch.tensor([999.0, 500.0])), torch.zeros(1)])
    change = torch.tensor([0.0, 0.4, 0.6, 1.0])
    # first step: threshold 1, only m = 1 changes; at t = 500 the threshold is 500 / 999
    assert differential_mask(ms, sigmas[:1], change, sigmas).tolist() == [0, 0, 0, 1]
    assert differential_mask(ms, sigmas[1:2], change, sigmas).tolist() == [0, 0, 1, 1]
    soft = differential_mask(ms, sigmas[1:2], change, sigmas, strength=0.5)
    torch.testing.assert_close(soft, torch.tensor([0.0, 0.2, 0.8, 1.0]))
    with pytest.raises(ValueError, match="strength must be within"):
        differential_mask_fn(2.0)


def test_differential_diffusion_in_sample_repaints_whole_pixels():
    from diffusion.sampling.ksampler import sample
    ms = discrete_model_sampling("eps")
    sigmas = torch.cat([ms.sigma(torch.tensor([999.0, 500.0])), torch.zeros(1)])
    latent = torch.zeros(1, 1, 1, 4)
    mask = torch.tensor([[[0.0, 0.4, 0.6, 1.0]]])

    def model(x, sigma, **_):
        return torch.full_like(x, 7.0)

    kwargs = {"model_sampling": ms, "seed": 0, "noise_mask": mask}
    noise = torch.zeros_like(latent)
    dd = sample(model, "euler", sigmas, latent, noise, denoise_mask_fn=differential_mask_fn(), **kwargs)
    # the last step (t = 500) repaints m >= 0.5 fully; the plain mask blends the soft values
    torch.testing.assert_close(dd.flatten(), torch.tensor([0.0, 0.0, 7.0, 7.0]))
    plain = sample(model, "euler", sigmas, latent, noise, **kwargs)
    assert not torch.allclose(plain.flatten(), dd.flatten())


def test_perp_neg_guidance_evaluates_three_lists_in_one_batch():
    from diffusion.patches.guidance_patches import PerpNegGuidance
    from diffusion.sampling.guidance import GuidanceHooks
    calls = []

    def denoiser(x, sigma, context=None, **_):
        calls.append(x.shape[0])
        return context[:, 0, :].reshape(-1, 4, 1, 1).expand(x.shape[0], 4, *x.shape[-2:]).clone()

    def cond(*values):
        return [(torch.tensor([[values, values]], dtype=torch.float32), {})]

    ms = discrete_model_sampling("eps")
    x = torch.zeros(1, 4, 2, 2)
    guider = PerpNegGuidance(denoiser, ms, cond(1, 0, 0, 0), cond(1, 1, 0, 0), cond(0, 0, 0, 0), 2.0, 1.0)
    out = guider(x, torch.tensor([1.0]))
    assert calls == [3]  # one batched call
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([2.0, -2.0, 0.0, 0.0]))
    post = GuidanceHooks(post=[lambda step: step.denoised * 10])
    at_one = PerpNegGuidance(denoiser, ms, cond(1, 0, 0, 0), cond(1, 1, 0, 0), cond(0, 0, 0, 0), 1.0, 1.0,
                             hooks=post)
    torch.testing.assert_close(at_one(x, torch.tensor([1.0]))[0, :, 0, 0], torch.tensor([10.0, -10.0, 0.0, 0.0]))
