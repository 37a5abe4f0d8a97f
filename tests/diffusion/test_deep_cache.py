"""DeepCache: interval 1 is the plain UNet bit for bit; larger intervals skip the deep blocks on the steps between
full ones (counted on the middle block), keep one cache per call of a step, and start over on a new run."""

from __future__ import annotations

import pytest
import torch

from diffusion.patches.deep_cache import DeepCache
from diffusion.patches.unet_patches import freeu_patches
from tests.diffusion.tiny_models import TINY_SD1, TINY_SDXL, tiny_unet, unet_inputs

TIMESTEPS = (999.0, 833.0, 666.0, 499.0, 333.0, 166.0)


def _middle_calls(unet: torch.nn.Module) -> list[int]:
    calls = [0]
    unet.middle_block.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _run(fn, unet, config, timesteps=TIMESTEPS, **kwargs) -> list[torch.Tensor]:
    x, _, context, *y = unet_inputs(config)
    outs = []
    with torch.inference_mode():
        for t in timesteps:
            # x changes from step to step, as in sampling: a cache that ignored its input would show
            outs.append(fn(unet, x * (1 + t / 1000), torch.tensor([t]), context, *y, **kwargs))
    return outs


def _plain(unet, *args, **kwargs):
    return unet(*args, **kwargs)


@pytest.mark.parametrize("config", [TINY_SD1, TINY_SDXL], ids=["sd1", "sdxl"])
@pytest.mark.parametrize("depth", [0, 1, 3, 12])
def test_interval_one_is_the_plain_unet_bit_for_bit(config, depth):
    unet = tiny_unet(config)
    plain = _run(_plain, unet, config)
    cache = DeepCache(1, depth)
    cached = _run(cache, unet, config)
    assert all(torch.equal(a, b) for a, b in zip(plain, cached, strict=True))
    assert cache.stats.full == len(TIMESTEPS) and cache.stats.cached == 0


def test_interval_one_with_patches_is_the_patched_unet_bit_for_bit():
    unet = tiny_unet(TINY_SD1)
    patches = freeu_patches(TINY_SD1.model_channels, 1.3, 1.4, 0.9, 0.2)
    plain = _run(_plain, unet, TINY_SD1, patches=patches)
    cached = _run(DeepCache(1, 1), unet, TINY_SD1, patches=patches)
    assert all(torch.equal(a, b) for a, b in zip(plain, cached, strict=True))
    assert not torch.equal(plain[0], _run(_plain, unet, TINY_SD1)[0])  # the patches do change the result


@pytest.mark.parametrize("config", [TINY_SD1, TINY_SDXL], ids=["sd1", "sdxl"])
def test_interval_three_skips_the_deep_blocks_between_full_steps(config):
    unet = tiny_unet(config)
    plain = _run(_plain, unet, config)
    calls = _middle_calls(unet)
    cache = DeepCache(3, 1)
    cached = _run(cache, unet, config)
    assert calls[0] == 2  # steps 0 and 3 run whole; 1, 2, 4, 5 reuse
    assert (cache.stats.full, cache.stats.cached) == (2, 4)
    for step in (0, 3):
        assert torch.equal(plain[step], cached[step])
    for step in (1, 2, 4, 5):
        assert not torch.equal(plain[step], cached[step])
        assert torch.isfinite(cached[step]).all()
        # an approximation of the plain step, not noise: far closer to it than to the step's input scale
        assert (plain[step] - cached[step]).abs().mean() < 0.5 * plain[step].abs().mean()


def test_a_cached_step_reuses_the_last_full_steps_deep_feature():
    """Step 1 with interval 2 equals the UNet run on step 1's input, with step 0's deep feature spliced in."""
    from diffusion.patches.deep_cache import _forward

    unet = tiny_unet(TINY_SD1)
    x, _, context = unet_inputs(TINY_SD1)
    with torch.inference_mode():
        _, deep = _forward(unet, x * 2, torch.tensor([999.0]), context, None, 1, None, None, None)
        expected, _ = _forward(unet, x * 3, torch.tensor([500.0]), context, None, 1, deep, None, None)
        cache = DeepCache(2, 1)
        cache(unet, x * 2, torch.tensor([999.0]), context)
        got = cache(unet, x * 3, torch.tensor([500.0]), context)
    assert torch.equal(expected, got)


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_a_cached_step_equals_the_full_unet_with_the_old_deep_feature_spliced_in(depth):
    """Reference by hooks on the plain UNet: run step 1 whole, but replace the deep half of what output block
    n - 1 - depth gets (the backbone, before the skip) by what it got on step 0."""
    unet = tiny_unet(TINY_SD1)
    x, _, context = unet_inputs(TINY_SD1)
    split = len(unet.output_blocks) - 1 - depth
    deep_width = unet.output_blocks[split - 1] if split > 0 else unet.middle_block
    widths, seen = [], []
    deep_width.register_forward_hook(lambda _m, _a, out: widths.append(out.shape[1]))
    splice: list[torch.Tensor] = []

    def pre(_module, args):
        seen.append(args[0])
        if splice:
            k = widths[-1]
            return (torch.cat([splice[0][:, :k], args[0][:, k:]], dim=1), *args[1:])
        return None

    unet.output_blocks[split].register_forward_pre_hook(pre)
    steps = [(x * 2, torch.tensor([999.0])), (x * 3, torch.tensor([500.0]))]
    with torch.inference_mode():
        unet(*steps[0], context)
        splice.append(seen[-1])
        expected = unet(*steps[1], context)
        splice.clear()
        cache = DeepCache(2, depth)
        cache(unet, *steps[0], context)
        got = cache(unet, *steps[1], context)
    assert cache.stats.cached == 1
    assert torch.equal(expected, got)


def test_two_calls_per_step_keep_their_own_caches():
    """Guidance evaluating cond and uncond apart calls twice at one timestep: each call reuses its own feature."""
    unet = tiny_unet(TINY_SD1)
    x, _, context = unet_inputs(TINY_SD1)
    other = torch.flip(context, dims=[1])
    both, alone = DeepCache(2, 1), DeepCache(2, 1)
    with torch.inference_mode():
        for t in TIMESTEPS[:4]:
            step = torch.tensor([t])
            both(unet, x, step, context)
            second = both(unet, x, step, other)
            assert torch.equal(second, alone(unet, x, step, other))
    assert both.stats.cached == 4 and alone.stats.cached == 2


def test_a_new_run_starts_with_a_full_step_and_the_window_bounds_caching():
    unet = tiny_unet(TINY_SD1)
    cache = DeepCache(2, 1)
    _run(cache, unet, TINY_SD1)
    _run(cache, unet, TINY_SD1, timesteps=(900.0, 700.0))  # timestep went up: a new run, full then cached
    assert (cache.stats.full, cache.stats.cached) == (3 + 1, 3 + 1)
    late = DeepCache(2, 1, start_step=0, end_step=500)  # applies for t >= 500 only
    calls = _middle_calls(unet)
    _run(late, unet, TINY_SD1)
    assert late.stats.cached == 1 and calls[0] == 5  # 999 full, 833 cached, 666 full; below 500 always full


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="cache_interval"):
        DeepCache(0, 1)
    with pytest.raises(ValueError, match="cache_depth"):
        DeepCache(2, -1)
    with pytest.raises(TypeError, match="Stable Diffusion UNet"):
        DeepCache(2, 1)(torch.nn.Linear(2, 2), torch.zeros(1, 4, 8, 8), torch.tensor([1.0]), torch.zeros(1, 5, 32))
