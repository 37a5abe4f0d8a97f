"""The SVD MODEL handle, file detection and per-frame guidance on a tiny random SVD file: the guided denoiser equals a
hand-assembled EDM v-prediction step of the UNet (context, ADM vector, concatenated image latent, clip length), the
family and sampling come out of the file, and wrong files are named."""

from __future__ import annotations

import pytest
import torch

from diffusion.checkpoints.families import FamilyError, detect_family
from diffusion.checkpoints.files import CheckpointError, read_state_dict
from diffusion.checkpoints.random_checkpoints import write_random_checkpoint
from diffusion.checkpoints.random_svd import svd_layout, svd_spec, write_random_svd_checkpoint
from diffusion.checkpoints.svd_files import detect_svd, load_svd_checkpoint
from diffusion.memory import ModelManager
from diffusion.models.svd_unet import svd_adm
from diffusion.models.svd_vae import SVDAutoencoder
from diffusion.models.vae import AutoencoderKL
from diffusion.patches.unet_patches import UNetPatches
from diffusion.sampling.guidance import GuidanceStep
from diffusion.sampling.model_sampling import ContinuousModelSampling
from diffusion.sampling.video_guidance import frame_cfg_hooks, frame_cfg_scales
from diffusion.svd_handle import SVDModel, concat_latent, wrap_svd


@pytest.fixture(scope="module")
def svd_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("svd") / "svd.safetensors"
    write_random_svd_checkpoint(path, seed=3)
    return path


def test_loads_family_sampling_and_modules(svd_file):
    loaded = load_svd_checkpoint(svd_file)
    family = loaded.family
    assert family.name == "svd" and family.title == "Stable Video Diffusion (v-prediction)"
    assert family.unet == svd_spec().unet and family.continuous == (0.002, 700.0)
    assert isinstance(loaded.vae, SVDAutoencoder)
    assert loaded.clip_vision.config.projection_dim == family.unet.context_dim
    model, vision, vae = wrap_svd(loaded, ModelManager("cpu"))
    assert isinstance(model, SVDModel) and isinstance(model.clone(), SVDModel)
    assert vision.patcher.model is loaded.clip_vision and vae.vae is loaded.vae and vae.downscale == 8
    ms = model.model_sampling
    assert isinstance(ms, ContinuousModelSampling) and ms.prediction == "v_prediction" and ms.sigma_data == 1.0
    assert ms.sigma_min == pytest.approx(0.002) and ms.sigma_max == pytest.approx(700.0)
    assert float(ms.timestep(torch.tensor([2.0]))) == pytest.approx(0.25 * torch.log(torch.tensor(2.0)).item())


def test_guided_denoiser_is_the_hand_assembled_unet_step(svd_file):
    loaded = load_svd_checkpoint(svd_file, dtype=torch.float32)
    model, _, _ = wrap_svd(loaded, ModelManager("cpu"))
    frames, gen = 4, torch.Generator().manual_seed(0)
    x = torch.randn(frames, 4, 2, 2, generator=gen) * 3.0
    embed = torch.randn(1, 1, 16, generator=gen)
    image_latent = torch.randn(1, 4, 2, 2, generator=gen)
    options = {"fps": 8, "motion_bucket_id": 60, "augmentation_level": 0.1, "concat_latent_image": image_latent}
    positive = [(embed, options)]
    negative = [(torch.zeros_like(embed), {**options, "concat_latent_image": torch.zeros_like(image_latent)})]
    sigma = torch.tensor(3.0)
    cfg = 2.5
    with model.denoiser() as denoiser, torch.no_grad():
        got = model.guider(denoiser, positive, negative, cfg)(x, sigma)

    def by_hand(context: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        c_in = 1 / (sigma**2 + 1).sqrt()
        y = svd_adm(8, 60, 0.1, 24).expand(frames, -1)
        inp = torch.cat([x * c_in, latent.expand(frames, -1, -1, -1)], dim=1)
        with torch.no_grad():
            v = loaded.unet(inp, (0.25 * sigma.log()).expand(frames), context.expand(frames, -1, -1), y, frames)
        return x / (sigma**2 + 1) - v * sigma / (sigma**2 + 1).sqrt()

    cond, uncond = by_hand(embed, image_latent), by_hand(torch.zeros_like(embed), torch.zeros_like(image_latent))
    torch.testing.assert_close(got, uncond + cfg * (cond - uncond), rtol=1e-4, atol=1e-4)
    # the clip length reaches the temporal layers: one frame at a time gives another answer
    with model.denoiser() as denoiser, torch.no_grad():
        single = torch.cat([model.guider(denoiser, positive, negative, cfg)(x[i:i + 1], sigma) for i in range(frames)])
    assert (single - got).abs().max() > 1e-3


def test_unet_patches_are_refused_by_name(svd_file):
    model, _, _ = wrap_svd(load_svd_checkpoint(svd_file), ModelManager("cpu"))
    patched = model.with_unet_patches(UNetPatches(input_block=(lambda h, site: h,)))
    with pytest.raises(ValueError, match="not supported on Stable Video Diffusion"), patched.denoiser():
        pass
    with model.denoiser():  # the unpatched original still runs
        pass


def test_image_decoder_variant_loads_the_per_frame_decoder(tmp_path):
    path = tmp_path / "svd_image_decoder.safetensors"
    write_random_svd_checkpoint(path, seed=4, image_decoder=True)
    loaded = load_svd_checkpoint(path)
    assert isinstance(loaded.vae, AutoencoderKL) and not isinstance(loaded.vae, SVDAutoencoder)
    z = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():  # the file has no quant convs: the stand-ins change nothing
        torch.testing.assert_close(loaded.vae.decode(z), loaded.vae.decoder(z))
        torch.testing.assert_close(loaded.vae.encode(images), loaded.vae.encoder(images)[:, :4])


def test_concat_latent_is_resized_and_repeated():
    latent = torch.arange(2 * 4 * 4 * 8, dtype=torch.float32).reshape(2, 4, 4, 8)
    x = torch.zeros(4, 4, 2, 2)
    out = concat_latent(latent, x)
    assert out.shape == (4, 4, 2, 2)
    # rows picked evenly from the two images: first, first, second, second
    assert torch.equal(out[0], out[1]) and torch.equal(out[2], out[3]) and not torch.equal(out[0], out[3])
    assert torch.equal(concat_latent(None, x), torch.zeros_like(x))
    with pytest.raises(ValueError, match="channels"):
        concat_latent(torch.zeros(1, 8, 2, 2), x)


def test_frame_guidance_scales_by_hand():
    torch.testing.assert_close(frame_cfg_scales("linear", 5, 1.0, 3.0), torch.tensor([1.0, 1.5, 2.0, 2.5, 3.0]))
    torch.testing.assert_close(frame_cfg_scales("triangle", 5, 1.0, 3.0), torch.tensor([1.0, 2.0, 3.0, 2.0, 1.0]))
    hooks = frame_cfg_hooks("triangle", 1.0)
    cond, uncond = torch.ones(5, 4, 2, 2), torch.zeros(5, 4, 2, 2)
    step = GuidanceStep(cond, uncond, 3.0, cond, torch.ones(5), cond, None)
    torch.testing.assert_close(hooks.combine(step)[:, 0, 0, 0], torch.tensor([1.0, 2.0, 3.0, 2.0, 1.0]))
    step = GuidanceStep(cond * 2, cond, 5.0, cond, torch.ones(5), cond, None)  # uncond 1, cond 2: 1 + scale
    torch.testing.assert_close(frame_cfg_hooks("linear", 1.0).combine(step)[:, 0, 0, 0],
                               torch.tensor([2.0, 3.0, 4.0, 5.0, 6.0]))
    with pytest.raises(ValueError, match="unknown frame guidance"):
        frame_cfg_hooks("square", 1.0)


def test_real_size_layout_detects_as_svd():
    family = detect_svd(svd_layout(svd_spec("real")))
    assert family.unet == svd_spec("real").unet and family.vae.ch == 128
    params = sum(v.numel() for k, v in svd_layout(svd_spec("real")).items() if k.startswith("model.diffusion_model."))
    assert 1.52e9 < params < 1.53e9  # SVD's UNet: 1.52 B parameters


def test_wrong_files_are_named(svd_file, tmp_path):
    sd1 = tmp_path / "sd1.safetensors"
    write_random_checkpoint(sd1, "sd1")
    with pytest.raises(CheckpointError, match=r"sd1\.safetensors: this is an image model checkpoint \(SD1\.x "
                                              r"\(eps-prediction\)\), not a Stable Video Diffusion"):
        load_svd_checkpoint(sd1)
    with pytest.raises(FamilyError, match="ImageOnlyCheckpointLoader"):
        detect_family(read_state_dict(svd_file))
    sd = {k: v for k, v in read_state_dict(svd_file).items() if not k.startswith("conditioner.")}
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "no_vision.safetensors",
              {"latentloom.config": '{"unet": {"num_head_channels": 8, "norm_groups": 8}, "vae": {"norm_groups": 8}}'})
    with pytest.raises(CheckpointError, match="without its CLIP image encoder"):
        load_svd_checkpoint(tmp_path / "no_vision.safetensors")
