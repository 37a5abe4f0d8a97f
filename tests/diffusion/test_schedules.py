"""Noise schedules and schedulers: closed forms, reference vectors and diffusers' sigmas."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion.sampling.schedules import (
    SCHEDULER_NAMES,
    DiscreteSchedule,
    beta_ppf,
    calculate_sigmas,
    exponential_sigmas,
    karras_sigmas,
    kl_optimal_sigmas,
    make_betas,
)

SD_CONFIG = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


@pytest.fixture(scope="module")
def sd() -> DiscreteSchedule:
    return DiscreteSchedule.from_config()


def diffusers_schedule(cls, steps, **kwargs):
    sched = cls(**SD_CONFIG, **kwargs)
    sched.set_timesteps(steps)
    return sched, DiscreteSchedule(sched.alphas_cumprod)


def test_sd_reference_values(sd):
    assert sd.sigma_min == pytest.approx(0.029167, abs=1e-6)
    assert sd.sigma_max == pytest.approx(14.614641, abs=1e-5)
    k = karras_sigmas(20, sd.sigma_min, sd.sigma_max)
    assert k[:3].tolist() == pytest.approx([14.6146, 11.7254, 9.3402], abs=1e-4)
    assert k[-4:].tolist() == pytest.approx([0.0779, 0.0485, 0.0292, 0.0], abs=1e-4)


def test_betas_and_alphas_match_closed_form():
    betas = make_betas("scaled_linear")
    assert betas[0].item() == pytest.approx(0.00085) and betas[-1].item() == pytest.approx(0.012)
    assert torch.allclose(betas.sqrt().diff(), betas.sqrt().diff()[0].expand(999))
    sched = DiscreteSchedule.from_betas(betas)
    assert torch.allclose(sched.alphas_cumprod, torch.cumprod(1 - betas, 0))
    assert make_betas("linear")[500].item() == pytest.approx(0.00085 + 500 / 999 * (0.012 - 0.00085))
    cosine = DiscreteSchedule.from_config("cosine")
    t = 300 + 1
    expected = math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    assert cosine.alphas_cumprod[300].item() == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="unknown beta schedule 'quadratic'"):
        make_betas("quadratic")


def test_zero_terminal_snr_matches_diffusers():
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(**SD_CONFIG, rescale_betas_zero_snr=True)
    ours = DiscreteSchedule.from_config(zero_terminal_snr=True)
    torch.testing.assert_close(ours.alphas_cumprod[:-1].float(), ref.alphas_cumprod[:-1], rtol=1e-5, atol=1e-9)
    assert ours.sigma_max > 4000  # terminal level is (almost) pure noise
    assert ours.sigma_min == pytest.approx(DiscreteSchedule.from_config().sigma_min, rel=1e-6)


def test_sigma_t_round_trip(sd):
    sigmas = torch.tensor([0.05, 0.5, 1.0, 7.0, 14.0])
    t = sd.sigma_to_t(sigmas)
    torch.testing.assert_close(sd.t_to_sigma(t), sigmas, rtol=1e-5, atol=0)
    assert sd.sigma_to_t(torch.tensor(sd.sigma_max)).item() == 999.0
    assert sd.sigma_to_t(sd.sigmas[417], quantize=True).item() == 417
    assert sd.t_to_sigma(torch.tensor(417.0)).item() == pytest.approx(sd.sigmas[417].item(), rel=1e-6)
    # Between levels: linear in log sigma.
    mid = sd.t_to_sigma(torch.tensor(417.5)).item()
    assert mid == pytest.approx(math.sqrt(sd.sigmas[417].item() * sd.sigmas[418].item()), rel=1e-6)


@pytest.mark.parametrize("steps", [4, 10, 28])
def test_normal_equals_diffusers_linspace(steps):
    """999/(steps-1) integral: diffusers (linear in sigma) and we (linear in log sigma) interpolate the same points."""
    from diffusers import EulerDiscreteScheduler

    ref, ours = diffusers_schedule(EulerDiscreteScheduler, steps, timestep_spacing="linspace")
    torch.testing.assert_close(calculate_sigmas(ours, "normal", steps), ref.sigmas.float(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("steps", [8, 20, 25])
def test_simple_equals_diffusers_trailing(steps):
    from diffusers import EulerDiscreteScheduler

    ref, ours = diffusers_schedule(EulerDiscreteScheduler, steps, timestep_spacing="trailing")
    torch.testing.assert_close(calculate_sigmas(ours, "simple", steps), ref.sigmas.float(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("steps", [9, 27])
def test_sgm_uniform_equals_dpmsolver_timesteps(steps):
    """DPMSolverMultistep rounds linspace(999, 0, steps + 1)[:-1]; integral when steps divides 999."""
    from diffusers import DPMSolverMultistepScheduler

    ref, ours = diffusers_schedule(DPMSolverMultistepScheduler, steps)
    torch.testing.assert_close(calculate_sigmas(ours, "sgm_uniform", steps), ref.sigmas.float(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("scheduler", ["karras", "exponential"])
def test_karras_and_exponential_equal_diffusers(scheduler):
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    flag = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas"}[scheduler]
    ref, ours = diffusers_schedule(EulerDiscreteScheduler, 20, timestep_spacing="linspace", **{flag: True})
    torch.testing.assert_close(calculate_sigmas(ours, scheduler, 20), ref.sigmas.float(), rtol=1e-6, atol=1e-7)
    if scheduler == "karras":
        ref, ours = diffusers_schedule(DPMSolverMultistepScheduler, 15, use_karras_sigmas=True)
        torch.testing.assert_close(calculate_sigmas(ours, "karras", 15), ref.sigmas.float(), rtol=1e-6, atol=1e-7)


def test_ddim_uniform_equals_ddim_leading():
    from diffusers import DDIMScheduler

    ref, ours = diffusers_schedule(DDIMScheduler, 30, steps_offset=1, timestep_spacing="leading")
    expected = ((1 - ref.alphas_cumprod[ref.timesteps]) / ref.alphas_cumprod[ref.timesteps]).sqrt()
    sigmas = calculate_sigmas(ours, "ddim_uniform", 30)
    assert len(sigmas) == 31
    torch.testing.assert_close(sigmas[:-1], expected.float(), rtol=1e-6, atol=0)


def test_closed_form_schedules():
    k = karras_sigmas(5, 0.1, 10.0, rho=7.0)
    ramp = torch.linspace(0, 1, 5, dtype=torch.float64)
    expected = (10.0 ** (1 / 7) + ramp * (0.1 ** (1 / 7) - 10.0 ** (1 / 7))) ** 7
    torch.testing.assert_close(k[:-1].double(), expected, rtol=1e-6, atol=0)
    e = exponential_sigmas(5, 0.1, 10.0)
    assert e.tolist() == pytest.approx([10.0, 10 ** 0.5, 1.0, 0.1**0.5, 0.1, 0.0], rel=1e-6)
    kl = kl_optimal_sigmas(3, 0.1, 10.0)
    assert kl.tolist() == pytest.approx([10.0, math.tan((math.atan(10) + math.atan(0.1)) / 2), 0.1, 0.0], rel=1e-6)


def test_beta_quantiles():
    # Beta(1/2, 1/2) is the arcsine law: ppf(q) = sin^2(pi q / 2). Beta(1, 1) is uniform.
    for q in (0.01, 0.3, 0.5, 0.77, 0.999):
        assert beta_ppf(q, 0.5, 0.5) == pytest.approx(math.sin(math.pi * q / 2) ** 2, abs=1e-12)
        assert beta_ppf(q, 1.0, 1.0) == pytest.approx(q, abs=1e-12)
    scipy_stats = pytest.importorskip("scipy.stats")
    for q in (0.05, 0.4, 0.95):
        assert beta_ppf(q, 0.6, 0.6) == pytest.approx(scipy_stats.beta.ppf(q, 0.6, 0.6), abs=1e-10)


def test_beta_scheduler(sd):
    sigmas = calculate_sigmas(sd, "beta", 10)
    t = [round(beta_ppf(1 - i / 10, 0.6, 0.6) * 999) for i in range(10)]
    assert sigmas[:-1].tolist() == pytest.approx([sd.sigmas[i].item() for i in t])
    assert len(calculate_sigmas(sd, "beta", 900)) < 901  # coinciding timesteps are dropped


def test_linear_quadratic(sd):
    steps = 10
    sigmas = calculate_sigmas(sd, "linear_quadratic", steps)
    frac = 1 - sigmas / sd.sigma_max
    assert frac[:5].tolist() == pytest.approx([i * 0.025 / 5 for i in range(5)], abs=1e-6)
    assert frac[-1].item() == pytest.approx(1.0)
    # The quadratic continues the linear part with the same value and slope at step 5.
    quad = frac[5:].double()
    assert quad[0].item() == pytest.approx(0.025, abs=1e-6)
    second = quad[2] - 2 * quad[1] + quad[0]
    assert (quad[1] - quad[0] - second / 2).item() == pytest.approx(0.025 / 5, abs=1e-5)
    assert calculate_sigmas(sd, "linear_quadratic", 1).tolist() == pytest.approx([sd.sigma_max, 0.0])


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_every_scheduler_shape(sd, name):
    sigmas = calculate_sigmas(sd, name, 12)
    assert sigmas.dtype == torch.float32 and sigmas[-1] == 0
    assert len(sigmas) == 13
    assert (sigmas.diff() < 0).all()
    assert sigmas[0] <= sd.sigma_max * (1 + 1e-6)


def test_scheduler_names_and_errors(sd):
    assert SCHEDULER_NAMES == ("simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                               "linear_quadratic", "kl_optimal")
    with pytest.raises(ValueError, match="unknown scheduler 'fancy'"):
        calculate_sigmas(sd, "fancy", 10)
    assert calculate_sigmas(sd, "karras", 0).numel() == 0
    with pytest.raises(ValueError, match="alphas_cumprod"):
        DiscreteSchedule(torch.ones(1))
