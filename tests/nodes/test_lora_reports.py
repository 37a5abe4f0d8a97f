"""What LoraLoader and LoraLoaderModelOnly apply and report: nothing at strength 0, and an unmatched-key warning that
counts only keys matching no module (not the text encoder's keys when only the UNet is patched)."""

from __future__ import annotations

import logging

import pytest
import torch

from diffusion.patches.lora import kohya_text_names, kohya_unet_names, lora_patches, save_lora
from diffusion.patches.patcher import LoraDelta
from nodes.loaders import apply_lora, load_checkpoint_handles

NOWHERE = {"lora_unet_no_such_block.lora_up.weight": torch.zeros(4, 2),
           "lora_unet_no_such_block.lora_down.weight": torch.zeros(2, 4)}


@pytest.fixture
def handles_and_lora(engine, tmp_path):
    model, clip, _ = load_checkpoint_handles(engine.env, "sd1.safetensors")
    gen = torch.Generator().manual_seed(0)
    layers = {}
    unet_params = dict(model.patcher.model.named_parameters())
    for module, kohya in kohya_unet_names(model.family.unet, unet_params).items():
        if unet_params[module + ".weight"].ndim == 2 and len(layers) < 6:
            shape = unet_params[module + ".weight"].shape
            layers[kohya] = LoraDelta(torch.randn(shape[0], 2, generator=gen), torch.randn(2, shape[1], generator=gen))
    text_params = dict(clip.patchers["l"].model.named_parameters())
    for module, kohya in list(kohya_text_names(clip.text)["l"].items())[:10]:
        shape = text_params[module + ".weight"].shape
        if len(shape) == 2:
            layers[kohya] = LoraDelta(torch.randn(shape[0], 2, generator=gen), torch.randn(2, shape[1], generator=gen))
    path = tmp_path / "style.safetensors"
    save_lora(path, layers)
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    assert any(k.startswith("lora_te_") for k in tensors) and any(k.startswith("lora_unet_") for k in tensors)
    return model, clip, tensors


def matched_nothing(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "matched nothing" in r.getMessage()]


def test_strength_zero_applies_and_reports_nothing(handles_and_lora, caplog):
    model, clip, tensors = handles_and_lora
    with caplog.at_level(logging.DEBUG):
        out_model, out_clip = apply_lora(model, clip, "style", {**tensors, **NOWHERE}, 0.0, 0.0)
        only_model = apply_lora(model, None, "style", {**tensors, **NOWHERE}, 0.0, 0.0)[0]
    assert out_model is model and out_clip is clip and only_model is model
    assert not [r for r in caplog.records if r.name.startswith(("diffusion.patches.lora", "nodes"))]


def test_unet_only_does_not_report_text_encoder_keys(handles_and_lora, caplog):
    model, clip, tensors = handles_and_lora
    with caplog.at_level(logging.WARNING, logger="diffusion.patches.lora"):
        patched, same_clip = apply_lora(model, clip, "style", tensors, 1.0, 0.0)  # LoraLoader, clip strength 0
        model_only = apply_lora(model, None, "style", tensors, 0.5, 0.0)[0]  # LoraLoaderModelOnly
    assert matched_nothing(caplog) == []
    assert same_clip is clip and patched is not model and model_only is not model
    assert len(patched.patcher.patches) == len(model_only.patcher.patches) == 6


def test_report_counts_only_keys_that_match_no_module(handles_and_lora, caplog):
    model, clip, tensors = handles_and_lora
    with caplog.at_level(logging.WARNING, logger="diffusion.patches.lora"):
        apply_lora(model, None, "style", {**tensors, **NOWHERE}, 1.0, 0.0)
        apply_lora(model, clip, "style", {**tensors, **NOWHERE}, 0.0, 1.0)
    assert matched_nothing(caplog) == ["LoRA style: 2 keys matched nothing (e.g. "
                                       "lora_unet_no_such_block.lora_down.weight, "
                                       "lora_unet_no_such_block.lora_up.weight)"] * 2


def test_keys_for_parts_not_given_are_not_mismatches():
    stray = {"lora_te_text_model_nothing_here.lora_up.weight": torch.zeros(4, 2),
             "mystery.lora_up.weight": torch.zeros(4, 2)}
    assert lora_patches({**stray, **NOWHERE}).unmatched == ["mystery.lora_up.weight"]
