"""StyleModelApply's attn_bias (diffusion/patches/context_bias.py): the style tokens' logits biased by log(strength)
in every cross-attention. A vanishing strength equals dropping the tokens, strength 0 (-inf) is clean, the bias is
exact through the guider's batching of contexts of different lengths, and attention() adds it as the formula says,
chunked or not."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion.models.attention import attention
from diffusion.models.unet import UNetModel
from diffusion.patches.context_bias import BIAS_KEY, append_bias, batch_bias, entry_bias
from diffusion.sampling.guidance import CFGGuider
from diffusion.sampling.model_sampling import discrete_model_sampling
from tests.diffusion.random_weights import randomize_
from tests.diffusion.tiny_models import TINY_SD1

TEXT, STYLE = 5, 3


@pytest.fixture(scope="module")
def setup():
    unet = randomize_(UNetModel(TINY_SD1), 0).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(3)
    text = torch.randn(1, TEXT, TINY_SD1.context_dim, generator=gen)
    style = torch.randn(1, STYLE, TINY_SD1.context_dim, generator=gen) * 3
    negative = torch.randn(1, 6, TINY_SD1.context_dim, generator=gen)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    return unet, text, style, negative, x


def _guided(unet, positive, negative, x, cfg=4.0):
    ms = discrete_model_sampling("eps")

    def denoiser(x_in, sigma, context, unet_patches=None, **_):
        return unet(x_in, ms.timestep(sigma), context, patches=unet_patches)

    guider = CFGGuider(denoiser, ms, positive, negative, cfg)
    with torch.no_grad():
        return guider(x, torch.tensor([2.0]))


def _styled(text, style, strength):
    opts = {BIAS_KEY: append_bias({}, TEXT, STYLE, math.log(strength) if strength else -math.inf)}
    return [(torch.cat([text, style], dim=1), opts)]


def test_a_vanishing_strength_equals_dropping_the_style_tokens(setup):
    unet, text, style, negative, x = setup
    dropped = _guided(unet, [(text, {})], [(negative, {})], x)
    for strength in (1e-30, 0.0):  # log(0) = -inf: masked, finite
        biased = _guided(unet, _styled(text, style, strength), [(negative, {})], x)
        assert torch.isfinite(biased).all()
        torch.testing.assert_close(biased, dropped, rtol=1e-5, atol=1e-5)
    plain = _guided(unet, [(torch.cat([text, style], dim=1), {})], [(negative, {})], x)
    assert (plain - dropped).abs().max() > 1e-3  # the style tokens do matter
    for strength in (0.3, 3.0):
        assert (_guided(unet, _styled(text, style, strength), [(negative, {})], x) - plain).abs().max() > 1e-4


def test_batched_cond_and_uncond_of_other_lengths_equal_separate_calls(setup):
    """Positive 8 tokens (biased), negative 6: one batched call (repeated to 24 tokens) equals each list alone."""
    unet, text, style, negative, x = setup
    positive = _styled(text, style, 2.5)
    batched = _guided(unet, positive, [(negative, {})], x, cfg=4.0)
    cond = _guided(unet, positive, [], x, cfg=1.0)
    uncond = _guided(unet, [(negative, {})], [], x, cfg=1.0)
    torch.testing.assert_close(batched, uncond + (cond - uncond) * 4.0, rtol=1e-4, atol=1e-5)
    # a biased negative, an unbiased positive: the bias goes to the negative's rows only
    swapped = _guided(unet, [(negative, {})], positive, x, cfg=4.0)
    torch.testing.assert_close(swapped, cond + (uncond - cond) * 4.0, rtol=1e-4, atol=1e-5)


def test_the_batch_bias_repeats_as_the_contexts_do() -> None:
    bias = batch_bias([{BIAS_KEY: torch.tensor([0.0, -1.0])}, {}], [2, 3], rows=2)
    assert bias.shape == (4, 6)
    assert torch.equal(bias[0], torch.tensor([0.0, -1.0] * 3)) and torch.equal(bias[1], bias[0])
    assert torch.equal(bias[2:], torch.zeros(2, 6))
    assert batch_bias([{BIAS_KEY: torch.zeros(3)}, {}], [3, 4], rows=1) is None  # all zero: no bias at all
    # a context that grew after the bias was set (ConditioningConcat): the new tokens get 0
    assert torch.equal(entry_bias(torch.tensor([1.0]), 3), torch.tensor([1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="covers 4 tokens but its context has only 3"):
        entry_bias(torch.ones(4), 3)


def test_attention_adds_the_bias_to_the_logits_chunked_or_not() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 100, 8, generator=gen) for _ in range(3))
    bias = torch.randn(2, 1, 1, 100, generator=gen)
    bias[0, ..., :10] = -math.inf
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8) + bias, dim=-1)
    expected = weights @ v
    torch.testing.assert_close(attention(q, k, v, budget=None, bias=bias), expected, rtol=1e-5, atol=1e-5)
    chunked = attention(q, k, v, budget=2 * 2 * 100 * 12 * 64, bias=bias)  # 64 queries a call: two calls
    torch.testing.assert_close(chunked, expected, rtol=1e-5, atol=1e-5)
