"""StyleModelApply with strength_type "attn_bias" end to end: strength 1 is multiply 1 bit for bit, strength 0
samples as if the style tokens were not there, other strengths change the result, and the bias rides on the
conditioning through later nodes (ConditioningConcat, a second style model)."""

from __future__ import annotations

import math

import torch

from diffusion.patches.context_bias import BIAS_KEY
from tests.nodes.test_clip_vision_nodes import setup_files, style_prompt


def samples(engine, prompt) -> torch.Tensor:
    return engine.outputs(prompt, "3")[0][0]["samples"]


def test_attn_bias_strengths(engine):
    setup_files(engine)
    engine.env.precision = "fp32"  # --force-fp32: bf16 rounding, amplified by random weights, would hide the check
    multiply = samples(engine, style_prompt(1.0, "multiply"))
    assert torch.equal(samples(engine, style_prompt(1.0, "attn_bias")), multiply)
    text_only = style_prompt()
    text_only["3"]["inputs"]["positive"] = ["6", 0]
    plain = samples(engine, text_only)
    scale = plain.abs().max()  # ~300: random weights at cfg 5; fp32 rounding scales with it

    def apart(a, b) -> float:
        return float((a - b).abs().max() / scale)

    assert apart(plain, multiply) > 1e-2  # the style tokens matter
    removed = samples(engine, style_prompt(0.0, "attn_bias"))
    # masked, not NaN; equal to no style tokens up to fp32 rounding (81 vs 77 text tokens batched as 6237)
    assert torch.isfinite(removed).all() and apart(removed, plain) < 2e-5
    for strength in (0.4, 3.0):
        out = samples(engine, style_prompt(strength, "attn_bias"))
        assert apart(out, multiply) > 1e-3 and apart(out, plain) > 1e-3
    # attn_bias is not multiply: at 3.0 the tokens keep their size, their attention weight grows
    assert apart(samples(engine, style_prompt(3.0, "attn_bias")), samples(engine, style_prompt(3.0))) > 1e-3


def test_the_bias_rides_on_the_conditioning(engine):
    setup_files(engine)
    prompt = style_prompt(0.5, "attn_bias")
    (tokens, opts), = engine.outputs(prompt, "20")[0][0]
    text = engine.outputs(prompt, "6")[0][0][0][0].shape[1]
    bias = opts[BIAS_KEY]
    assert bias.shape == (tokens.shape[1],) and torch.equal(bias[:text], torch.zeros(text))
    torch.testing.assert_close(bias[text:], torch.full((tokens.shape[1] - text,), math.log(0.5)))
    # a second style model (multiply) after it: its tokens get 0; then ConditioningConcat appends more text
    prompt["21"] = {"class_type": "StyleModelApply", "inputs": {
        "conditioning": ["20", 0], "style_model": ["13", 0], "clip_vision_output": ["11", 0], "strength": 1.0,
        "strength_type": "multiply"}}
    prompt["22"] = {"class_type": "ConditioningConcat", "inputs": {"conditioning_to": ["21", 0],
                                                                   "conditioning_from": ["7", 0]}}
    prompt["3"]["inputs"]["positive"] = ["22", 0]
    (tokens2, opts2), = engine.outputs(prompt, "21")[0][0]
    assert torch.equal(opts2[BIAS_KEY][:bias.shape[0]], bias) and opts2[BIAS_KEY].shape == (tokens2.shape[1],)
    assert torch.equal(opts2[BIAS_KEY][bias.shape[0]:], torch.zeros(tokens2.shape[1] - bias.shape[0]))
    assert torch.isfinite(samples(engine, prompt)).all()
