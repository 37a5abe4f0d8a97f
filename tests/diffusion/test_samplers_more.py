"""Samplers of P9 group A: CFG++ variants, RES multistep, gradient estimation, ER-SDE, dpmpp_2m_sde_heun and the
_gpu variants. Convergence on the analytic Gaussian denoiser is in test_samplers.py (parametrised over every
name); here: parity with diffusers, exactness where a method is exact, CFG++ against hand-written references
with a real guider, device noise, reproducibility."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from diffusion.sampling.guidance import CFGGuider, GuidanceHooks
from diffusion.sampling.ksampler import BROWNIAN_NOISE_SAMPLERS, sample
from diffusion.sampling.model_sampling import ModelSampling
from diffusion.sampling.noise import BrownianNoiseSampler, seeded_noise_sampler
from diffusion.sampling.sampler_registry import SAMPLER_NAMES, STOCHASTIC_SAMPLERS, get_sampler
from diffusion.sampling.samplers_sde import (
    DeviceBrownianNoiseSampler,
    er_sde_coefficients,
    er_sde_noise_scaler,
    on_device,
)
from diffusion.sampling.schedules import DiscreteSchedule, calculate_sigmas
from tests.diffusion.test_samplers import (
    MU,
    SD_CONFIG,
    STD,
    NoiseQueue,
    _dpmsolver_sigma,
    _x,
    compare,
    gaussian_denoiser,
    run_diffusers_vp,
    start_sample,
    wobbly_denoiser,
)

NEW = ("euler_cfg_pp", "euler_ancestral_cfg_pp", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_2m_cfg_pp", "dpmpp_sde_gpu",
       "dpmpp_2m_sde_gpu", "dpmpp_3m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "res_multistep",
       "res_multistep_cfg_pp", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "gradient_estimation",
       "gradient_estimation_cfg_pp", "er_sde")
GPU_PAIRS = {"dpmpp_sde_gpu": "dpmpp_sde", "dpmpp_2m_sde_gpu": "dpmpp_2m_sde", "dpmpp_3m_sde_gpu": "dpmpp_3m_sde",
             "dpmpp_2m_sde_heun_gpu": "dpmpp_2m_sde_heun"}
CFG_PP_BASE = {"euler_cfg_pp": "euler", "euler_ancestral_cfg_pp": "euler_ancestral",
               "dpmpp_2s_ancestral_cfg_pp": "dpmpp_2s_ancestral", "dpmpp_2m_cfg_pp": "dpmpp_2m",
               "res_multistep_cfg_pp": "res_multistep", "res_multistep_ancestral_cfg_pp": "res_multistep_ancestral",
               "gradient_estimation_cfg_pp": "gradient_estimation"}


@pytest.fixture(scope="module")
def schedule() -> DiscreteSchedule:
    return DiscreteSchedule.from_config()


def exact_ode(x: torch.Tensor, sigma0: float, sigma_end: float = 0.0) -> torch.Tensor:
    """The probability-flow ODE's solution for Gaussian data, from sigma0 down to sigma_end."""
    return MU + (x - MU) * math.sqrt(STD**2 + sigma_end**2) / math.sqrt(STD**2 + sigma0**2)


def test_new_names_are_registered_in_comfyui_order():
    assert set(NEW) <= set(SAMPLER_NAMES)
    order = [n for n in SAMPLER_NAMES if n in NEW]
    assert order == ["euler_cfg_pp", "euler_ancestral_cfg_pp", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde_gpu",
                     "dpmpp_2m_cfg_pp", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu",
                     "dpmpp_3m_sde_gpu", *NEW[9:]]
    stochastic = {"euler_ancestral_cfg_pp", "dpmpp_2s_ancestral_cfg_pp", "res_multistep_ancestral",
                  "res_multistep_ancestral_cfg_pp", "er_sde", *GPU_PAIRS, "dpmpp_2m_sde_heun"}
    assert {n for n in NEW if n in STOCHASTIC_SAMPLERS} == stochastic
    assert {*GPU_PAIRS, "dpmpp_2m_sde_heun"} <= BROWNIAN_NOISE_SAMPLERS
    for name in sorted(stochastic):
        with pytest.raises(ValueError, match="needs a noise_sampler"):
            get_sampler(name)(gaussian_denoiser, torch.ones(1, 1, 2, 2), torch.tensor([2.0, 1.0, 0.5, 0.0]))


# ---------------------------------------------------------------- reproducibility


@pytest.mark.parametrize("name", NEW)
def test_reproducible_bit_for_bit(name, schedule):
    sigmas = calculate_sigmas(schedule, "karras", 8)
    x = start_sample((2, 1, 8, 8), sigmas[0], seed=4)

    def run(seed):
        brownian = name in BROWNIAN_NOISE_SAMPLERS
        noise = BrownianNoiseSampler(x, seed) if brownian else seeded_noise_sampler(x, seed)
        return get_sampler(name)(wobbly_denoiser, x.clone(), sigmas, noise_sampler=noise)

    first = run(5)
    assert torch.equal(first, run(5))
    if name in STOCHASTIC_SAMPLERS:
        assert not torch.allclose(first, run(6))


# ---------------------------------------------------------------- _gpu variants and device noise


@pytest.mark.parametrize("name", sorted(GPU_PAIRS))
def test_gpu_variants_equal_their_base_on_the_cpu(name, schedule):
    sigmas = calculate_sigmas(schedule, "karras", 10)
    x = start_sample((2, 1, 8, 8), sigmas[0], seed=2)
    ours = get_sampler(name)(wobbly_denoiser, x, sigmas, noise_sampler=BrownianNoiseSampler(x, 9))
    base = get_sampler(GPU_PAIRS[name])(wobbly_denoiser, x, sigmas, noise_sampler=BrownianNoiseSampler(x, 9))
    assert torch.equal(ours, base)


def test_gpu_variants_through_the_ksampler_flow(schedule):
    sigmas = calculate_sigmas(schedule, "karras", 6)
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    sampling = ModelSampling(schedule)
    outs = {n: sample(wobbly_denoiser, n, sigmas, latent, noise, model_sampling=sampling, seed=3)
            for n in ("dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu")}
    assert torch.equal(outs["dpmpp_2m_sde"], outs["dpmpp_2m_sde_gpu"])
    assert torch.equal(outs["dpmpp_2m_sde_heun"], outs["dpmpp_2m_sde_heun_gpu"])
    assert not torch.allclose(outs["dpmpp_2m_sde"], outs["dpmpp_2m_sde_heun"])


def test_device_brownian_noise_is_made_on_x_device_and_equals_the_cpu_one_there():
    x = torch.zeros(2, 3, 4, 4)
    moved = on_device(BrownianNoiseSampler(x, 21), x)
    assert isinstance(moved, DeviceBrownianNoiseSampler) and moved.generator.device == x.device
    cpu = BrownianNoiseSampler(x, 21)
    for a, b in [(14.6, 9.0), (14.6, 11.7), (9.0, 3.0), (11.7, 9.0)]:  # outside, then inside, known points
        assert torch.equal(moved(a, b), cpu(a, b))
    own = seeded_noise_sampler(x, 1)
    assert on_device(own, x) is own  # a caller's own noise is used as given
    used = BrownianNoiseSampler(x, 1)
    used(2.0, 1.0)
    assert on_device(used, x) is used  # a path already drawn is not restarted


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_variant_draws_noise_on_the_cuda_device(schedule):
    sigmas = calculate_sigmas(schedule, "karras", 6).cuda()
    x = start_sample((1, 4, 16, 16), sigmas[0]).cuda()
    noise = on_device(BrownianNoiseSampler(x, 3), x)
    draw = noise(float(sigmas[0]), float(sigmas[1]))
    assert draw.device.type == "cuda" and all(v.device.type == "cuda" for v in noise.points.values())
    assert abs(float(draw.std()) - 1.0) < 0.1
    out = get_sampler("dpmpp_2m_sde_gpu")(gaussian_denoiser, x, sigmas, noise_sampler=BrownianNoiseSampler(x, 3))
    assert out.device.type == "cuda" and torch.isfinite(out).all()


# ---------------------------------------------------------------- parity: diffusers and equivalent methods


def test_dpmpp_2m_sde_heun_matches_diffusers(monkeypatch):
    from diffusers import DPMSolverMultistepScheduler
    from diffusers.schedulers import scheduling_dpmsolver_multistep as module

    sched = DPMSolverMultistepScheduler(**SD_CONFIG, algorithm_type="sde-dpmsolver++", solver_order=2,
                                        solver_type="heun", use_karras_sigmas=True)
    sched.set_timesteps(15)
    x = _x(sched.sigmas[0])
    queue = NoiseQueue(x.shape, 15)
    monkeypatch.setattr(module, "randn_tensor", queue.randn_tensor)
    final, starts = run_diffusers_vp(sched, x, _dpmsolver_sigma)
    compare(get_sampler("dpmpp_2m_sde_heun"), sched.sigmas, x, starts, final, noise_sampler=queue.sampler)
    # the midpoint form is a different sampler: it must not pass the same comparison
    queue.ours = 0
    midpoint = get_sampler("dpmpp_2m_sde")(wobbly_denoiser, x.clone(), sched.sigmas, noise_sampler=queue.sampler)
    assert not torch.allclose(midpoint, final, rtol=1e-4, atol=1e-4)


def test_res_multistep_ancestral_is_the_2m_sde_in_heun_form(schedule):
    """With eta = 1 the RES step to sigma_down = sigma_next^2 / sigma covers 2h in lambda, and its phi_2 term
    h'^2 phi_2(-h') / h'_last equals the Heun weight (1 - phi_1(-2h)) h / h_last: the same sampler."""
    sigmas = calculate_sigmas(schedule, "karras", 12)
    x = start_sample((2, 4, 8, 8), sigmas[0], seed=8)
    queue = NoiseQueue(x.shape, 12)
    res = get_sampler("res_multistep_ancestral")(wobbly_denoiser, x, sigmas, noise_sampler=queue.sampler)
    queue.ours = 0
    heun = get_sampler("dpmpp_2m_sde_heun")(wobbly_denoiser, x, sigmas, noise_sampler=queue.sampler)
    torch.testing.assert_close(res, heun, rtol=1e-5, atol=1e-5)


def test_res_multistep_is_exact_for_a_denoiser_linear_in_log_sigma():
    """dx/dlambda = D - x with D = a + b * lambda: from the first step's result, every later step equals the
    exact solution (computed by quadrature); DPM-Solver++(2M) only approximates it."""
    a, b = 0.4, -0.3
    sig = [8.0, 3.0, 1.2, 0.4]

    def model(x, sigma):
        return torch.full_like(x, a) + b * (-math.log(float(sigma[0])))

    x0 = torch.full((1, 1, 1, 1), 5.0, dtype=torch.float64)
    one = get_sampler("res_multistep")(model, x0, torch.tensor(sig[:2], dtype=torch.float64))
    for end in (3, 4):
        x = one
        for k in range(1, end - 1):  # exact continuation from sig[1]
            lam, h = -math.log(sig[k]), math.log(sig[k] / sig[k + 1])
            integral, _ = integrate.quad(lambda tau, lam=lam, h=h: math.exp(-(h - tau)) * (a + b * (lam + tau)), 0, h)
            x = math.exp(-h) * x + integral
        ours = get_sampler("res_multistep")(model, x0, torch.tensor(sig[:end], dtype=torch.float64))
        assert float(ours) == pytest.approx(float(x), rel=1e-10)
        dpm = get_sampler("dpmpp_2m")(model, x0, torch.tensor(sig[:end], dtype=torch.float64))
        assert abs(float(dpm) - float(x)) > 1e-3


def test_res_multistep_is_second_order(schedule):
    errs = []
    for steps in (10, 20, 40):
        sigmas = calculate_sigmas(schedule, "karras", steps)[:-1].double()  # to sigma_min: no final denoise
        x = start_sample((2, 1, 8, 8), sigmas[0], seed=1).double()
        out = get_sampler("res_multistep")(gaussian_denoiser, x, sigmas)
        errs.append((out - exact_ode(x, float(sigmas[0]), float(sigmas[-1]))).abs().max().item())
    assert errs[1] < errs[0] / 3 and errs[2] < errs[1] / 3, errs


def test_gradient_estimation_against_its_definition(schedule):
    sigmas = calculate_sigmas(schedule, "karras", 9)
    sig = sigmas.tolist()
    x = start_sample((2, 1, 8, 8), sigmas[0], seed=6)
    ref, eps_prev = x.clone(), None
    for i in range(len(sig) - 1):  # Permenter & Yuan, Alg. 2 in the eps-prediction form; to 0: D (as ComfyUI)
        denoised = wobbly_denoiser(ref, torch.tensor([sig[i]]))
        eps = (ref - denoised) / sig[i]
        eps_bar = eps if eps_prev is None else 2 * eps - eps_prev
        ref, eps_prev = denoised if sig[i + 1] == 0 else ref + (sig[i + 1] - sig[i]) * eps_bar, eps
    out = get_sampler("gradient_estimation")(wobbly_denoiser, x, sigmas)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    euler = get_sampler("euler")(wobbly_denoiser, x, sigmas)
    torch.testing.assert_close(get_sampler("gradient_estimation")(wobbly_denoiser, x, sigmas, ge_gamma=1.0), euler,
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, euler, atol=1e-3)


# ---------------------------------------------------------------- ER-SDE


@pytest.mark.parametrize(("sigma", "sigma_next"), [(14.6, 11.7), (2.0, 1.1), (0.9, 0.05), (14.6, 0.03)])
def test_er_sde_coefficients_are_the_papers_integrals(sigma, sigma_next):
    """phi_t * integral_{sigma_t}^{sigma_s} phi'(u) / phi(u)^2 * (u - sigma_s)^k / k! du, k = 0, 1, 2."""
    phi = er_sde_noise_scaler

    def dphi(u):
        return math.exp(u**0.3) + 10 + 0.3 * u**0.3 * math.exp(u**0.3)

    r, c_1, c_2 = er_sde_coefficients(sigma, sigma_next, phi)
    weights = []
    for k in range(3):
        value, _ = integrate.quad(lambda u, k=k: dphi(u) / phi(u) ** 2 * (u - sigma) ** k / math.factorial(k),
                                  sigma_next, sigma, limit=200, epsabs=0, epsrel=1e-12)
        weights.append(phi(sigma_next) * value)
    assert r == pytest.approx(phi(sigma_next) / phi(sigma), rel=1e-12)
    assert [1 - r, c_1, c_2] == pytest.approx(weights, rel=1e-8, abs=1e-12)


def test_er_sde_with_the_reverse_sde_scale_is_euler_ancestral(schedule):
    """phi(sigma) = sigma^2 turns ER-SDE stage 1 into the ancestral step: r = (sigma_next / sigma)^2 is the
    Euler step to sigma_down and the noise std sqrt(sigma_next^2 - r^2 sigma^2) is sigma_up."""
    sigmas = calculate_sigmas(schedule, "karras", 10)
    x = start_sample((2, 4, 8, 8), sigmas[0], seed=3)
    queue = NoiseQueue(x.shape, 10)
    ours = get_sampler("er_sde")(wobbly_denoiser, x, sigmas, noise_sampler=queue.sampler,
                                 noise_scaler=lambda s: s * s, max_stage=1)
    queue.ours = 0
    ancestral = get_sampler("euler_ancestral")(wobbly_denoiser, x, sigmas, noise_sampler=queue.sampler)
    torch.testing.assert_close(ours, ancestral, rtol=1e-5, atol=1e-5)


def test_er_sde_with_the_ode_scale_is_a_third_order_ode_solver(schedule):
    """phi(sigma) = sigma draws no noise (std sqrt(sigma_t^2 - (sigma_t / sigma_s)^2 sigma_s^2) = 0); each
    stage must cut the error of the last."""
    sigmas = calculate_sigmas(schedule, "karras", 15)[:-1].double()  # to sigma_min: no final denoise
    x = start_sample((2, 1, 8, 8), sigmas[0], seed=2).double()
    exact = exact_ode(x, float(sigmas[0]), float(sigmas[-1]))
    errs = [(get_sampler("er_sde")(gaussian_denoiser, x, sigmas, noise_scaler=lambda s: s, max_stage=k)
             - exact).abs().max().item() for k in (1, 2, 3)]
    assert errs[1] < errs[0] / 3 and errs[2] < errs[1], errs
    with pytest.raises(ValueError, match="max_stage must be 1, 2 or 3, got 4"):
        get_sampler("er_sde")(gaussian_denoiser, x, sigmas, max_stage=4)


# ---------------------------------------------------------------- CFG++ with a real guider


def conditioned(x, sigma, context=None, **_):
    """A Gaussian-data denoiser whose data mean follows the conditioning (positive 1 -> 0.7, negative 0 -> 0.3)
    and a sin term so the steps are not linear."""
    s = sigma.reshape(-1, *[1] * (x.ndim - 1))
    mu = 0.3 + 0.4 * context.mean(dim=(1, 2)).view(-1, 1, 1, 1)
    return (STD**2 * x + s**2 * mu) / (STD**2 + s**2) + 0.1 * torch.sin(x) * s / (1 + s)


def make_guider(schedule, cfg):
    positive, negative = [(torch.ones(1, 2, 3), {})], [(torch.zeros(1, 2, 3), {})]
    return CFGGuider(conditioned, ModelSampling(schedule), positive, negative, cfg)


def branches(x, sigma, cfg):
    """(guided D, unconditional U) computed directly, without the guider."""
    s = torch.tensor([sigma])
    cond = conditioned(x, s, context=torch.ones(1, 2, 3))
    uncond = conditioned(x, s, context=torch.zeros(1, 2, 3))
    return uncond + cfg * (cond - uncond), uncond


def reference_cfg_pp(name, x, sig, cfg, noise):
    """CFG++ written out step by step: Euler (DDIM) as the paper states it (Chung et al. 2024, Alg. 1: in the
    variance-preserving frame z = x / sqrt(1 + sigma^2), z_next = sqrt(abar_next) * x0_guided +
    sqrt(1 - abar_next) * eps_uncond), and the multistep and two-stage samplers in ComfyUI's forms, which
    extrapolate from the unconditional estimates U."""
    old_u, old_eps = None, None
    h_last = 0.0
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        d, u = branches(x, s, cfg)
        eps_u = (x - u) / s
        if name in ("euler_cfg_pp", "euler_ancestral_cfg_pp"):
            eta = 1.0 if name == "euler_ancestral_cfg_pp" else 0.0
            up = min(s_next, eta * math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2))
            down = math.sqrt(s_next**2 - up**2)
            abar = 1 / (1 + down**2)
            z = math.sqrt(abar) * d + math.sqrt(1 - abar) * eps_u  # VP frame at sigma_down
            x = z / math.sqrt(abar) + (noise(s, s_next) * up if up > 0 else 0)
        elif name == "dpmpp_2s_ancestral_cfg_pp":
            up = min(s_next, math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2))
            down = math.sqrt(s_next**2 - up**2)
            if down == 0:
                x = d
                continue
            mid = math.sqrt(s * down)
            _, u_2 = branches(u + mid * eps_u, mid, cfg)  # DPM-Solver++(2S) on U alone
            x = u_2 + down * (x - u_2) / s + (d - u)  # then the guidance vector of the step's start
            if up > 0:
                x = x + noise(s, s_next) * up
        elif name in ("dpmpp_2m_cfg_pp", "res_multistep_cfg_pp"):
            if s_next == 0:
                x = d
                continue
            h = math.log(s / s_next)
            if old_u is None:
                x = d + s_next * eps_u
            elif name == "dpmpp_2m_cfg_pp":
                x = d + s_next * eps_u + (1 - s_next / s) * (d - old_u) * h / (2 * h_last)
            else:  # RES on U from x + D - U: U linear in lambda through U_prev, integrated against e^{-(h - tau)}
                x = (s_next / s) * (x + d - u) + (1 - s_next / s) * u + (u - old_u) * (h - 1 + s_next / s) / h_last
            old_u, h_last = u, h
        elif name == "gradient_estimation_cfg_pp":
            eps_bar = eps_u if old_eps is None else 2 * eps_u - old_eps
            x = d if s_next == 0 else d + s * eps_u + (s_next - s) * eps_bar
            old_eps = eps_u
    return x


CFG_PP_DETERMINISTIC = ("euler_cfg_pp", "dpmpp_2m_cfg_pp", "res_multistep_cfg_pp", "gradient_estimation_cfg_pp")


@pytest.mark.parametrize("name", [*CFG_PP_DETERMINISTIC, "euler_ancestral_cfg_pp", "dpmpp_2s_ancestral_cfg_pp"])
def test_cfg_pp_matches_the_hand_written_reference(name, schedule):
    sigmas = calculate_sigmas(schedule, "karras", 8)
    x = start_sample((2, 4, 8, 8), sigmas[0], seed=9)
    queue = NoiseQueue(x.shape, 8)
    out = get_sampler(name)(make_guider(schedule, 3.0), x, sigmas, noise_sampler=queue.sampler)
    queue.ours = 0
    ref = reference_cfg_pp(name, x, sigmas.tolist(), 3.0, queue.sampler)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(CFG_PP_BASE))
def test_cfg_pp_is_its_base_sampler_at_cfg_1_and_not_above(name, schedule):
    sigmas = calculate_sigmas(schedule, "karras", 8)
    x = start_sample((1, 4, 8, 8), sigmas[0], seed=1)

    def run(sampler, model):
        return get_sampler(sampler)(model, x, sigmas, noise_sampler=seeded_noise_sampler(x, 4))

    base_1 = run(CFG_PP_BASE[name], make_guider(schedule, 1.0))
    torch.testing.assert_close(run(name, make_guider(schedule, 1.0)), base_1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run(name, wobbly_denoiser), run(CFG_PP_BASE[name], wobbly_denoiser), rtol=1e-5,
                               atol=1e-5)  # a bare denoiser (no model_options): U = D
    plain_3, pp_3 = run(CFG_PP_BASE[name], make_guider(schedule, 3.0)), run(name, make_guider(schedule, 3.0))
    assert (pp_3 - plain_3).abs().max() > 1e-2


def test_cfg_pp_keeps_the_callers_hooks_and_works_through_the_masked_flow(schedule):
    seen = []
    hooks = GuidanceHooks(post=[lambda step: seen.append(1) or step.denoised * 1.0])
    sigmas = calculate_sigmas(schedule, "karras", 5)
    x = start_sample((1, 4, 8, 8), sigmas[0], seed=2)
    guider = make_guider(schedule, 2.0)
    out = get_sampler("euler_cfg_pp")(guider, x, sigmas, extra_args={"model_options": {"guidance_hooks": hooks}})
    assert len(seen) == 5
    torch.testing.assert_close(out, get_sampler("euler_cfg_pp")(guider, x, sigmas), rtol=1e-6, atol=1e-6)
    latent = torch.zeros(1, 4, 8, 8)
    mask = torch.zeros(8, 8)
    mask[:, 4:] = 1
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    result = sample(guider, "euler_cfg_pp", sigmas, latent, noise, model_sampling=ModelSampling(schedule), seed=0,
                    noise_mask=mask)
    assert torch.equal(result[..., :4], latent[..., :4]) and result[..., 4:].abs().max() > 0.1
    assert torch.isfinite(result).all()


def test_every_new_deterministic_sampler_converges_to_the_exact_ode(schedule):
    sigmas = calculate_sigmas(schedule, "karras", 30)
    x = start_sample((2, 1, 8, 8), sigmas[0], seed=7)
    exact = exact_ode(x, float(sigmas[0]))
    errs = {n: (get_sampler(n)(gaussian_denoiser, x, sigmas) - exact).abs().max().item()
            for n in NEW if n not in STOCHASTIC_SAMPLERS}
    first_order = {"euler_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp"}
    assert all(e < (0.12 if n in first_order else 0.02) for n, e in errs.items()), errs
    assert np.isfinite(list(errs.values())).all()


@pytest.mark.parametrize("name", ["res_multistep", "res_multistep_cfg_pp", "er_sde"])
def test_a_repeated_sigma_is_a_harmless_step(name):
    sigmas = torch.tensor([10.0, 4.0, 4.0, 1.5, 0.6, 0.6, 0.2, 0.0])
    x = start_sample((1, 1, 8, 8), sigmas[0], seed=5)
    out = get_sampler(name)(gaussian_denoiser, x, sigmas, noise_sampler=seeded_noise_sampler(x, 1))
    assert torch.isfinite(out).all()
    assert abs(out.mean().item() - MU) < 0.1 and abs(out.std().item() - STD) < 0.15
