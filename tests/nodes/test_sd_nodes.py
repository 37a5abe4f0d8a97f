"""The Stable Diffusion nodes end to end on tiny random checkpoints of each family."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from PIL import Image

from diffusion.checkpoints.loader import load_checkpoint
from diffusion.handles import wrap_checkpoint
from diffusion.patches.lora import kohya_text_names, kohya_unet_names, save_lora
from diffusion.patches.patcher import LoraDelta
from diffusion.sampling.noise import prepare_noise
from nodes.loaders import load_checkpoint_handles


def txt2img(ckpt="sd1.safetensors", seed=1, steps=3, size=64, sampler="euler", scheduler="normal", denoise=1.0,
            cfg=5.0, positive="a red circle", negative="blue", batch=1):
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": batch}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "seed": seed, "steps": steps, "cfg": cfg,
                                                   "sampler_name": sampler, "scheduler": scheduler,
                                                   "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["5", 0], "denoise": denoise}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "t"}},
    }


def latent_of(engine, prompt, node="3"):
    return engine.outputs(prompt, node)[0][0]["samples"]


def test_txt2img_writes_png_with_prompt_chunk(engine):
    prompt = txt2img()
    result = engine.run(prompt)
    saved = result.outputs["9"]["images"][0]
    image = Image.open(engine.env.output_dir / saved["filename"])
    assert image.size == (64, 64) and json.loads(image.text["prompt"]) == prompt
    progress = [d for e, d in engine.events if e == "progress"]
    assert [p["value"] for p in progress] == [1, 2, 3] and progress[0]["node"] == "3"


def test_checkpoint_loaded_once_and_shared(engine):
    first = load_checkpoint_handles(engine.env, "sd1.safetensors")
    assert load_checkpoint_handles(engine.env, "sd1.safetensors") is first
    assert len([k for k in engine.env.model_cache if k[0] == "checkpoint"]) == 1


def test_same_seed_same_latent_other_seed_differs(engine):
    a = latent_of(engine, txt2img(seed=5))
    engine.executor.cache.clear()
    b = latent_of(engine, txt2img(seed=5))
    c = latent_of(engine, txt2img(seed=6))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_batch_images_differ_and_prompt_matters(engine):
    batch = latent_of(engine, txt2img(batch=2))
    assert batch.shape == (2, 4, 8, 8) and not torch.allclose(batch[0], batch[1])
    assert not torch.allclose(latent_of(engine, txt2img(positive="a green star")), latent_of(engine, txt2img()))


@pytest.mark.parametrize("sampler, scheduler", [("dpmpp_2m", "karras"), ("euler_ancestral", "simple"),
                                                ("dpmpp_2m_sde", "exponential"), ("uni_pc", "sgm_uniform")])
def test_samplers_and_schedulers_run(engine, sampler, scheduler):
    out = latent_of(engine, txt2img(sampler=sampler, scheduler=scheduler))
    assert torch.isfinite(out).all() and out.abs().sum() > 0


def img2img(denoise, mask=False):
    prompt = txt2img(denoise=denoise)
    prompt["20"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                           "color": 0x3366CC}}
    prompt["21"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["20", 0], "vae": ["4", 2]}}
    prompt["3"]["inputs"]["latent_image"] = ["21", 0]
    if mask:
        prompt["22"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 8, "height": 8}}
        prompt["23"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 4, "height": 8}}
        prompt["24"] = {"class_type": "MaskComposite", "inputs": {"destination": ["22", 0], "source": ["23", 0],
                                                                  "x": 0, "y": 0, "operation": "add"}}
        prompt["25"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["21", 0], "mask": ["24", 0]}}
        prompt["3"]["inputs"]["latent_image"] = ["25", 0]
    return prompt


def test_img2img_denoise_zero_returns_input_and_half_changes_it(engine):
    prompt = img2img(0.0)
    encoded = engine.outputs(prompt, "21")[0][0]["samples"]
    assert torch.equal(latent_of(engine, prompt), encoded)
    half = latent_of(engine, img2img(0.5))
    assert not torch.allclose(half, encoded)


def test_inpainting_keeps_unmasked_latent_exactly(engine):
    prompt = img2img(1.0, mask=True)
    encoded = engine.outputs(prompt, "21")[0][0]["samples"]
    out = latent_of(engine, prompt)
    assert torch.equal(out[..., 4:], encoded[..., 4:])  # mask covers the left half (latent columns 0..3)
    assert not torch.allclose(out[..., :4], encoded[..., :4])


def advanced(start, end, leftover, add_noise, latent):
    return {"class_type": "KSamplerAdvanced", "inputs": {
        "model": ["4", 0], "add_noise": add_noise, "noise_seed": 3, "steps": 4, "cfg": 5.0, "sampler_name": "euler",
        "scheduler": "normal", "positive": ["6", 0], "negative": ["7", 0], "latent_image": latent,
        "start_at_step": start, "end_at_step": end, "return_with_leftover_noise": leftover}}


def test_ksampler_advanced_split_equals_full_run(engine):
    prompt = txt2img(steps=4)
    prompt["30"] = advanced(0, 10000, "disable", "enable", ["5", 0])
    prompt["31"] = advanced(0, 2, "enable", "enable", ["5", 0])
    prompt["32"] = advanced(2, 10000, "disable", "disable", ["31", 0])
    prompt["8"]["inputs"]["samples"] = ["32", 0]
    prompt["33"] = {"class_type": "VAEDecode", "inputs": {"samples": ["30", 0], "vae": ["4", 2]}}
    prompt["34"] = {"class_type": "PreviewImage", "inputs": {"images": ["33", 0]}}
    full = engine.outputs(prompt, "30")[0][0]["samples"]
    split = engine.outputs(prompt, "32")[0][0]["samples"]
    torch.testing.assert_close(split, full, atol=1e-4, rtol=1e-4)


def test_custom_sampling_equals_ksampler(engine):
    prompt = txt2img(steps=3, sampler="heun", scheduler="karras")
    prompt.update({
        "40": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "heun"}},
        "41": {"class_type": "BasicScheduler", "inputs": {"model": ["4", 0], "scheduler": "karras", "steps": 3,
                                                          "denoise": 1.0}},
        "42": {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}},
        "43": {"class_type": "CFGGuider", "inputs": {"model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
                                                     "cfg": 5.0}},
        "44": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["42", 0], "guider": ["43", 0],
                                                                 "sampler": ["40", 0], "sigmas": ["41", 0],
                                                                 "latent_image": ["5", 0]}},
        "45": {"class_type": "SamplerCustom", "inputs": {"model": ["4", 0], "add_noise": True, "noise_seed": 1,
                                                         "cfg": 5.0, "positive": ["6", 0], "negative": ["7", 0],
                                                         "sampler": ["40", 0], "sigmas": ["41", 0],
                                                         "latent_image": ["5", 0]}},
        "46": {"class_type": "VAEDecode", "inputs": {"samples": ["44", 1], "vae": ["4", 2]}},
        "47": {"class_type": "PreviewImage", "inputs": {"images": ["46", 0]}},
        "48": {"class_type": "VAEDecode", "inputs": {"samples": ["45", 0], "vae": ["4", 2]}},
        "49": {"class_type": "PreviewImage", "inputs": {"images": ["48", 0]}},
    })
    reference = engine.outputs(prompt, "3")[0][0]["samples"]
    custom = engine.outputs(prompt, "44")[0][0]["samples"]
    torch.testing.assert_close(custom, reference)
    torch.testing.assert_close(engine.outputs(prompt, "45")[0][0]["samples"], reference)


def test_split_sigmas_and_karras_exponential_schedulers(engine):
    split = engine.registry.get("SplitSigmas")().execute(torch.tensor([3.0, 2.0, 1.0, 0.0]), 1)
    assert split[0].tolist() == [3.0, 2.0] and split[1].tolist() == [2.0, 1.0, 0.0]
    (karras,) = engine.registry.get("KarrasScheduler")().execute(20, 14.614642, 0.0291675, 7.0)
    assert len(karras) == 21 and karras[0] == pytest.approx(14.614642) and karras[-1] == 0
    (expo,) = engine.registry.get("ExponentialScheduler")().execute(5, 10.0, 0.1)
    assert expo[0] == pytest.approx(10.0) and expo[4] == pytest.approx(0.1)


def test_lora_changes_output_and_strength_zero_does_not(engine, model_dir):
    model, clip, _ = load_checkpoint_handles(engine.env, "sd1.safetensors")
    gen = torch.Generator().manual_seed(0)
    layers = {}
    unet_params = dict(model.patcher.model.named_parameters())
    for module, kohya in list(kohya_unet_names(model.family.unet, unet_params).items())[:12]:
        weight = unet_params[module + ".weight"]
        if weight.ndim == 2:
            layers[kohya] = LoraDelta(torch.randn(weight.shape[0], 2, generator=gen),
                                      torch.randn(2, weight.shape[1], generator=gen), alpha=2.0)
    text_params = dict(clip.patchers["l"].model.named_parameters())
    for module, kohya in list(kohya_text_names(clip.text)["l"].items())[:8]:
        weight = text_params[module + ".weight"]
        if weight.ndim == 2:
            layers[kohya] = LoraDelta(torch.randn(weight.shape[0], 2, generator=gen),
                                      torch.randn(2, weight.shape[1], generator=gen))
    assert len(layers) > 4
    (engine.env.models_dir / "loras").mkdir(parents=True, exist_ok=True)
    save_lora(engine.env.models_dir / "loras" / "style.safetensors", layers)
    base = latent_of(engine, txt2img())
    prompt = txt2img()
    prompt["10"] = {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1],
                                                           "lora_name": "style.safetensors",
                                                           "strength_model": 1.0, "strength_clip": 1.0}}
    for node in ("6", "7"):
        prompt[node]["inputs"]["clip"] = ["10", 1]
    prompt["3"]["inputs"]["model"] = ["10", 0]
    assert not torch.allclose(latent_of(engine, prompt), base)
    prompt["10"]["inputs"].update(strength_model=0.0, strength_clip=0.0)
    torch.testing.assert_close(latent_of(engine, prompt), base)
    only_model = txt2img()
    only_model["10"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["4", 0],
                                                                        "lora_name": "style.safetensors",
                                                                        "strength_model": 0.5}}
    only_model["3"]["inputs"]["model"] = ["10", 0]
    assert not torch.allclose(latent_of(engine, only_model), base)
    torch.testing.assert_close(latent_of(engine, txt2img()), base)  # the shared weights were restored


def test_clip_set_last_layer_changes_conditioning(engine):
    prompt = txt2img()
    prompt["11"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["4", 1], "stop_at_clip_layer": -2}}
    prompt["12"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["11", 0]}}
    prompt["3"]["inputs"].update(positive=["12", 0], negative=["6", 0])
    skipped = engine.outputs(prompt, "12")[0][0][0][0]
    plain = engine.outputs(prompt, "6")[0][0][0][0]
    assert skipped.shape == plain.shape and not torch.allclose(skipped, plain)


def test_sdxl_base_then_refiner(engine):
    prompt = txt2img(ckpt="sdxl.safetensors")
    prompt["6"] = {"class_type": "CLIPTextEncodeSDXL", "inputs": {
        "clip": ["4", 1], "width": 64, "height": 64, "crop_w": 0, "crop_h": 0, "target_width": 64,
        "target_height": 64, "text_g": "a red circle", "text_l": "a red circle, sharp"}}
    prompt["50"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sdxl-refiner.safetensors"}}
    prompt["51"] = {"class_type": "CLIPTextEncodeSDXLRefiner", "inputs": {"ascore": 6.0, "width": 64,
                                                                          "height": 64, "text": "a red circle",
                                                                          "clip": ["50", 1]}}
    prompt["52"] = {"class_type": "CLIPTextEncodeSDXLRefiner", "inputs": {"ascore": 2.5, "width": 64,
                                                                          "height": 64, "text": "blue",
                                                                          "clip": ["50", 1]}}
    prompt["53"] = advanced(2, 10000, "disable", "disable", ["3", 0])
    prompt["53"]["inputs"].update(model=["50", 0], positive=["51", 0], negative=["52", 0])
    prompt["3"] = advanced(0, 2, "enable", "enable", ["5", 0])
    prompt["8"]["inputs"].update(samples=["53", 0], vae=["4", 2])
    result = engine.run(prompt)
    assert result.outputs["9"]["images"]
    cond = engine.outputs(prompt, "6")[0][0][0]
    # CLIP-L's and bigG's hidden states side by side (the tiny files' widths: 16 + 16), pooled from bigG
    assert cond[0].shape == (1, 77, 16 + 16)
    assert cond[1]["pooled_output"].shape == (1, 16)
    assert cond[1]["target_width"] == 64
    _, clip, _ = load_checkpoint_handles(engine.env, "sdxl.safetensors")
    direct, _ = clip.encode({"g": "a red circle", "l": "a red circle, sharp"})
    torch.testing.assert_close(cond[0], direct)
    same, _ = clip.encode({"g": "a red circle", "l": "a red circle"})  # text_l goes to the first 16 columns
    assert not torch.allclose(cond[0][..., :16], same[..., :16])
    torch.testing.assert_close(cond[0][..., 16:], same[..., 16:])


def v_model_reference(unet, cond, uncond, schedule, noise, steps, cfg, prediction):
    """KSampler(euler, normal) written out from the UNet alone: sigmas at timesteps linspace(999, 0, steps)
    (log-sigma interpolated), the UNet fed x / sqrt(sigma^2 + 1) at the nearest integer timestep, CFG, and
    the prediction turned into x0: v -> x / (sigma^2 + 1) - v * sigma / sqrt(sigma^2 + 1), eps -> x - sigma * eps."""
    log_sigmas = schedule.sigmas.double().log()

    def sigma_at(t: float) -> float:
        low = math.floor(t)
        high, w = min(low + 1, len(log_sigmas) - 1), t - low
        return math.exp((1 - w) * log_sigmas[low] + w * log_sigmas[high])

    sigmas = [sigma_at(float(t)) for t in torch.linspace(len(log_sigmas) - 1, 0, steps)] + [0.0]
    x = noise * math.sqrt(1 + sigmas[0] ** 2)  # starting from the top of the schedule, as ComfyUI
    for sigma, next_sigma in itertools.pairwise(sigmas):
        t = torch.tensor([float((log_sigmas - math.log(sigma)).abs().argmin())])
        x_in = x / math.sqrt(sigma**2 + 1)
        with torch.no_grad():
            c, u = unet(x_in, t, cond), unet(x_in, t, uncond)
        out = u + cfg * (c - u)
        if prediction == "v":
            denoised = x / (sigma**2 + 1) - out * sigma / math.sqrt(sigma**2 + 1)
        else:
            denoised = x - sigma * out
        x = x + (x - denoised) / sigma * (next_sigma - sigma)  # euler
    return x


def test_sd2_v_prediction_and_inpainting_model(engine, monkeypatch):
    # fp32 whatever the CPU, so that the hand-written reference below agrees to float32 rounding
    engine.env.precision = "fp32"  # --force-fp32
    steps, cfg = 3, 5.0
    out = latent_of(engine, txt2img(ckpt="sd2-v.safetensors", steps=steps, cfg=cfg))
    model, clip, _ = load_checkpoint_handles(engine.env, "sd2-v.safetensors")
    assert model.family.prediction == "v" and model.dtype == torch.float32
    cond, uncond = clip.encode("a red circle")[0], clip.encode("blue")[0]
    noise = prepare_noise(torch.zeros(1, 4, 8, 8), 1)  # txt2img's seed
    expected = {prediction: v_model_reference(model.patcher.model, cond, uncond, model.model_sampling.schedule,
                                              noise, steps, cfg, prediction) / model.latent_scale
                for prediction in ("v", "eps")}
    # the engine batches cond and uncond in one call: a float32 difference only (measured 6e-5 on values up to 30)
    torch.testing.assert_close(out, expected["v"], rtol=1e-5, atol=5e-4)
    # read as eps, the same network gives something else entirely
    assert (expected["eps"] - out).abs().max() > 0.5 * out.abs().max()
    prompt = img2img(1.0)
    prompt["4"]["inputs"]["ckpt_name"] = "sd1-inpaint.safetensors"
    prompt["26"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}}
    prompt["27"] = {"class_type": "InpaintModelConditioning", "inputs": {
        "positive": ["6", 0], "negative": ["7", 0], "vae": ["4", 2], "pixels": ["20", 0], "mask": ["26", 0],
        "noise_mask": True}}
    prompt["3"]["inputs"].update(positive=["27", 0], negative=["27", 1], latent_image=["27", 2])
    positive = engine.outputs(prompt, "27")[0][0]
    assert positive[0][1]["concat_latent_image"].shape == (1, 4, 8, 8)
    assert torch.isfinite(latent_of(engine, prompt)).all()


def test_vae_tiled_and_encode_for_inpaint(engine):
    prompt = txt2img(size=128)
    prompt["60"] = {"class_type": "VAEDecodeTiled", "inputs": {"samples": ["3", 0], "vae": ["4", 2],
                                                               "tile_size": 64, "overlap": 32,
                                                               "temporal_size": 64, "temporal_overlap": 8}}
    prompt["61"] = {"class_type": "PreviewImage", "inputs": {"images": ["60", 0]}}
    plain = engine.outputs(prompt, "8")[0][0]
    tiled = engine.outputs(prompt, "60")[0][0]
    assert tiled.shape == plain.shape == (1, 128, 128, 3)
    assert (tiled - plain).abs().mean() < 0.1
    prompt["62"] = {"class_type": "EmptyImage", "inputs": {"width": 70, "height": 66, "batch_size": 1, "color": 0}}
    prompt["63"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 70, "height": 66}}
    prompt["64"] = {"class_type": "VAEEncodeForInpaint", "inputs": {"pixels": ["62", 0], "vae": ["4", 2],
                                                                    "mask": ["63", 0], "grow_mask_by": 6}}
    prompt["3"]["inputs"]["latent_image"] = ["64", 0]
    latent = engine.outputs(prompt, "64")[0][0]
    assert latent["samples"].shape == (1, 4, 8, 8) and latent["noise_mask"].shape == (1, 1, 64, 64)
    _, _, vae = load_checkpoint_handles(engine.env, "sd1.safetensors")
    (tiled_latent,) = engine.registry.get("VAEEncodeTiled")().execute(torch.rand(1, 66, 70, 3), vae, 64, 32)
    assert tiled_latent["samples"].shape == (1, 4, 8, 8)


def test_previews_come_with_progress(tmp_path, model_dir):
    from tests.nodes.conftest import Engine

    engine = Engine(tmp_path / "data", model_dir, previews=True)
    engine.run(txt2img())
    previews = [d for e, d in engine.events if e == "preview"]
    assert len(previews) == 3 and previews[0]["node"] == "3"
    assert isinstance(previews[0]["image"], Image.Image) and previews[0]["image"].size == (8, 8)


def test_missing_checkpoint_is_a_validation_error(engine):
    from graph.validation import validate_prompt

    validation = validate_prompt(txt2img(ckpt="nope.safetensors"), engine.registry, engine.env)
    errors = validation.node_errors["4"]["errors"]
    assert errors[0]["type"] == "value_not_in_list" and "nope.safetensors" in errors[0]["details"]


def test_basic_guider_and_disable_noise(engine):
    prompt = txt2img(steps=3, cfg=1.0)
    prompt.update({
        "40": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "41": {"class_type": "BasicScheduler", "inputs": {"model": ["4", 0], "scheduler": "normal", "steps": 3,
                                                          "denoise": 1.0}},
        "42": {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}},
        "43": {"class_type": "BasicGuider", "inputs": {"model": ["4", 0], "conditioning": ["6", 0]}},
        "44": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["42", 0], "guider": ["43", 0],
                                                                 "sampler": ["40", 0], "sigmas": ["41", 0],
                                                                 "latent_image": ["5", 0]}},
        "45": {"class_type": "DisableNoise", "inputs": {}},
        "46": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["45", 0], "guider": ["43", 0],
                                                                 "sampler": ["40", 0], "sigmas": ["41", 0],
                                                                 "latent_image": ["5", 0]}},
        "47": {"class_type": "LatentBatch", "inputs": {"samples1": ["44", 0], "samples2": ["46", 0]}},
        "48": {"class_type": "VAEDecode", "inputs": {"samples": ["47", 0], "vae": ["4", 2]}},
        "49": {"class_type": "PreviewImage", "inputs": {"images": ["48", 0]}},
    })
    # BasicGuider is cfg 1 on the positive prompt: the same as KSampler at cfg 1.0 with the same seed
    torch.testing.assert_close(engine.outputs(prompt, "44")[0][0]["samples"], latent_of(engine, prompt))
    silent = engine.outputs(prompt, "46")[0][0]["samples"]
    noisy = engine.outputs(prompt, "44")[0][0]["samples"]
    assert torch.isfinite(silent).all() and not torch.allclose(silent, noisy)  # no noise: a different start


def test_vae_loader_standalone_file(engine):
    from diffusion.checkpoints.random_checkpoints import write_random_vae

    (engine.env.models_dir / "vae").mkdir(parents=True, exist_ok=True)
    write_random_vae(engine.env.models_dir / "vae" / "bare.safetensors", prefix=False, seed=4)
    prompt = txt2img()
    prompt["13"] = {"class_type": "VAELoader", "inputs": {"vae_name": "bare.safetensors"}}
    prompt["8"]["inputs"]["vae"] = ["13", 0]
    with_own = engine.outputs(prompt, "8")[0][0]
    assert with_own.shape == (1, 64, 64, 3)
    assert not torch.allclose(with_own, engine.outputs(txt2img(), "8")[0][0])


def test_vae_splits_batches_to_fit_and_falls_back_to_tiles(engine, model_dir, monkeypatch):
    # fp32 weights whatever the CPU (the engine's handle is bf16 on CPUs with native bf16 matmuls): two batch
    # layouts of the same decode then differ by float32 summation order only (measured: 4e-6 on raw outputs).
    _, _, vae = wrap_checkpoint(load_checkpoint(model_dir / "sd1.safetensors", dtype=torch.float32),
                                engine.env.model_manager())
    assert vae.dtype == torch.float32
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    whole = vae.decode(latents)
    calls = []
    decode = vae.vae.decode
    monkeypatch.setattr(vae.vae, "decode", lambda z: calls.append(z.shape[0]) or decode(z))
    monkeypatch.setattr(vae.manager, "available", lambda: 2 * vae.image_bytes(64 * 64))
    split = vae.decode(latents)
    assert calls == [2, 2]  # room for two images at a time
    torch.testing.assert_close(split, whole, atol=1e-5, rtol=0)

    # what CUDA says, and what the CPU allocator says on Linux and on Windows
    for message in ("CUDA out of memory. Tried to allocate 2.00 GiB",
                    "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried "
                    "to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)",
                    "DefaultCPUAllocator: not enough memory: you tried to allocate 68719476736 bytes."):
        sizes = []

        def out_of_memory(z, message=message, sizes=sizes):  # a device that only fits latents up to 16 wide
            sizes.append(z.shape[-1])
            if z.shape[-1] > 16:
                raise RuntimeError(message)
            return decode(z)

        monkeypatch.setattr(vae.vae, "decode", out_of_memory)
        big = torch.randn(2, 4, 32, 32)
        tiled = vae.decode(big)
        assert tiled.shape == (2, 256, 256, 3) and max(sizes[1:]) <= 16, message  # retried tile by tile
    monkeypatch.setattr(vae.vae, "decode", lambda z: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):  # other errors are not swallowed
        vae.decode(latents)
