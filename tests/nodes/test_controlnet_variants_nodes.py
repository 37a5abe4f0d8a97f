"""Control-LoRA and union ControlNet files end to end through the nodes on the tiny random checkpoints:
ControlNetLoader composes a Control-LoRA with the sampling model (same result as the full ControlNet it means),
SetUnionControlNetType chooses a union ControlNet's control type per use, and the errors name what is wrong."""

from __future__ import annotations

import json

import torch

from diffusion.checkpoints.controlnet_files import (
    ControlNetInfo,
    random_controlnet,
    write_controlnet_file,
    write_random_controlnet,
)
from diffusion.checkpoints.files import read_state_dict, strip_prefix, write_safetensors
from diffusion.checkpoints.random_checkpoints import random_tensor
from diffusion.models.controlnet_union import UnionConfig, UnionControlNet
from tests.diffusion.test_control_lora import control_lora_of
from tests.nodes.test_controlnet_nodes import controlnet_dir, latent, sampled


def write_lora(path, lora, family: str) -> None:
    metadata = {"latentloom.config": json.dumps({"family": family})}
    write_safetensors(path, {k: (v.dtype, tuple(v.shape)) for k, v in lora.items()}, lambda k: lora[k].contiguous(),
                      metadata)


def test_control_lora_samples_as_the_full_controlnet_it_means(engine, model_dir):
    engine.env.precision = "fp32"  # base + up @ down then equals the full weights to float32 rounding
    base = {k: v.float() for k, v in strip_prefix(read_state_dict(model_dir / "sd1.safetensors"),
                                                   "model.diffusion_model.").items()}
    lora, expected, info = control_lora_of(base, "sd1", seed=2)
    write_lora(controlnet_dir(engine) / "control-lora-canny-rank3.safetensors", lora, "sd1")
    write_controlnet_file(controlnet_dir(engine) / "full.safetensors", expected, info)
    reference = latent(engine, sampled("full.safetensors"))
    composed = latent(engine, sampled("control-lora-canny-rank3.safetensors"))
    torch.testing.assert_close(composed, reference, rtol=1e-3, atol=1e-3)
    assert (composed - latent(engine, sampled(None))).abs().max() > 1e-2  # it steers
    old = latent(engine, sampled("control-lora-canny-rank3.safetensors", node="ControlNetApply"))
    torch.testing.assert_close(old, reference, rtol=1e-3, atol=1e-3)
    message = engine.error(sampled("control-lora-canny-rank3.safetensors", ckpt="sdxl.safetensors"))
    assert "Control-LoRA 'control-lora-canny-rank3'" in message
    assert "made for SD1.x and the model is SDXL" in message


def write_random_union(path, types: int, seed: int = 0) -> None:
    sd, info = random_controlnet("sdxl", seed=seed)
    union = UnionConfig(types, info.config.unet.model_channels, 1, 8)  # the tiny SDXL's size-embedding width
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in UnionControlNet(info.config, union).state_dict().items()}
    gen = torch.Generator().manual_seed(seed + 7)
    for key in sorted(shapes.keys() - sd.keys()):
        sd[key] = random_tensor(key, shapes[key], gen, 1.0 if key == "task_embedding" else None)
    write_controlnet_file(path, sd, ControlNetInfo("sdxl", "original", False, info.config, union), layout="diffusers")


def with_type(prompt: dict, control_type: str) -> dict:
    prompt["13"] = {"class_type": "SetUnionControlNetType", "inputs": {"control_net": ["10", 0], "type": control_type}}
    prompt["12"]["inputs"]["control_net"] = ["13", 0]
    return prompt


def test_union_type_is_chosen_per_use(engine):
    engine.env.precision = "fp32"
    write_random_union(controlnet_dir(engine) / "union-promax.safetensors", types=8)
    write_random_union(controlnet_dir(engine) / "union.safetensors", types=6)

    def run(control_type: str | None, name: str = "union-promax.safetensors") -> torch.Tensor:
        prompt = sampled(name, ckpt="sdxl.safetensors")
        return latent(engine, prompt if control_type is None else with_type(prompt, control_type))

    depth, canny, auto = run("depth"), run("canny/lineart/anime_lineart/mlsd"), run("auto")
    plain = latent(engine, sampled(None, ckpt="sdxl.safetensors"))
    assert (depth - canny).abs().max() > 1e-3 and (depth - auto).abs().max() > 1e-3
    assert (auto - plain).abs().max() > 1e-3
    torch.testing.assert_close(run(None), auto)  # no SetUnionControlNetType: auto, as in ComfyUI
    torch.testing.assert_close(run("depth"), depth)  # the loaded ControlNet kept no type from another use
    assert (run("tile") - depth).abs().max() > 1e-3  # promax knows tile
    message = engine.error(with_type(sampled("union.safetensors", ckpt="sdxl.safetensors"), "tile"))
    assert "SetUnionControlNetType" in message and "knows 6 control types" in message and "'tile'" in message


def test_union_type_on_a_plain_controlnet_changes_nothing(engine):
    write_random_controlnet(controlnet_dir(engine) / "cn.safetensors", "sd1", seed=1)
    plain = latent(engine, sampled())
    torch.testing.assert_close(latent(engine, with_type(sampled(), "depth")), plain)
