"""unCLIP: the noise augmentor (schedule against diffusers', the noising formula by hand), the ADM vector of
SD2.1 unCLIP checkpoints reaching the UNet's `label_emb`, SDXL revision replacing the pooled text embedding,
detection of unCLIP checkpoints, and the errors for image conditioning a model cannot take."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from diffusion.checkpoints.families import detect_family
from diffusion.checkpoints.loader import load_checkpoint
from diffusion.checkpoints.random_checkpoints import checkpoint_layout, write_random_checkpoint
from diffusion.checkpoints.random_unclip import unclip_spec, write_random_unclip_checkpoint
from diffusion.handles import wrap_checkpoint
from diffusion.memory import ModelManager
from diffusion.models.clip_vision import ClipVisionOutput
from diffusion.models.unclip import (
    NoiseAugmentor,
    revision_pooled,
    squaredcos_alphas_cumprod,
    unclip_adm,
)
from diffusion.models.unet import sdxl_adm
from diffusion.models.unet_blocks import timestep_embedding


def vision_output(width: int = 16, images: int = 1, seed: int = 0) -> ClipVisionOutput:
    gen = torch.Generator().manual_seed(seed)
    embeds = torch.randn(images, width, generator=gen)
    hidden = torch.randn(images, 5, 8, generator=gen)
    return ClipVisionOutput(embeds, hidden, hidden)


def entry(output: ClipVisionOutput, strength: float = 1.0, augmentation: float = 0.0) -> dict:
    return {"clip_vision_output": output, "strength": strength, "noise_augmentation": augmentation}


def test_squaredcos_schedule_matches_diffusers():
    ours = squaredcos_alphas_cumprod(1000)
    theirs = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").alphas_cumprod
    assert torch.allclose(ours, theirs.float(), rtol=1e-5, atol=1e-7)


def test_noising_by_hand_with_the_files_statistics():
    dim = 8
    gen = torch.Generator().manual_seed(5)
    mean, std = torch.randn(1, dim, generator=gen), torch.rand(1, dim, generator=gen) + 0.5
    acp = squaredcos_alphas_cumprod()
    augmentor = NoiseAugmentor.from_state_dict({"noise_augmentor.alphas_cumprod": acp,
                                                "noise_augmentor.data_mean": mean,
                                                "noise_augmentor.data_std": std}, dim)
    x = torch.randn(2, dim, generator=gen)
    level = augmentor.level(0.5)
    assert level == 500  # round(999 * 0.5) = round(499.5), half to even
    noised, level_emb = augmentor(x, level, torch.Generator().manual_seed(9))
    noise = torch.randn(2, dim, generator=torch.Generator().manual_seed(9))
    expected = ((x - mean) / std * acp[level].sqrt() + (1 - acp[level]).sqrt() * noise) * std + mean
    assert torch.allclose(noised, expected, atol=1e-5)
    assert torch.allclose(level_emb, timestep_embedding(torch.tensor([500.0, 500.0]), dim), atol=1e-6)
    with pytest.raises(ValueError, match="data_std has 3 values"):
        NoiseAugmentor.from_state_dict({"noise_augmentor.data_std": torch.ones(3)}, dim)


def test_adm_vector_strength_sum_and_determinism():
    augmentor = NoiseAugmentor.default(16)
    one = vision_output(seed=1)
    a = unclip_adm([entry(one, 1.0, 0.0)], augmentor)
    assert torch.equal(a, unclip_adm([entry(one, 1.0, 0.0)], augmentor))  # same noise every call
    assert a.shape == (1, 32)
    # noise augmentation 0 barely moves the embedding (ᾱ_0 ≈ 1); 1.0 replaces it with noise
    assert (a[:, :16] - one.image_embeds).abs().max() < 0.02
    assert torch.allclose(a[:, 16:], timestep_embedding(torch.zeros(1), 16))
    full = unclip_adm([entry(one, 1.0, 1.0)], augmentor)
    assert torch.allclose(full[:, 16:], timestep_embedding(torch.full((1,), 999.0), 16))
    assert float(torch.nn.functional.cosine_similarity(full[:, :16], one.image_embeds).abs()) < 0.9
    assert torch.allclose(unclip_adm([entry(one, -2.5, 0.0)], augmentor), -2.5 * a)  # strength scales both halves
    assert torch.equal(unclip_adm([], augmentor), torch.zeros(1, 32))
    # two images: their vectors summed, the sum's embedding half noised again at level 0
    two = unclip_adm([entry(one), entry(vision_output(seed=2), 0.5)], augmentor)
    first = unclip_adm([entry(one)], augmentor)
    assert torch.allclose(two[:, 16:], timestep_embedding(torch.zeros(1), 16))
    assert not torch.allclose(two, first)
    with pytest.raises(ValueError, match="image embedding is 8 wide; this model's unCLIP input takes 16"):
        unclip_adm([entry(vision_output(8))], augmentor)


@pytest.fixture(scope="module")
def unclip_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("unclip") / "unclip.safetensors"
    write_random_unclip_checkpoint(path, seed=3)
    loaded = load_checkpoint(path, dtype=torch.float32)
    return wrap_checkpoint(loaded, ModelManager("cpu"))


def test_unclip_checkpoint_is_detected_and_loads_its_augmentor(unclip_model):
    model, _, _ = unclip_model
    assert model.family.unclip and model.family.name == "sd2" and model.family.prediction == "v"
    assert model.family.title == "SD2.x unCLIP (v-prediction)"
    assert model.noise_augmentor is not None and model.noise_augmentor.dim == 16
    assert torch.allclose(model.noise_augmentor.alphas_cumprod, squaredcos_alphas_cumprod())
    spec, _ = unclip_spec("real")
    real = detect_family(checkpoint_layout(spec), prediction="v")
    assert real.unclip and real.unet.adm_in_channels == 2048


def test_the_unets_adm_input_receives_the_image_embedding(unclip_model):
    model, clip, _ = unclip_model
    cond, _ = clip.encode("a photo")
    output = vision_output(seed=4)
    positive = [(cond, {"unclip_conditioning": [entry(output, 0.8, 0.1)]})]
    negative = [(cond, {})]
    seen = []
    unet = model.patcher.model
    handle = unet.label_emb.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    try:
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        with model.denoiser() as denoiser:
            model.guider(denoiser, positive, negative, cfg=2.0)(x, torch.tensor([3.0]))
    finally:
        handle.remove()
    expected = unclip_adm([entry(output, 0.8, 0.1)], model.noise_augmentor)
    rows = seen[0]
    assert rows.shape == (2, 32)
    matches = [torch.allclose(row, expected[0], atol=1e-6) for row in rows]
    zeros = [torch.equal(row, torch.zeros(32)) for row in rows]
    assert sorted(matches) == [False, True] and sorted(zeros) == [False, True]  # cond: the image; uncond: zeros


def test_sdxl_revision_replaces_the_pooled_text_embedding(tmp_path):
    path = tmp_path / "sdxl.safetensors"
    write_random_checkpoint(path, "sdxl")
    model, clip, _ = wrap_checkpoint(load_checkpoint(path, dtype=torch.float32), ModelManager("cpu"))
    _, pooled = clip.encode("a car")
    output = vision_output(pooled.shape[-1], seed=6)
    x = torch.zeros(1, 4, 8, 8)
    plain = model.extra_cond({"pooled_output": pooled}, x)["y"]
    unclip = [entry(output, 0.75, 0.0)]
    revised = model.extra_cond({"pooled_output": pooled, "unclip_conditioning": unclip}, x)["y"]
    width = pooled.shape[-1]
    image_pooled = revision_pooled(unclip, width)
    assert torch.allclose(revised[:, :width], image_pooled)
    assert not torch.allclose(revised[:, :width], pooled)
    assert torch.equal(revised[:, width:], plain[:, width:])  # the size embeddings stay
    assert torch.allclose(revised, sdxl_adm(image_pooled, 64, 64, adm_in_channels=revised.shape[-1]))
    assert (image_pooled - 0.75 * output.image_embeds).abs().max() < 0.02  # level 0: nearly the embedding itself
    with pytest.raises(ValueError, match=r"SDXL revision: the image embedding is \[8\] wide.*pooled text embedding "
                                         rf"is {width}"):
        model.extra_cond({"pooled_output": pooled, "unclip_conditioning": [entry(vision_output(8))]}, x)


def test_unclip_conditioning_on_sd1_is_a_clear_error(tmp_path):
    path = tmp_path / "sd1.safetensors"
    write_random_checkpoint(path, "sd1")
    model, _, _ = wrap_checkpoint(load_checkpoint(path, dtype=torch.float32), ModelManager("cpu"))
    with pytest.raises(ValueError, match=r"unCLIPConditioning does not apply to a SD1\.x \(eps-prediction\) model"):
        model.extra_cond({"unclip_conditioning": [entry(vision_output())]}, torch.zeros(1, 4, 8, 8))
    assert model.extra_cond({}, torch.zeros(1, 4, 8, 8)) == {}
