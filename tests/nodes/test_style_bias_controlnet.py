"""StyleModelApply's attn_bias reaches the ControlNet's cross-attentions as it does the UNet's: the ControlNet gets
the same context (text and style tokens), so at strength 0 it must not see the style tokens either (ComfyUI's
attn_bias is an attention mask over the whole model call). Node level: a style model at strength 0 with a
ControlNet samples as the text alone with that ControlNet; unit level (context_bias.cross_attention_bias): a -inf
bias equals dropping the tokens in a ControlNet's forward, its self-attentions are left alone, and a bias of
another shape is a clear error."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion.checkpoints.controlnet_files import build_controlnet, random_controlnet, write_random_controlnet
from diffusion.patches.context_bias import cross_attention_bias
from tests.nodes.test_clip_vision_nodes import setup_files, style_prompt


def controlled(prompt: dict, positive: list) -> dict:
    """The prompt with a random SD1 ControlNet applied to `positive` and the negative (a flat-colour hint)."""
    prompt = dict(prompt)
    prompt["30"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "cn.safetensors"}}
    prompt["31"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                           "color": 0x30A0F0}}
    prompt["32"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
        "positive": positive, "negative": ["7", 0], "control_net": ["30", 0], "image": ["31", 0],
        "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
    prompt["3"] = {**prompt["3"], "inputs": {**prompt["3"]["inputs"], "positive": ["32", 0], "negative": ["32", 1]}}
    return prompt


def test_strength_zero_hides_the_style_tokens_from_the_controlnet_too(engine):
    setup_files(engine)
    write_random_controlnet(engine.env.models_dir / "controlnet" / "cn.safetensors", "sd1", seed=1)
    engine.env.precision = "fp32"

    def samples(prompt):
        return engine.outputs(prompt, "3")[0][0]["samples"]

    text_only = samples(controlled(style_prompt(), ["6", 0]))
    removed = samples(controlled(style_prompt(0.0, "attn_bias"), ["20", 0]))
    plain = samples(controlled(style_prompt(1.0, "attn_bias"), ["20", 0]))
    scale = text_only.abs().max()
    assert float((plain - text_only).abs().max() / scale) > 1e-2  # the style tokens matter
    assert torch.isfinite(removed).all()
    assert float((removed - text_only).abs().max() / scale) < 2e-5


@pytest.fixture(scope="module")
def net():
    sd, info = random_controlnet("sd1", seed=1)
    return build_controlnet(sd, info, dtype=torch.float32).eval()


def test_a_minus_infinite_bias_drops_the_tokens_in_the_controlnet(net):
    gen = torch.Generator().manual_seed(0)
    dim = net.config.unet.context_dim
    x, context = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 7, dim, generator=gen)
    hint, t = torch.rand(2, 3, 64, 64, generator=gen), torch.tensor([500.0, 20.0])
    bias = torch.zeros(2, 7)
    bias[:, 5:] = -math.inf
    with torch.no_grad():
        dropped = net(x, hint, t, context[:, :5])
        with cross_attention_bias(net, bias):
            biased = net(x, hint, t, context)
        plain = net(x, hint, t, context)
        with cross_attention_bias(net, torch.full((2, 7), math.log(3.0))):  # the same bias on every token: none
            even = net(x, hint, t, context)
    for a, b, c, d in zip(biased, dropped, plain, even, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(d, c, rtol=1e-5, atol=1e-5)
    assert max(float((a - c).abs().max()) for a, c in zip(biased, plain, strict=True)) > 1e-4
    with torch.no_grad():  # the hooks are gone after the block
        again = net(x, hint, t, context)
    assert all(torch.equal(a, c) for a, c in zip(again, plain, strict=True))


def test_a_bias_of_another_shape_is_a_clear_error(net):
    dim = net.config.unet.context_dim
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 7, dim)
    with pytest.raises(ValueError, match=r"attention bias is for \[1, 9\] rows x tokens.*\[1, 7\]"), \
            torch.no_grad(), cross_attention_bias(net, torch.zeros(1, 9)):
        net(x, torch.rand(1, 3, 64, 64), torch.tensor([10.0]), context)
    with torch.no_grad():  # and nothing stays hooked after the error
        net(x, torch.rand(1, 3, 64, 64), torch.tensor([10.0]), context)
