"""T2I-Adapters through ComfyUI's ControlNet nodes, end to end on the tiny random checkpoints: loading both layouts
and pickles through ControlNetLoader (and DiffControlNetLoader), applying with both apply nodes, features computed
once per sampling, strength 0 and step ranges, chaining with a ControlNet, wrong files and families."""

from __future__ import annotations

import torch

from diffusion.checkpoints.controlnet_files import write_random_controlnet
from diffusion.checkpoints.random_checkpoints import checkpoint_spec
from diffusion.checkpoints.t2i_adapter_files import config_for_unet, random_t2i_adapter, write_random_t2i_adapter
from diffusion.models.t2i_adapter import T2IAdapter


def adapter_config(family: str = "sd1", variant: str = "full", in_channels: int = 3):
    unet = checkpoint_spec(family, "tiny").unet
    return config_for_unet(unet.model_channels, unet.channel_mult, xl=family == "sdxl", variant=variant,
                           in_channels=in_channels)


def write_adapter(engine, name: str, family: str = "sd1", variant: str = "full", layout: str = "original",
                  seed: int = 0, in_channels: int = 3) -> None:
    write_random_t2i_adapter(engine.env.models_dir / "controlnet" / name,
                             adapter_config(family, variant, in_channels), seed=seed, layout=layout)


def sampled(controls=(), ckpt: str = "sd1.safetensors", node: str = "ControlNetApplyAdvanced",
            loader: str = "ControlNetLoader"):
    """txt2img (2 steps, cfg 5, 64x48) whose conditioning goes through one apply node per (file, strength, start,
    end) in `controls`, chained in order."""
    prompt = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "11": {"class_type": "EmptyImage", "inputs": {"width": 96, "height": 64, "batch_size": 1,
                                                       "color": 0x30A0F0}},
    }
    positive, negative = ["6", 0], ["7", 0]
    for i, (name, strength, start, end) in enumerate(controls):
        load, apply = f"2{i}", f"3{i}"
        inputs = {"control_net_name": name} | ({"model": ["4", 0]} if loader == "DiffControlNetLoader" else {})
        prompt[load] = {"class_type": loader, "inputs": inputs}
        if node == "ControlNetApplyAdvanced":
            prompt[apply] = {"class_type": node, "inputs": {
                "positive": positive, "negative": negative, "control_net": [load, 0], "image": ["11", 0],
                "strength": strength, "start_percent": start, "end_percent": end}}
            positive, negative = [apply, 0], [apply, 1]
        else:
            prompt[apply] = {"class_type": node, "inputs": {
                "conditioning": positive, "control_net": [load, 0], "image": ["11", 0], "strength": strength}}
            positive = [apply, 0]
    prompt["3"] = {"class_type": "KSampler", "inputs": {
        "model": ["4", 0], "seed": 3, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
        "positive": positive, "negative": negative, "latent_image": ["5", 0], "denoise": 1.0}}
    prompt["9"] = {"class_type": "SaveLatent", "inputs": {"samples": ["3", 0], "filename_prefix": "t2i"}}
    return prompt


def latent(engine, prompt) -> torch.Tensor:
    return engine.outputs(prompt, "3")[0][0]["samples"]


def counted(monkeypatch) -> list[int]:
    """Counts adapter runs."""
    runs: list[int] = []
    forward = T2IAdapter.forward

    def counting(self, hint):
        runs.append(hint.shape[0])
        return forward(self, hint)

    monkeypatch.setattr(T2IAdapter, "forward", counting)
    return runs


def test_adapter_through_the_controlnet_nodes_runs_once_per_sampling(engine, monkeypatch):
    write_adapter(engine, "t2iadapter_depth_sd15v2.safetensors")
    runs = counted(monkeypatch)
    plain = latent(engine, sampled())
    steered = latent(engine, sampled([("t2iadapter_depth_sd15v2.safetensors", 1.0, 0.0, 1.0)]))
    assert (steered - plain).abs().max() > 1e-3
    assert runs == [1]  # 2 steps x (cond + uncond): the features of the one hint, computed once
    assert torch.equal(latent(engine, sampled([("t2iadapter_depth_sd15v2.safetensors", 0.0, 0.0, 1.0)])), plain)
    second_half = latent(engine, sampled([("t2iadapter_depth_sd15v2.safetensors", 1.0, 0.5, 1.0)]))
    assert not torch.equal(second_half, steered) and not torch.equal(second_half, plain)
    old = latent(engine, sampled([("t2iadapter_depth_sd15v2.safetensors", 1.0, 0.0, 1.0)], node="ControlNetApply"))
    torch.testing.assert_close(old, steered, rtol=1e-3, atol=1e-3)  # the old node reaches the uncond half too
    diff_loader = latent(engine, sampled([("t2iadapter_depth_sd15v2.safetensors", 1.0, 0.0, 1.0)],
                                         loader="DiffControlNetLoader"))
    torch.testing.assert_close(diff_loader, steered)


def test_every_layout_and_variant_loads(engine):
    write_adapter(engine, "light.safetensors", variant="light", layout="diffusers", seed=1)
    write_adapter(engine, "canny.safetensors", in_channels=1, layout="diffusers", seed=2)
    write_adapter(engine, "xl.safetensors", family="sdxl", layout="diffusers", seed=3)
    torch.save(random_t2i_adapter(adapter_config(), seed=4), engine.env.models_dir / "controlnet" / "v1.pth")
    torch.save({"adapter": random_t2i_adapter(adapter_config(), seed=5)},  # a training checkpoint's wrapper
               engine.env.models_dir / "controlnet" / "wrapped.pth")
    plain = latent(engine, sampled())
    for name in ("light.safetensors", "canny.safetensors", "v1.pth", "wrapped.pth"):
        assert (latent(engine, sampled([(name, 1.0, 0.0, 1.0)])) - plain).abs().max() > 1e-3, name
    plain_xl = latent(engine, sampled(ckpt="sdxl.safetensors"))
    steered_xl = latent(engine, sampled([("xl.safetensors", 1.0, 0.0, 1.0)], ckpt="sdxl.safetensors"))
    assert (steered_xl - plain_xl).abs().max() > 1e-3


def test_chained_with_a_controlnet(engine):
    write_adapter(engine, "adapter.safetensors")
    write_random_controlnet(engine.env.models_dir / "controlnet" / "cn.safetensors", "sd1", seed=1)
    adapter = latent(engine, sampled([("adapter.safetensors", 1.0, 0.0, 1.0)]))
    controlnet = latent(engine, sampled([("cn.safetensors", 1.0, 0.0, 1.0)]))
    both = latent(engine, sampled([("cn.safetensors", 1.0, 0.0, 1.0), ("adapter.safetensors", 1.0, 0.0, 1.0)]))
    assert (both - adapter).abs().max() > 1e-3 and (both - controlnet).abs().max() > 1e-3
    swapped = latent(engine, sampled([("adapter.safetensors", 1.0, 0.0, 1.0), ("cn.safetensors", 1.0, 0.0, 1.0)]))
    torch.testing.assert_close(swapped, both, rtol=1e-3, atol=1e-3)  # residuals add: the order does not matter


def test_wrong_families_and_files_get_clear_errors(engine):
    write_adapter(engine, "sd1_adapter.safetensors")
    message = engine.error(sampled([("sd1_adapter.safetensors", 1.0, 0.0, 1.0)], ckpt="sdxl.safetensors"))
    assert "SD1.x T2I-Adapter" in message and "SDXL base" in message and "sd1_adapter" in message
    write_adapter(engine, "xl_adapter.safetensors", family="sdxl")
    message = engine.error(sampled([("xl_adapter.safetensors", 1.0, 0.0, 1.0)]))
    assert "SDXL base T2I-Adapter" in message and "SD1.x" in message
    bad = random_t2i_adapter(adapter_config())
    bad["conv_in.weight"] = torch.zeros(16, 100, 3, 3)
    torch.save(bad, engine.env.models_dir / "controlnet" / "bad.pth")
    message = engine.error(sampled([("bad.pth", 1.0, 0.0, 1.0)]))
    assert "ControlNetLoader" in message and "bad.pth" in message and "reads 100 channels" in message
    assert str(engine.env.data_dir) not in message
