"""ControlNet nodes end to end on the tiny random checkpoints and random ControlNet files: loading (plain, diff,
wrong files), applying (strength 0, old and advanced nodes, batches, family mismatch) and Canny."""

from __future__ import annotations

import torch

from diffusion.checkpoints.controlnet_files import random_controlnet, write_controlnet_file, write_random_controlnet
from diffusion.checkpoints.files import read_state_dict, strip_prefix
from diffusion.checkpoints.random_checkpoints import write_random_vae
from graph.executor import Executor
from graph.validation import validate_prompt


def controlnet_dir(engine):
    return engine.env.models_dir / "controlnet"


def sampled(control: str | None = "cn.safetensors", strength: float = 1.0, node: str = "ControlNetApplyAdvanced",
            ckpt: str = "sd1.safetensors", hint_batch: int = 1, latent_batch: int = 1,
            loader: str = "ControlNetLoader", start: float = 0.0, end: float = 1.0):
    """txt2img (2 steps, cfg 5) whose conditioning goes through a ControlNet node (none when `control` is None)."""
    prompt = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 48, "batch_size": latent_batch}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "11": {"class_type": "EmptyImage", "inputs": {"width": 96, "height": 64, "batch_size": hint_batch,
                                                       "color": 0x30A0F0}},
    }
    positive, negative = ["6", 0], ["7", 0]
    if control is not None:
        inputs = {"control_net_name": control}
        if loader == "DiffControlNetLoader":
            inputs["model"] = ["4", 0]
        prompt["10"] = {"class_type": loader, "inputs": inputs}
        if node == "ControlNetApplyAdvanced":
            prompt["12"] = {"class_type": node, "inputs": {
                "positive": positive, "negative": negative, "control_net": ["10", 0], "image": ["11", 0],
                "strength": strength, "start_percent": start, "end_percent": end}}
            positive, negative = ["12", 0], ["12", 1]
        else:
            prompt["12"] = {"class_type": node, "inputs": {
                "conditioning": positive, "control_net": ["10", 0], "image": ["11", 0], "strength": strength}}
            positive = ["12", 0]
    prompt["3"] = {"class_type": "KSampler", "inputs": {
        "model": ["4", 0], "seed": 3, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
        "positive": positive, "negative": negative, "latent_image": ["5", 0], "denoise": 1.0}}
    prompt["9"] = {"class_type": "SaveLatent", "inputs": {"samples": ["3", 0], "filename_prefix": "cn"}}
    return prompt


def latent(engine, prompt) -> torch.Tensor:
    return engine.outputs(prompt, "3")[0][0]["samples"]


def test_controlnet_steers_sampling_and_strength_zero_changes_nothing(engine):
    write_random_controlnet(controlnet_dir(engine) / "cn.safetensors", "sd1", seed=1)
    plain = latent(engine, sampled(None))
    assert torch.equal(latent(engine, sampled(strength=0.0)), plain)
    assert torch.equal(latent(engine, sampled(strength=0.0, node="ControlNetApply")), plain)
    advanced = latent(engine, sampled())
    old = latent(engine, sampled(node="ControlNetApply"))
    assert (advanced - plain).abs().max() > 1e-3 and (old - plain).abs().max() > 1e-3
    assert torch.equal(latent(engine, sampled(start=0.6, end=0.2)), plain)  # an empty range: runs, never acts
    second_half = latent(engine, sampled(start=0.5, end=1.0))  # acts on the second of the two steps only
    assert not torch.equal(second_half, advanced) and not torch.equal(second_half, plain)
    # the old node's chain reaches the uncond half too (ComfyUI's control_apply_to_uncond): same as advanced
    torch.testing.assert_close(old, advanced, rtol=1e-4, atol=1e-4)


def test_loaded_once_and_shared(engine):
    write_random_controlnet(controlnet_dir(engine) / "cn.safetensors", "sd1", seed=1, layout="diffusers")
    first = engine.outputs(sampled(), "10")[0][0]
    engine.executor = Executor(env=engine.env)  # no node cache: the environment's model cache shares the file
    second = engine.outputs(sampled(strength=0.5), "10")[0][0]
    assert first is second
    conditioning = engine.outputs(sampled(), "12")
    step = conditioning[0][0][0][1]["control"][-1]
    assert conditioning[1][0][0][1]["control"][-1] is step and step.control_net is first


def test_diff_controlnet_gets_the_models_weights(engine, model_dir, monkeypatch):
    # fp32 whatever the CPU: (diff + base) then equals the full weights to float32 rounding, which 2 steps of a
    # random model keep small (bf16 rounding of the sum is amplified past any useful tolerance)
    engine.env.precision = "fp32"  # --force-fp32
    full, info = random_controlnet("sd1", seed=2)
    base = strip_prefix(read_state_dict(model_dir / "sd1.safetensors"), "model.diffusion_model.")
    diff = {k: v - base[k] if k in base else v for k, v in full.items()}
    write_controlnet_file(controlnet_dir(engine) / "full.safetensors", full, info)
    write_controlnet_file(controlnet_dir(engine) / "diff.safetensors", diff, info, prefix=True, diff=True)
    reference = latent(engine, sampled("full.safetensors"))
    torch.testing.assert_close(latent(engine, sampled("diff.safetensors", loader="DiffControlNetLoader")), reference,
                               rtol=1e-3, atol=1e-3)
    # DiffControlNetLoader also loads a plain ControlNet (as ComfyUI's does)
    torch.testing.assert_close(latent(engine, sampled("full.safetensors", loader="DiffControlNetLoader")), reference)
    message = engine.error(sampled("diff.safetensors"))
    assert "diff ControlNet" in message and "DiffControlNetLoader" in message and "diff.safetensors" in message


def test_wrong_files_and_families_get_clear_errors(engine):
    write_random_vae(controlnet_dir(engine) / "vae.safetensors", prefix=False)
    message = engine.error(sampled("vae.safetensors"))
    assert "ControlNetLoader" in message and "vae.safetensors" in message and "not a ControlNet" in message
    assert "a VAE" in message and str(engine.env.data_dir) not in message
    write_random_controlnet(controlnet_dir(engine) / "cn.safetensors", "sd1", seed=1)
    message = engine.error(sampled(ckpt="sdxl.safetensors"))
    assert "SD1.x ControlNet" in message and "SDXL base" in message
    validation = validate_prompt(sampled("../checkpoints/sd1.safetensors"), engine.registry, engine.env)
    assert not validation.ok


def test_hint_batch_follows_the_latent_batch(engine):
    write_random_controlnet(controlnet_dir(engine) / "cn.safetensors", "sd1", seed=1)
    assert latent(engine, sampled(hint_batch=2, latent_batch=2)).shape[0] == 2
    assert latent(engine, sampled(hint_batch=1, latent_batch=2)).shape[0] == 2
    message = engine.error(sampled(hint_batch=3, latent_batch=2))
    assert "hint image batch is 3 but the latent batch is 2" in message


def test_sdxl_controlnet_on_sdxl(engine):
    write_random_controlnet(controlnet_dir(engine) / "xl.safetensors", "sdxl", seed=4)
    plain = latent(engine, sampled(None, ckpt="sdxl.safetensors"))
    assert (latent(engine, sampled("xl.safetensors", ckpt="sdxl.safetensors")) - plain).abs().max() > 1e-3


def test_canny_finds_thin_edges_where_the_shape_is(engine):
    image = torch.zeros(1, 32, 40, 3)
    image[:, 8:24, 10:30] = torch.tensor([0.9, 0.2, 0.1])  # a red rectangle on black
    node = engine.registry.get("Canny")()
    (edges,) = node.execute(image, 0.4, 0.8)
    assert edges.shape == (1, 32, 40, 3) and set(edges.unique().tolist()) <= {0.0, 1.0}
    mask = edges[0, ..., 0] > 0
    rows, cols = torch.where(mask)
    assert rows.min() >= 6 and rows.max() <= 25 and cols.min() >= 8 and cols.max() <= 31  # only around the border
    assert not mask[11:21, 13:27].any() and not mask[:5].any()  # nothing inside or far outside
    for y in range(12, 20):  # each row crosses the left and the right side once: lines one pixel thick
        assert mask[y].sum() == 2
    for x in range(14, 26):
        assert mask[:, x].sum() == 2
    (faint,) = node.execute(image * 0.05, 0.4, 0.8)
    assert not faint.any()  # a step of 0.02 in luma is below the thresholds


def test_inpainting_model_with_a_controlnet(engine):
    """The ControlNet sees the 4 latent channels; the inpainting UNet its 9 (mask and masked image appended)."""
    write_random_controlnet(controlnet_dir(engine) / "cn.safetensors", "sd1", seed=1)
    plain = latent(engine, sampled(None, ckpt="sd1-inpaint.safetensors"))
    assert (latent(engine, sampled(ckpt="sd1-inpaint.safetensors")) - plain).abs().max() > 1e-3


def test_hires_fix_second_pass_and_the_optional_vae(engine):
    """The same conditioning serves a second pass at another size (the hint is fitted to each); a connected VAE
    changes nothing for these ControlNets, which take the hint as pixels."""
    write_random_controlnet(controlnet_dir(engine) / "cn.safetensors", "sd1", seed=1)
    prompt = sampled()
    first = latent(engine, prompt)
    prompt["12"]["inputs"]["vae"] = ["4", 2]
    assert torch.equal(latent(engine, prompt), first)
    prompt["13"] = {"class_type": "LatentUpscale", "inputs": {"samples": ["3", 0], "upscale_method": "nearest-exact",
                                                              "width": 96, "height": 64, "crop": "disabled"}}
    prompt["14"] = {"class_type": "KSampler", "inputs": {**prompt["3"]["inputs"], "latent_image": ["13", 0],
                                                         "denoise": 0.5}}
    prompt["9"]["inputs"]["samples"] = ["14", 0]
    second = engine.outputs(prompt, "14")[0][0]["samples"]
    assert second.shape == (1, 4, 8, 12) and torch.isfinite(second).all()
    step = engine.outputs(prompt, "12")[0][0][0][1]["control"][-1]
    assert {key[:2] for key in step._resized} >= {(48, 64), (64, 96)}
