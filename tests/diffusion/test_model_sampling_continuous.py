"""Continuous-time model sampling (ModelSamplingContinuousEDM / ContinuousV): preconditioning by hand, the
sigma table the schedulers see, and a whole sampling run on an analytic Gaussian denoiser."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion.sampling.ksampler import ksampler_sigmas, sample
from diffusion.sampling.model_sampling import (
    ContinuousModelSampling,
    Denoiser,
    continuous_edm_model_sampling,
    continuous_v_model_sampling,
)
from diffusion.sampling.schedules import SCHEDULER_NAMES

SIGMA = 2.5
X = torch.tensor([[0.3, -1.2, 2.0]])
OUT = torch.tensor([[0.7, 0.1, -0.4]])


def _close(a, b, tol=1e-6):
    assert torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                          atol=tol, rtol=tol), (a, b)


@pytest.mark.parametrize("sampling, sigma_data, expected", [
    # denoised written out for sigma 2.5: eps x - s F; v sd^2/(s^2+sd^2) x - s sd / sqrt(s^2+sd^2) F; edm +.
    ("eps", 1.0, [0.3 - 2.5 * 0.7, -1.2 - 2.5 * 0.1, 2.0 + 2.5 * 0.4]),
    ("v_prediction", 1.0, [0.3 / 7.25 - 0.7 * 2.5 / math.sqrt(7.25), -1.2 / 7.25 - 0.1 * 2.5 / math.sqrt(7.25),
                           2.0 / 7.25 + 0.4 * 2.5 / math.sqrt(7.25)]),
    ("edm", 0.5, [0.3 * 0.25 / 6.5 + 0.7 * 1.25 / math.sqrt(6.5), -1.2 * 0.25 / 6.5 + 0.1 * 1.25 / math.sqrt(6.5),
                  2.0 * 0.25 / 6.5 - 0.4 * 1.25 / math.sqrt(6.5)]),
])
def test_denoised_by_hand(sampling, sigma_data, expected):
    ms = continuous_edm_model_sampling(sampling, sigma_max=120.0, sigma_min=0.002)
    assert ms.sigma_data == sigma_data
    sigma = torch.tensor([SIGMA])
    _close(ms.calculate_denoised(sigma, OUT, X), [expected])
    _close(ms.calculate_input(sigma, X), X / math.sqrt(SIGMA**2 + sigma_data**2))
    _close(ms.timestep(sigma), [0.25 * math.log(SIGMA)])
    _close(ms.sigma(ms.timestep(sigma)), [SIGMA], tol=1e-5)


def test_continuous_v_time_is_arctan():
    ms = continuous_v_model_sampling("v_prediction", sigma_max=500.0, sigma_min=0.03)
    sigma = torch.tensor([0.03, 1.0, 2.5, 500.0])
    _close(ms.timestep(sigma), [math.atan(s) * 2 / math.pi for s in (0.03, 1.0, 2.5, 500.0)])
    _close(ms.sigma(ms.timestep(sigma)), sigma, tol=1e-4)
    _close(ms.calculate_denoised(torch.tensor([SIGMA]), OUT, X),
           X / 7.25 - OUT * SIGMA / math.sqrt(7.25))


def test_v_with_sigma_data_one_matches_the_discrete_formula():
    """CosXL-style v: the same x0 as the discrete v formula at any sigma (only the time differs)."""
    from diffusion.sampling.model_sampling import discrete_model_sampling

    discrete = discrete_model_sampling("v_prediction")
    continuous = continuous_edm_model_sampling("v_prediction", 120.0, 0.002)
    sigma = torch.tensor([SIGMA])
    _close(continuous.calculate_denoised(sigma, OUT, X), discrete.calculate_denoised(sigma, OUT, X))
    _close(continuous.calculate_input(sigma, X), discrete.calculate_input(sigma, X))


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
@pytest.mark.parametrize("make", [lambda: continuous_edm_model_sampling("edm", 80.0, 0.002),
                                  lambda: continuous_v_model_sampling("v_prediction", 500.0, 0.03)])
def test_scheduler_sigmas_span_the_model_range(scheduler, make):
    ms = make()
    sigmas = ksampler_sigmas(ms.schedule, scheduler, 12)
    positive = sigmas[sigmas > 0]
    assert sigmas[-1] == 0
    assert torch.all(positive[:-1] >= positive[1:]), sigmas
    assert float(positive.max()) <= ms.sigma_max * (1 + 1e-4)
    assert float(positive.min()) >= ms.sigma_min * (1 - 1e-4)
    if scheduler in ("karras", "exponential", "normal", "simple", "kl_optimal", "beta"):
        assert math.isclose(float(sigmas[0]), ms.sigma_max, rel_tol=1e-4), (scheduler, sigmas)
    if scheduler in ("karras", "exponential", "normal", "kl_optimal"):
        assert math.isclose(float(positive[-1]), ms.sigma_min, rel_tol=1e-4), (scheduler, sigmas)


def test_normal_scheduler_is_even_in_the_model_time():
    edm = continuous_edm_model_sampling("edm", 80.0, 0.002)
    sigmas = ksampler_sigmas(edm.schedule, "normal", 8)[:-1]
    _close(sigmas.log(), torch.linspace(math.log(80.0), math.log(0.002), 8), tol=1e-4)
    v = continuous_v_model_sampling("v_prediction", 500.0, 0.03)
    sigmas = ksampler_sigmas(v.schedule, "normal", 8)[:-1]
    _close(sigmas.atan(), torch.linspace(math.atan(500.0), math.atan(0.03), 8), tol=1e-5)


def test_simple_scheduler_picks_the_log_spaced_table():
    ms = continuous_edm_model_sampling("edm", 120.0, 0.002)
    table = ms.schedule.sigmas
    assert len(table) == 1000
    _close(table.log().diff(), torch.full((999,), (math.log(120.0) - math.log(0.002)) / 999), tol=1e-4)
    sigmas = ksampler_sigmas(ms.schedule, "simple", 10)
    _close(sigmas[:-1], table[[999 - int(i * 100) for i in range(10)]])


def test_percent_to_sigma_is_log_linear():
    ms = continuous_edm_model_sampling("edm", 80.0, 0.002)
    assert ms.percent_to_sigma(0.0) == float("inf")
    assert ms.percent_to_sigma(1.0) == 0.0
    assert math.isclose(ms.percent_to_sigma(0.5), math.sqrt(80.0 * 0.002), rel_tol=1e-9)


def _gaussian_net(ms_kind: str, sigma_data: float, mean: float, std: float):
    """The network whose preconditioned output makes D(x, sigma) the exact posterior mean of data ~ N(mean, std^2)
    (E[x0 | x] = (std^2 x + sigma^2 mean) / (std^2 + sigma^2)), written from the EDM formulas independently of
    the class under test: sigma from the time input, x from c_in, then F = (D - c_skip x) / c_out."""

    def net(x_in, t, **_):
        sigma = torch.tan(t * math.pi / 2) if ms_kind == "arctan" else torch.exp(4 * t)
        s = sigma.reshape(-1, *([1] * (x_in.ndim - 1))).double()
        x = x_in.double() * torch.sqrt(s**2 + sigma_data**2)
        d = (std**2 * x + s**2 * mean) / (std**2 + s**2)
        c_skip = sigma_data**2 / (s**2 + sigma_data**2)
        c_out = s * sigma_data / torch.sqrt(s**2 + sigma_data**2)
        sign = 1.0 if sampling == "edm" else -1.0
        return ((d - c_skip * x) / (sign * c_out)).float()

    sampling = {"arctan": "v_prediction"}.get(ms_kind, ms_kind)
    return net


@pytest.mark.parametrize("sampling, scheduler", [("edm", "karras"), ("v_prediction", "normal"),
                                                 ("arctan", "exponential")])
def test_sampling_the_gaussian_denoiser_converges(sampling, scheduler):
    """Heun on the probability-flow ODE with the exact denoiser maps N(0, sigma_max^2) noise onto the data
    distribution N(mean, std^2): the result's mean and std match it."""
    mean, std = 0.75, 0.4
    if sampling == "arctan":
        ms = continuous_v_model_sampling("v_prediction", sigma_max=500.0, sigma_min=0.03)
    else:
        ms = continuous_edm_model_sampling(sampling, sigma_max=80.0, sigma_min=0.002)
    denoiser = Denoiser(_gaussian_net("arctan" if sampling == "arctan" else sampling, ms.sigma_data, mean, std), ms)
    sigmas = ksampler_sigmas(ms.schedule, scheduler, 40)
    latent = torch.zeros(1, 4, 64, 64)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    # starts at mean + noise * sqrt(1 + sigma_max^2): N(mean, sigma_max^2 + std^2) up to 1e-4
    out = sample(denoiser, "heun", sigmas, latent + mean, noise, model_sampling=ms, seed=0)
    assert abs(float(out.mean()) - mean) < 0.02, float(out.mean())
    assert abs(float(out.std()) - std) < 0.02, float(out.std())
    # sample by sample: the exact flow of a Gaussian, x(s) - mean proportional to sqrt(std^2 + s^2)
    start = latent + mean + noise * math.sqrt(1 + float(sigmas[0]) ** 2)
    exact = mean + (start - mean) * std / math.sqrt(std**2 + float(sigmas[0]) ** 2)
    assert float((out - exact).abs().max()) < 0.05


def test_refused_choices_name_the_value():
    with pytest.raises(ValueError, match="cosmos_rflow"):
        continuous_edm_model_sampling("cosmos_rflow", 80.0, 0.002)
    with pytest.raises(ValueError, match=r"edm_playground_v2\.5"):
        continuous_edm_model_sampling("edm_playground_v2.5", 80.0, 0.002)
    with pytest.raises(ValueError, match=r"sigma_min=0\.0"):
        continuous_edm_model_sampling("edm", 80.0, 0.0)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        continuous_v_model_sampling("v_prediction", 0.03, 500.0)
    with pytest.raises(ValueError, match="lcm"):
        ContinuousModelSampling("lcm", 0.002, 80.0)
