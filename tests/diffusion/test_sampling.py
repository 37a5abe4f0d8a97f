"""KSampler-level flow: sigmas for denoise/steps, step slicing, seeds, inpainting, model sampling, previews."""

from __future__ import annotations

import pytest
import torch

from diffusion.preview import encode_preview_jpeg, fit_latent_rgb_projection, latent_preview_image
from diffusion.sampling.ksampler import ksampler_sigmas, sample, slice_sigmas
from diffusion.sampling.model_sampling import Denoiser, ModelSampling
from diffusion.sampling.noise import BrownianNoiseSampler, prepare_noise, seeded_noise_sampler
from diffusion.sampling.schedules import DiscreteSchedule, calculate_sigmas


@pytest.fixture(scope="module")
def ms() -> ModelSampling:
    return ModelSampling(DiscreteSchedule.from_config())


def toy_model(x, sigma, **kwargs):
    s = sigma.reshape(-1, 1, 1, 1)
    return (0.25 * x + s**2 * 0.1) / (0.25 + s**2) + 0.05 * torch.tanh(x)


def test_denoise_keeps_the_tail_of_a_longer_schedule(ms):
    full = calculate_sigmas(ms.schedule, "karras", 40)
    torch.testing.assert_close(ksampler_sigmas(ms.schedule, "karras", 20, denoise=0.5), full[-21:])
    assert ksampler_sigmas(ms.schedule, "normal", 20, denoise=0.0).numel() == 0
    torch.testing.assert_close(ksampler_sigmas(ms.schedule, "normal", 20), calculate_sigmas(ms.schedule, "normal", 20))


def test_discard_penultimate(ms):
    longer = calculate_sigmas(ms.schedule, "normal", 11)
    sig = ksampler_sigmas(ms.schedule, "normal", 10, sampler_name="dpm_2")
    assert len(sig) == 11
    torch.testing.assert_close(sig, torch.cat([longer[:-2], longer[-1:]]))
    with pytest.raises(ValueError, match="unknown sampler"):
        ksampler_sigmas(ms.schedule, "normal", 10, sampler_name="bogus")


def test_slice_sigmas():
    sig = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    assert slice_sigmas(sig, 0, 2).tolist() == [5.0, 4.0, 3.0]
    assert slice_sigmas(sig, 0, 2, force_full_denoise=True).tolist() == [5.0, 4.0, 0.0]
    assert slice_sigmas(sig, 2, 10000).tolist() == [3.0, 2.0, 1.0, 0.0]
    assert slice_sigmas(sig, 5, 10000).numel() == 0
    assert sig.tolist() == [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]  # input untouched


def test_noise_is_seeded_and_per_index():
    latent = torch.zeros(3, 4, 8, 8)
    a, b = prepare_noise(latent, 42), prepare_noise(latent, 42)
    assert torch.equal(a, b) and a.dtype == torch.float32
    assert not torch.equal(a, prepare_noise(latent, 43))
    by_index = prepare_noise(latent, 42, batch_index=[0, 1, 2])
    assert not torch.equal(by_index[0], by_index[1])
    alone = prepare_noise(torch.zeros(1, 4, 8, 8), 42, batch_index=[2])
    mixed = prepare_noise(latent, 42, batch_index=[5, 2, 0])
    assert torch.equal(alone[0], by_index[2]) and torch.equal(mixed[1], by_index[2])
    assert torch.equal(mixed[2], by_index[0])
    assert torch.equal(prepare_noise(torch.zeros(1, 4, 8, 8), 42)[0], by_index[0])
    with pytest.raises(ValueError, match="batch_index has 2 entries"):
        prepare_noise(latent, 1, batch_index=[0, 1])


def test_noise_samplers_are_reproducible():
    x = torch.zeros(1, 2, 4, 4)
    s1, s2 = seeded_noise_sampler(x, 3), seeded_noise_sampler(x, 3)
    first = s1(1.0, 0.5)
    assert torch.equal(first, s2(1.0, 0.5)) and not torch.equal(first, s1(0.5, 0.2))
    b1, b2 = BrownianNoiseSampler(x, 3), BrownianNoiseSampler(x, 3)
    assert torch.equal(b1(10.0, 5.0), b2(10.0, 5.0))


def test_brownian_noise_has_brownian_covariance():
    """Noise of a sub-interval and of the whole interval correlate by sqrt(sub / whole)."""
    x = torch.zeros(20000)
    b = BrownianNoiseSampler(x, 0)
    whole = b(4.0, 0.0)
    half = b(4.0, 3.0)  # queried after the whole interval: drawn from the bridge
    assert whole.std().item() == pytest.approx(1, abs=0.03) and half.std().item() == pytest.approx(1, abs=0.03)
    assert (whole * half).mean().item() == pytest.approx((1 / 4) ** 0.5, abs=0.03)


def test_same_seed_same_result_and_denoise_zero(ms):
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigmas = ksampler_sigmas(ms.schedule, "karras", 6, sampler_name="euler_ancestral")
    runs = [sample(toy_model, "euler_ancestral", sigmas, latent, prepare_noise(latent, 9), model_sampling=ms, seed=9)
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    other = sample(toy_model, "euler_ancestral", sigmas, latent, prepare_noise(latent, 10), model_sampling=ms, seed=10)
    assert not torch.allclose(runs[0], other)
    empty = ksampler_sigmas(ms.schedule, "karras", 6, denoise=0.0)
    out = sample(toy_model, "euler", empty, latent, prepare_noise(latent, 9), model_sampling=ms, seed=9)
    assert torch.equal(out, latent)


def test_start_at_max_sigma_scales_noise_like_comfyui(ms):
    latent = torch.zeros(1, 1, 2, 2)
    noise = torch.ones(1, 1, 2, 2)
    seen = []
    sigmas = torch.tensor([ms.sigma_max, 0.0])
    sample(toy_model, "euler", sigmas, latent, noise, model_sampling=ms, seed=0, callback=seen.append)
    assert seen[0]["x"][0, 0, 0, 0].item() == pytest.approx((1 + ms.sigma_max**2) ** 0.5, rel=1e-6)
    sample(toy_model, "euler", torch.tensor([3.0, 0.0]), latent, noise, model_sampling=ms, seed=0, callback=seen.append)
    assert seen[1]["x"][0, 0, 0, 0].item() == pytest.approx(3.0)


@pytest.mark.parametrize("sampler_name", ["euler", "heun", "ddim"])
def test_split_run_equals_full_run(ms, sampler_name):
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = prepare_noise(latent, 5)
    sigmas = ksampler_sigmas(ms.schedule, "normal", 12, sampler_name=sampler_name)
    full = sample(toy_model, sampler_name, sigmas, latent, noise, model_sampling=ms, seed=5)
    first = sample(toy_model, sampler_name, slice_sigmas(sigmas, 0, 5, force_full_denoise=False), latent, noise,
                   model_sampling=ms, seed=5)
    second = sample(toy_model, sampler_name, slice_sigmas(sigmas, 5, 10000), first, noise, add_noise=False,
                    model_sampling=ms, seed=5)
    torch.testing.assert_close(second, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler_name", ["euler", "ddim", "dpmpp_2m_sde"])
def test_inpainting_preserves_unmasked_latent(ms, sampler_name):
    latent = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 8:40] = 1.0  # image resolution; resized to the latent
    sigmas = ksampler_sigmas(ms.schedule, "karras", 6)
    inputs = []

    def model(x, sigma):
        inputs.append((x.clone(), sigma.clone()))
        return toy_model(x, sigma)

    out = sample(model, sampler_name, sigmas, latent, prepare_noise(latent, 3), noise_mask=mask, model_sampling=ms,
                 seed=3)
    outside = torch.ones(8, 8, dtype=torch.bool)
    outside[1:7, 0:6] = False  # bilinear edges of the resized mask are fractional: test the fully kept cells
    assert torch.equal(out[:, :, outside], latent[:, :, outside])
    assert not torch.allclose(out[:, :, 3, 2], latent[:, :, 3, 2])
    # At every call the kept region is the input latent re-noised to the current sigma.
    noise = prepare_noise(latent, 3)
    if sampler_name == "ddim":
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(4))
    for x, sigma in inputs:
        expected = latent + noise * sigma.reshape(-1, 1, 1, 1)
        torch.testing.assert_close(x[:, :, outside], expected[:, :, outside], rtol=1e-5, atol=1e-5)


def test_model_sampling_eps_and_v(ms):
    x = torch.randn(2, 4, 4, 4)
    sigma = torch.tensor([1.5, 0.3])
    received = {}

    def net(x_in, t, context=None):
        received.update(x_in=x_in, t=t, context=context)
        return torch.full_like(x_in, 0.5)

    out = Denoiser(net, ms)(x, sigma, context=torch.ones(1))
    s = sigma.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(received["x_in"], x / (s**2 + 1).sqrt())
    torch.testing.assert_close(received["t"], ms.schedule.sigma_to_t(sigma, quantize=True))
    assert received["t"].tolist() == [round(v) for v in received["t"].tolist()]
    torch.testing.assert_close(out, x - s * 0.5)
    v_ms = ModelSampling(ms.schedule, "v_prediction")
    out_v = Denoiser(net, v_ms)(x, sigma)
    torch.testing.assert_close(out_v, x / (s**2 + 1) - 0.5 * s / (s**2 + 1).sqrt())
    # The v target of a clean x0 recovers x0 exactly.
    x0, eps = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    x_noisy = x0 + s * eps
    alpha, sig_vp = 1 / (s**2 + 1).sqrt(), s / (s**2 + 1).sqrt()
    v = alpha * eps - sig_vp * x0
    torch.testing.assert_close(v_ms.calculate_denoised(sigma, v, x_noisy), x0, rtol=1e-5, atol=1e-5)
    assert ms.noise_scaling(2.0, torch.ones(1), torch.zeros(1)).item() == 2.0
    assert ms.inverse_noise_scaling(0.0, x) is x
    assert ms.percent_to_sigma(0.0) == float("inf") and ms.percent_to_sigma(1.0) == 0.0
    assert ms.percent_to_sigma(0.5) == pytest.approx(ms.schedule.t_to_sigma(torch.tensor(499.5)).item())
    with pytest.raises(ValueError, match="unknown prediction type"):
        ModelSampling(ms.schedule, "sample")  # x0 is known since ModelSamplingDiscrete


def test_preview_projection_inverts_a_linear_encoder():
    mix = torch.tensor([[0.9, -0.3, 0.2, 0.5], [0.1, 0.8, -0.4, 0.2], [-0.3, 0.2, 0.7, 0.4]])  # rgb -> 4 channels
    offset = torch.tensor([0.1, -0.2, 0.05, 0.3])

    def encode(images):  # BHWC in 0..1 -> an 8x smaller latent, linear in the pooled colour
        pooled = torch.nn.functional.avg_pool2d(images.movedim(-1, 1), 8)
        return torch.einsum("bchw,cl->blhw", pooled, mix) + offset[:, None, None]

    proj = fit_latent_rgb_projection(encode)
    colours = torch.rand(5, 16, 16, 3)
    latents = encode(colours.repeat_interleave(8, dim=1).repeat_interleave(8, dim=2))
    recovered = torch.stack([proj(latent) for latent in latents])
    torch.testing.assert_close(recovered, colours, rtol=1e-4, atol=1e-4)
    image = latent_preview_image(torch.randn(1, 4, 96, 80), proj, max_size=64)
    assert image.mode == "RGB" and max(image.size) == 64
    jpeg = encode_preview_jpeg(image)
    assert jpeg[:2] == b"\xff\xd8"
    with pytest.raises(ValueError, match="C = 4"):
        latent_preview_image(torch.randn(3, 8, 8), proj)


def test_sa_solver_gets_the_models_own_schedule(ms, monkeypatch):
    """Its noise window is the model's sigmas at 20 % and 80 %: KSampler passes the model's sampling."""
    from diffusion.sampling import sampler_registry

    seen = {}

    def recorder(model, x, sigmas, model_sampling=None, **kwargs):
        seen["model_sampling"] = model_sampling
        return x

    latent = torch.zeros(1, 4, 8, 8)
    sigmas = ksampler_sigmas(ms.schedule, "karras", 4)
    for name in ("sa_solver", "sa_solver_pece"):
        monkeypatch.setitem(sampler_registry.SAMPLERS, name, recorder)
        seen.clear()
        sample(toy_model, name, sigmas, latent, prepare_noise(latent, 1), model_sampling=ms, seed=1)
        assert seen["model_sampling"] is ms, name
    monkeypatch.setitem(sampler_registry.SAMPLERS, "euler", recorder)
    seen.clear()
    sample(toy_model, "euler", sigmas, latent, prepare_noise(latent, 1), model_sampling=ms, seed=1)
    assert seen["model_sampling"] is None  # samplers without the option are not given it
