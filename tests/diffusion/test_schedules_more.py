"""The extra schedules and schedule operations: hand-computed values, diffusers where it has the same schedule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler
from diffusers.schedulers import AysSchedules

from diffusion.sampling.schedules import DiscreteSchedule, exponential_sigmas
from diffusion.sampling.schedules_extra import (
    AYS_NOISE_LEVELS,
    align_your_steps_sigmas,
    flip_sigmas,
    laplace_sigmas,
    loglinear_interp,
    polyexponential_sigmas,
    sd_turbo_sigmas,
    set_first_sigma,
    sigma_span,
    split_sigmas_denoise,
    vp_sigmas,
)

SD_CONFIG = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
SMIN, SMAX = 0.0291675, 14.614642


@pytest.fixture(scope="module")
def sd() -> DiscreteSchedule:
    return DiscreteSchedule.from_config()


def test_polyexponential_is_exponential_at_rho_1_and_polynomial_in_log_sigma():
    torch.testing.assert_close(polyexponential_sigmas(7, SMIN, SMAX, 1.0), exponential_sigmas(7, SMIN, SMAX))
    # rho = 2, n = 3: ramp = (1, 1/4, 0) of the log range
    lo, hi = math.log(SMIN), math.log(SMAX)
    expected = [SMAX, math.exp(lo + 0.25 * (hi - lo)), SMIN, 0.0]
    assert polyexponential_sigmas(3, SMIN, SMAX, 2.0).tolist() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="sigma_min"):
        polyexponential_sigmas(3, 0.0, SMAX)


def test_vp_sigmas_hand_computed():
    out = vp_sigmas(3, beta_d=19.9, beta_min=0.1, eps_s=1e-3)
    ts = [1.0, (1 + 1e-3) / 2, 1e-3]
    expected = [math.sqrt(math.exp(19.9 * t * t / 2 + 0.1 * t) - 1) for t in ts] + [0.0]
    assert out.tolist() == pytest.approx(expected, rel=1e-6)
    assert out[0].item() == pytest.approx(152.167, abs=1e-3)  # sqrt(e^10.05 - 1)


def test_laplace_sigmas_hand_computed():
    out = laplace_sigmas(5, SMIN, SMAX, mu=0.0, beta=0.5)
    quarter = math.exp(-0.5 * math.log(0.5 + 1e-5))  # t = 1/4: lambda = -beta ln(1 - 1/2 + eps)
    # the ends of the Laplace quantile (e^{+-5.76}) fall outside [sigma_min, sigma_max] and are clamped
    assert out.tolist() == pytest.approx([SMAX, quarter, 1.0, 1 / quarter, SMIN, 0.0], rel=1e-6)
    shifted = laplace_sigmas(5, SMIN, SMAX, mu=1.0, beta=0.5)
    assert shifted[2].item() == pytest.approx(math.e, rel=1e-6)  # the middle step sits at e^mu


def test_sd_turbo_matches_diffusers_trailing_timesteps(sd):
    ref = EulerAncestralDiscreteScheduler(**SD_CONFIG, timestep_spacing="trailing")
    ref.set_timesteps(10)
    torch.testing.assert_close(sd_turbo_sigmas(sd, 10), ref.sigmas.float(), atol=1e-4, rtol=1e-5)
    assert sd_turbo_sigmas(sd, 1).tolist() == pytest.approx([sd.sigma_max, 0.0], rel=1e-5)
    # denoise 0.5 starts 5 levels down (t = 499); only as many steps as levels remain
    torch.testing.assert_close(sd_turbo_sigmas(sd, 2, 0.5), torch.cat([ref.sigmas[5:7].float(), torch.zeros(1)]),
                               atol=1e-4, rtol=1e-5)
    assert len(sd_turbo_sigmas(sd, 10, 0.3)) == 4
    assert sd_turbo_sigmas(sd, 3, 0.0).tolist() == [0.0]


@pytest.mark.parametrize("model_type, key", [("SD1", "StableDiffusionSigmas"), ("SDXL", "StableDiffusionXLSigmas"),
                                             ("SVD", "StableDiffusionVideoSigmas")])
def test_ays_ten_steps_are_the_published_table(model_type, key):
    assert align_your_steps_sigmas(model_type, 10).tolist() == pytest.approx(AysSchedules[key], abs=1e-6)


def test_ays_interpolates_log_linearly():
    table = np.array(AYS_NOISE_LEVELS["SD1"])
    for steps in (4, 20, 37):
        # the AYS recipe: interpolate log sigma (ascending) over uniform positions, then reverse
        ref = np.exp(np.interp(np.linspace(0, 1, steps + 1), np.linspace(0, 1, len(table)), np.log(table[::-1])))[::-1]
        ref[-1] = 0.0
        out = align_your_steps_sigmas("SD1", steps)
        assert out.dtype == torch.float32 and len(out) == steps + 1
        np.testing.assert_allclose(out.numpy(), ref, rtol=1e-6)
    assert loglinear_interp(torch.tensor([4.0, 1.0]), 3).tolist() == pytest.approx([4.0, 2.0, 1.0])
    half = align_your_steps_sigmas("SDXL", 10, denoise=0.5)
    assert half.tolist() == pytest.approx(AysSchedules["StableDiffusionXLSigmas"][5:], abs=1e-6)
    assert len(align_your_steps_sigmas("SD1", 10, denoise=0.0)) == 0
    with pytest.raises(ValueError, match="SD3"):
        align_your_steps_sigmas("SD3", 10)


def test_flip_split_and_set_first_sigma_exact():
    sigmas = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    assert flip_sigmas(sigmas).tolist() == pytest.approx([1e-4, 1.0, 2.0, 3.0, 4.0])
    assert flip_sigmas(torch.tensor([3.0, 1.0])).tolist() == [1.0, 3.0]
    assert len(flip_sigmas(torch.zeros(0))) == 0
    high, low = split_sigmas_denoise(sigmas, 0.5)
    assert high.tolist() == [4.0, 3.0, 2.0] and low.tolist() == [2.0, 1.0, 0.0]  # both hold the boundary
    high, low = split_sigmas_denoise(sigmas, 1.0)
    assert high.tolist() == [4.0] and low.tolist() == sigmas.tolist()
    high, low = split_sigmas_denoise(sigmas, 0.0)  # ComfyUI's edge: nothing high, the last sigma low
    assert high.tolist() == [] and low.tolist() == [0.0]
    out = set_first_sigma(sigmas, 136.0)
    assert out.tolist() == [136.0, 3.0, 2.0, 1.0, 0.0] and sigmas[0] == 4.0
    with pytest.raises(ValueError, match="empty"):
        set_first_sigma(torch.zeros(0), 1.0)


def test_sigma_span():
    assert sigma_span(torch.tensor([5.0, 2.0])) == 3.0
    assert sigma_span(torch.tensor([7.0, 3.0, 0.0])) == 7.0
    assert sigma_span(torch.tensor([2.5])) == 2.5
    with pytest.raises(ValueError, match="empty"):
        sigma_span(torch.zeros(0))
