"""Samplers, group B of P9: iPNDM-v, DEIS (tAB), the ComfyUI endings of lms and UniPC, dpm_adaptive's model
calls, SEEDS-2/3 and SA-Solver (+PECE). Convergence of every sampler on the analytic Gaussian denoiser is in
test_samplers.py (parametrised over all names); here: the math behind each, and reproducibility."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from diffusion.sampling.model_sampling import ModelSampling
from diffusion.sampling.noise import seeded_noise_sampler
from diffusion.sampling.sampler_registry import STOCHASTIC_SAMPLERS, get_sampler
from diffusion.sampling.samplers_adams import (
    _AB_WEIGHTS,
    adams_bashforth_coeffs,
    deis_coeffs,
    ipndm_v_coeffs,
    vp_time,
)
from diffusion.sampling.samplers_multistep import UNIPC_FINAL_SIGMA
from diffusion.sampling.samplers_sa_solver import default_sde_interval, sde_interval, stochastic_adams_coeffs
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

GROUP_B = ("lms", "ipndm_v", "deis", "dpm_adaptive", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece", "uni_pc",
           "uni_pc_bh2")


@pytest.fixture(scope="module")
def schedule() -> DiscreteSchedule:
    return DiscreteSchedule.from_config()


def exact_ode(x, sigma_from, sigma_to=0.0):
    """The probability-flow ODE's solution for Gaussian data: x moves along MU + (x - MU) * sqrt(STD^2 + s^2)."""
    return MU + (x - MU) * math.sqrt(STD**2 + sigma_to**2) / math.sqrt(STD**2 + sigma_from**2)


class Counting:
    def __init__(self, fn=gaussian_denoiser):
        self.fn, self.sigmas, self.outputs = fn, [], []

    def __call__(self, x, sigma):
        out = self.fn(x, sigma)
        self.sigmas.append(float(sigma[0]))
        self.outputs.append(out)
        return out


# ---------------------------------------------------------------- iPNDM-v


def test_ipndm_v_weights_reduce_to_adams_bashforth():
    sig = [9.0, 8.0, 7.0, 6.0, 5.0]
    for order in (1, 2, 3):
        i = order - 1
        assert ipndm_v_coeffs(sig, i, order) == pytest.approx([-w for w in _AB_WEIGHTS[order]], rel=1e-12)
    # The published order-4 weights are AB3's plus 11/24 (1, -3, 3, -1) at equal steps (AB4 has 9/24 there).
    ab3 = [*_AB_WEIGHTS[3], 0.0]
    assert ipndm_v_coeffs(sig, 3, 4) == pytest.approx([-(w + 11 / 24 * d) for w, d in zip(ab3, (1, -3, 3, -1),
                                                                                          strict=True)], rel=1e-12)
    # Uneven steps: order 2 is the exact variable-step AB2; every order integrates constants and linear slopes
    # exactly (orders 3 and 4 are not the exact Lagrange integrals beyond that).
    sig = [14.6, 9.7, 6.1, 3.9, 2.2, 1.1]
    i = 4
    assert ipndm_v_coeffs(sig, i, 2) == pytest.approx(adams_bashforth_coeffs([sig[4], sig[3]], sig[4], sig[5]))
    h = sig[5] - sig[4]
    for order in (2, 3):
        c = ipndm_v_coeffs(sig, i, order)
        nodes = [sig[i - k] for k in range(order)]
        assert sum(c) == pytest.approx(h, rel=1e-12)
        assert sum(ck * (n - sig[i]) for ck, n in zip(c, nodes, strict=True)) == pytest.approx(h * h / 2, rel=1e-12)
    assert ipndm_v_coeffs(sig, i, 3) != pytest.approx(adams_bashforth_coeffs(nodes, sig[4], sig[5]), rel=1e-3)
    # Order 4 as published (evaluated by hand from the formulas in ipndm_v_coeffs' docstring); its weights do
    # not quite sum to h on uneven steps.
    c4 = ipndm_v_coeffs(sig, i, 4)
    assert c4 == pytest.approx([-2.1304918719624606, 1.6339122718052743, -0.6536117046533715, 0.06346503831417627],
                               rel=1e-12)
    assert sum(c4) == pytest.approx(h * 0.9879329695421651, rel=1e-12)


def test_ipndm_v_lands_closer_than_linear_multistep(schedule):
    """20 Karras steps on the exact Gaussian denoiser: iPNDM-v against order-4 LMS with the same ending
    (what our ipndm_v used to be)."""
    sigmas = calculate_sigmas(schedule, "karras", 20).double()
    x = start_sample((4, 1, 8, 8), sigmas[0], seed=3).double()
    exact = exact_ode(x, float(sigmas[0]))
    err_v = (get_sampler("ipndm_v")(gaussian_denoiser, x, sigmas) - exact).abs().max().item()
    err_lms = (get_sampler("lms")(gaussian_denoiser, x, sigmas) - exact).abs().max().item()
    assert err_v < 4e-3, err_v
    assert err_v * 4 < err_lms, (err_v, err_lms)


# ---------------------------------------------------------------- DEIS


def test_vp_time_is_the_fitted_linear_vp_schedule():
    beta_d = 2 * (math.log1p(0.002**2) / 1e-3 - math.log1p(80.0**2)) / (1e-3 - 1)
    beta_min = math.log1p(80.0**2) - beta_d / 2
    for t in (1e-3, 0.01, 0.3, 0.77, 1.0):
        sigma = math.sqrt(math.expm1(beta_d * t * t / 2 + beta_min * t))
        assert vp_time(sigma) == pytest.approx(t, rel=1e-9)
    assert math.sqrt(math.expm1(beta_d / 2 + beta_min)) == pytest.approx(80.0)


def deis_reference(sig, i, order, points=200_001):
    """The paper's form: C_j = integral over VP time [t_i, t_{i+1}] of dsigma/dt * l_j(t), by the trapezoid rule."""
    t_nodes = [float(vp_time(sig[i - k])) for k in range(order)]
    taus = np.linspace(float(vp_time(sig[i])), float(vp_time(sig[i + 1])), points)
    beta_d = 2 * (math.log1p(0.002**2) / 1e-3 - math.log1p(80.0**2)) / (1e-3 - 1)
    beta_min = math.log1p(80.0**2) - beta_d / 2
    s2 = np.expm1(beta_d * taus**2 / 2 + beta_min * taus)
    dsigma_dt = 0.5 * (beta_d * taus + beta_min) * (s2 + 1) / np.sqrt(s2)
    out = []
    for j in range(order):
        basis = np.ones_like(taus)
        for k in range(order):
            if k != j:
                basis *= (taus - t_nodes[k]) / (t_nodes[j] - t_nodes[k])
        out.append(float(np.trapezoid(dsigma_dt * basis, taus)))
    return out


def test_deis_coefficients_are_the_vp_time_exponential_integrator(schedule):
    sig = calculate_sigmas(schedule, "karras", 20).tolist()
    for i in (1, 2, 7, 18):
        order = min(3, i + 1)
        ours = deis_coeffs(sig, i, order)
        assert ours == pytest.approx(deis_reference(sig, i, order), rel=1e-6, abs=1e-9)
        assert sum(ours) == pytest.approx(sig[i + 1] - sig[i], rel=1e-9)  # a constant eps: an exact Euler step
        # not the Lagrange integral in sigma (our old deis)
        assert ours != pytest.approx(adams_bashforth_coeffs([sig[i - k] for k in range(order)], sig[i], sig[i + 1]),
                                     rel=1e-3)


def test_deis_differs_from_lms_order_3_and_converges(schedule):
    sigmas = calculate_sigmas(schedule, "karras", 20).double()
    x = start_sample((4, 1, 8, 8), sigmas[0], seed=3).double()
    deis = get_sampler("deis")(gaussian_denoiser, x, sigmas)
    lms3 = get_sampler("lms")(gaussian_denoiser, x, sigmas, order=3)
    assert (deis - lms3).abs().max().item() > 1e-3
    # On a schedule stopping at sigma_min (no final jump to D) the error falls at high order with the steps.
    errors = []
    for steps in (10, 20, 40):
        sig = calculate_sigmas(schedule, "exponential", steps + 1)[:-1].double()
        errors.append((get_sampler("deis")(gaussian_denoiser, x, sig) - exact_ode(x, float(sig[0]), float(sig[-1])))
                      .abs().max().item())
    assert errors[1] * 4 < errors[0] and errors[2] * 4 < errors[1], errors
    with pytest.raises(ValueError, match="'deis': max_order must be between 1 and 4, got 5"):
        get_sampler("deis")(gaussian_denoiser, x, sigmas, max_order=5)


# ---------------------------------------------------------------- endings: lms, UniPC


def test_lms_returns_the_denoised_estimate_on_the_last_step(schedule):
    sigmas = calculate_sigmas(schedule, "karras", 8)
    model = Counting(wobbly_denoiser)
    out = get_sampler("lms")(model, start_sample((2, 1, 4, 4), sigmas[0]), sigmas)
    assert len(model.sigmas) == 8
    assert torch.equal(out, model.outputs[-1])


@pytest.mark.parametrize("name", ["uni_pc", "uni_pc_bh2"])
def test_uni_pc_ends_at_sigma_0_001(name, schedule):
    sigmas = calculate_sigmas(schedule, "karras", 8)
    x = start_sample((2, 1, 4, 4), sigmas[0])
    model = Counting(wobbly_denoiser)
    out = get_sampler(name)(model, x, sigmas)
    assert model.sigmas == pytest.approx(sigmas[:-1].tolist())  # no model call at the end
    ended = sigmas.double()
    ended[-1] = UNIPC_FINAL_SIGMA
    assert torch.equal(out, get_sampler(name)(wobbly_denoiser, x, ended))
    assert (out - model.outputs[-1]).abs().max().item() > 1e-5  # not the denoised estimate


# ---------------------------------------------------------------- dpm_adaptive


@pytest.mark.parametrize(("order", "per_step"), [(3, 3), (2, 2)])
def test_dpm_adaptive_shares_evaluations(order, per_step, schedule):
    sigmas = calculate_sigmas(schedule, "karras", 20)
    model, attempts = Counting(), []
    x = start_sample((4, 1, 8, 8), sigmas[0], seed=3)
    out = get_sampler("dpm_adaptive")(model, x, sigmas, order=order, callback=attempts.append)
    assert len(model.sigmas) == per_step * len(attempts)
    if order == 3:  # k-diffusion's count for this run (the measurement); dpm_adaptive ends at sigma_min
        assert len(model.sigmas) == 27
        assert (out - exact_ode(x, float(sigmas[0]), float(sigmas[-2]))).abs().max().item() < 0.06


# ---------------------------------------------------------------- SEEDS


class ConstantDenoiser:
    """D = MU whatever x: the sampler's deterministic part is then exact, and x is linear in the noise draws."""

    def __init__(self):
        self.inputs = []

    def __call__(self, x, sigma):
        self.inputs.append((float(sigma[0]), x.clone()))
        return torch.full_like(x, MU)


class Draws:
    def __init__(self, shape, seed=4):
        self.gen = torch.Generator().manual_seed(seed)
        self.shape, self.drawn, self.intervals = shape, [], []

    def __call__(self, sigma, sigma_next):
        self.intervals.append((float(sigma), float(sigma_next)))
        self.drawn.append(torch.randn(self.shape, generator=self.gen))
        return self.drawn[-1]


@pytest.mark.parametrize(("name", "fractions"), [("seeds_2", [0.5]), ("seeds_3", [1 / 3, 2 / 3])])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_seeds_noise_follows_one_brownian_path(name, fractions, eta):
    """One step sigma_s -> sigma_t with a constant denoiser: every stage and the result equal the SDE's exact
    solution, with the draws of the sub-intervals composed as one Brownian path (the weights' squares add up to
    the whole step's variance 1 - e^{-2 eta h})."""
    s, t = 6.0, 1.5
    h = math.log(s / t)
    x = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(2)) * s
    model, draws = ConstantDenoiser(), Draws(x.shape)
    out = get_sampler(name)(model, x, torch.tensor([s, t]), noise_sampler=draws, eta=eta, s_noise=0.7)
    cuts = [0.0, *fractions, 1.0]
    stage_sigmas = [s * math.exp(-f * h) for f in cuts]
    assert draws.intervals == [pytest.approx(p) for p in itertools.pairwise(stage_sigmas)]

    def exact(frac):
        sigma = s * math.exp(-frac * h)
        mean = (sigma / s) * math.exp(-eta * frac * h) * x - math.expm1(-(1 + eta) * frac * h) * MU
        weights = [math.exp(-eta * h * (frac - b)) * math.sqrt(-math.expm1(-2 * eta * h * (b - a)))
                   for a, b in itertools.pairwise(cuts) if b <= frac + 1e-12]
        assert sum(w * w for w in weights) == pytest.approx(-math.expm1(-2 * eta * frac * h), rel=1e-9)
        return mean + sigma * 0.7 * sum(w * z for w, z in zip(weights, draws.drawn, strict=False))

    for (sigma, x_in), frac in zip(model.inputs[1:], fractions, strict=True):
        assert sigma == pytest.approx(s * math.exp(-frac * h))
        torch.testing.assert_close(x_in, exact(frac), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, exact(1.0), rtol=1e-5, atol=1e-5)


def test_seeds_2_without_noise_is_dpmpp_2s(schedule):
    sigmas = calculate_sigmas(schedule, "karras", 10)
    x = start_sample((2, 1, 8, 8), sigmas[0])
    ours = get_sampler("seeds_2")(wobbly_denoiser, x, sigmas, eta=0.0)
    theirs = get_sampler("dpmpp_2s_ancestral")(wobbly_denoiser, x, sigmas, eta=0.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_seeds_3_is_third_order_without_noise(schedule):
    x = start_sample((4, 1, 8, 8), 14.6, seed=3).double()
    errors = {}
    for name in ("seeds_2", "seeds_3"):
        errors[name] = []
        for steps in (10, 20):
            sig = calculate_sigmas(schedule, "exponential", steps + 1)[:-1].double()
            out = get_sampler(name)(gaussian_denoiser, x, sig, eta=0.0)
            errors[name].append((out - exact_ode(x, float(sig[0]), float(sig[-1]))).abs().max().item())
    assert errors["seeds_3"][1] * 4.5 < errors["seeds_3"][0], errors
    assert errors["seeds_3"][1] * 50 < errors["seeds_2"][1], errors
    with pytest.raises(ValueError, match="'seeds_3': stage fractions must increase"):
        get_sampler("seeds_3")(gaussian_denoiser, x, sig, r_1=0.7, r_2=0.6)


# ---------------------------------------------------------------- SA-Solver


@pytest.mark.parametrize("tau", [0.0, 1.0, 0.6])
def test_stochastic_adams_weights_integrate_exactly(tau):
    """sum_j b_j P(lambda_j) equals the integral of k e^{-k (lambda_t - u)} P(u) for every polynomial P of
    degree < the number of nodes; for P(u) = (u - lambda_s)^m that integral is I_m = h^m - (m / k) I_{m-1},
    I_0 = 1 - e^{-k h} (integration by parts)."""
    k = 1 + tau * tau
    lambda_s, lambda_t = 0.4, 0.75
    h = lambda_t - lambda_s
    exact = [-math.expm1(-k * h)]
    for m in range(1, 6):
        exact.append(h**m - m / k * exact[-1])
    for nodes in ([lambda_s, 0.1, -0.3], [lambda_t, lambda_s, 0.1, -0.3, -0.6], [lambda_s]):
        b = stochastic_adams_coeffs(nodes, lambda_s, lambda_t, tau)
        for m in range(len(nodes)):
            assert sum(bj * (n - lambda_s) ** m for bj, n in zip(b, nodes, strict=True)) == pytest.approx(
                exact[m], rel=1e-10, abs=1e-13)
    # The simplified order-2 weights keep the total and are first-order accurate in the slope.
    for corrector, nodes in ((False, [lambda_s, 0.1]), (True, [lambda_t, lambda_s])):
        simple = stochastic_adams_coeffs(nodes, lambda_s, lambda_t, tau, simple_order_2=True, corrector=corrector)
        full = stochastic_adams_coeffs(nodes, lambda_s, lambda_t, tau, corrector=corrector)
        assert sum(simple) == pytest.approx(exact[0], rel=1e-12)
        assert max(abs(a - b) for a, b in zip(simple, full, strict=True)) < (k * h) ** 2 / 2
        assert simple != pytest.approx(full, rel=1e-3)


def test_stochastic_adams_weights_match_diffusers():
    """diffusers' SASolverScheduler builds the same weights from closed-form exponential integrals; its VP-form
    coefficient c_j relates to ours by b_j = (1 + tau^2) e^{-(1 + tau^2) lambda_t} c_j."""
    from diffusers import SASolverScheduler

    sched = SASolverScheduler(**SD_CONFIG, algorithm_type="data_prediction")
    lambda_s, lambda_t = 0.4, 0.75
    for tau in (0.0, 1.0, 0.6):
        for nodes in ([lambda_s], [lambda_s, 0.1], [lambda_s, 0.1, -0.3], [lambda_t, lambda_s, 0.1, -0.3]):
            theirs = sched.get_coefficients_fn(len(nodes), torch.tensor(lambda_s, dtype=torch.float64),
                                               torch.tensor(lambda_t, dtype=torch.float64),
                                               [torch.tensor(n, dtype=torch.float64) for n in nodes],
                                               torch.tensor(tau, dtype=torch.float64))
            k = 1 + tau * tau
            expected = [k * math.exp(-k * lambda_t) * float(c) for c in theirs]
            assert stochastic_adams_coeffs(nodes, lambda_s, lambda_t, tau) == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("tau", [1.0, 0.5, 0.0])
def test_sa_solver_matches_diffusers(tau, monkeypatch):
    """Whole runs against diffusers' SASolverScheduler with identical noise, at predictor and corrector order 1
    (diffusers adds an O(h^3) term of its own to order 2, which the paper's method and ComfyUI do not have; the
    higher-order weights are compared above). tau is held constant, so the two choices of where tau is read
    (diffusers: the step's start, ComfyUI and we: its end) agree; the schedule ends above 0."""
    from diffusers import SASolverScheduler
    from diffusers.schedulers import scheduling_sasolver as module

    sched = SASolverScheduler(**SD_CONFIG, predictor_order=1, corrector_order=1, tau_func=lambda t: tau,
                              lower_order_final=False)
    sched.set_timesteps(12)
    x = _x(sched.sigmas[0])
    queue = NoiseQueue(x.shape, 12)
    monkeypatch.setattr(module, "randn_tensor", queue.randn_tensor)
    final, starts = run_diffusers_vp(sched, x, _dpmsolver_sigma)
    assert float(sched.sigmas[-1]) > 0

    def ours(model, x, sigmas, **kwargs):
        return get_sampler("sa_solver")(model, x, sigmas, predictor_order=1, corrector_order=1, eta=tau,
                                        sde_start_sigma=math.inf, sde_end_sigma=0.0, **kwargs)

    compare(ours, sched.sigmas, x, starts, final, noise_sampler=queue.sampler)


def test_sa_solver_default_sde_interval_is_20_to_80_percent():
    sampling = ModelSampling(DiscreteSchedule.from_config())
    start, end = default_sde_interval()
    assert start == pytest.approx(float(sampling.schedule.t_to_sigma(torch.tensor(0.8 * 999))))
    assert end == pytest.approx(float(sampling.schedule.t_to_sigma(torch.tensor(0.2 * 999))))
    assert 0.1 < end < 1.0 < start < 10.0


def test_sa_solver_noise_only_inside_the_interval(schedule):
    sigmas = calculate_sigmas(schedule, "karras", 12)
    x = start_sample((1, 1, 4, 4), sigmas[0])
    draws = Draws(x.shape)
    get_sampler("sa_solver")(gaussian_denoiser, x, sigmas, noise_sampler=draws)
    start, end = default_sde_interval()
    sig = sigmas.tolist()
    expected = [(a, b) for a, b in itertools.pairwise(sig) if b > 0 and end <= b <= start]
    assert draws.intervals == [pytest.approx(p) for p in expected] and len(expected) >= 3
    draws = Draws(x.shape)
    get_sampler("sa_solver")(gaussian_denoiser, x, sigmas, noise_sampler=draws, sde_start_sigma=100.0,
                             sde_end_sigma=0.0)
    assert len(draws.intervals) == 11  # every step but the one to 0
    with pytest.raises(ValueError, match="needs a noise_sampler"):
        get_sampler("sa_solver")(gaussian_denoiser, x, sigmas)
    get_sampler("sa_solver")(gaussian_denoiser, x, sigmas, eta=0.0)  # no noise, no sampler needed


def test_sa_solver_noise_window_follows_the_models_schedule(schedule):
    """Given the model's sampling (a linear-beta schedule here), the window is its sigmas at 20% and 80%."""
    other = ModelSampling(DiscreteSchedule.from_config(beta_schedule="linear", linear_start=1e-4, linear_end=0.02))
    start, end = sde_interval(other)
    assert (start, end) != pytest.approx(default_sde_interval(), rel=0.05)
    sigmas = calculate_sigmas(other.schedule, "karras", 16)
    x = start_sample((1, 1, 4, 4), sigmas[0])
    draws = Draws(x.shape)
    get_sampler("sa_solver_pece")(gaussian_denoiser, x, sigmas, noise_sampler=draws, model_sampling=other)
    sig = sigmas.tolist()
    expected = [(a, b) for a, b in itertools.pairwise(sig) if b > 0 and end <= b <= start]
    assert draws.intervals == [pytest.approx(p) for p in expected] and len(expected) >= 3


def test_sa_solver_step_is_the_exact_sde_solution_for_a_constant_denoiser():
    """Constant D: the predictor and the corrector both solve the step exactly and share its noise, so the
    state the next model call sees is (s1/s0) e^{-h} x + (1 - e^{-2h}) D + s1 sqrt(1 - e^{-2h}) z."""
    sigmas = torch.tensor([4.0, 2.0, 1.0, 0.5])
    x = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(2)) * 4
    for name, calls_per_sigma in (("sa_solver", 1), ("sa_solver_pece", 2)):
        model, draws = ConstantDenoiser(), Draws(x.shape)
        out = get_sampler(name)(model, x, sigmas, noise_sampler=draws, sde_start_sigma=10.0, sde_end_sigma=0.1)
        assert len(draws.drawn) == 3
        expected = x
        for step in range(3):
            s0, s1 = float(sigmas[step]), float(sigmas[step + 1])
            h = math.log(s0 / s1)
            expected = ((s1 / s0) * math.exp(-h) * expected - math.expm1(-2 * h) * MU
                        + s1 * math.sqrt(-math.expm1(-2 * h)) * draws.drawn[step])
            seen = [x_in for sigma, x_in in model.inputs if sigma == pytest.approx(s1)]
            assert len(seen) == (calls_per_sigma if step < 2 else 0)
            for x_in in seen:
                torch.testing.assert_close(x_in, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)  # ends above 0: the state at 0.5


def test_sa_solver_reductions_and_call_counts(schedule):
    sigmas = calculate_sigmas(schedule, "karras", 10)
    x = start_sample((2, 1, 8, 8), sigmas[0])
    # First-order predictor, no corrector, no noise: DPM-Solver++(1), i.e. DDIM / Euler in sigma.
    plain = get_sampler("sa_solver")(wobbly_denoiser, x, sigmas, eta=0.0, predictor_order=1, corrector_order=0)
    torch.testing.assert_close(plain, get_sampler("euler")(wobbly_denoiser, x, sigmas), rtol=1e-5, atol=1e-5)
    partial = sigmas[:6]  # a schedule stopping above 0 returns the state at its last sigma
    plain = get_sampler("sa_solver")(wobbly_denoiser, x, partial, eta=0.0, predictor_order=1, corrector_order=0)
    torch.testing.assert_close(plain, get_sampler("euler")(wobbly_denoiser, x, partial), rtol=1e-5, atol=1e-5)
    for name, calls in (("sa_solver", 10), ("sa_solver_pece", 19)):
        model = Counting()
        get_sampler(name)(model, x, sigmas, noise_sampler=seeded_noise_sampler(x, 1))
        assert len(model.sigmas) == calls
    with pytest.raises(ValueError, match=r"'sa_solver': predictor_order must be 1\.\.6"):
        get_sampler("sa_solver")(gaussian_denoiser, x, sigmas, predictor_order=0)


def test_sa_solver_is_high_order_without_noise(schedule):
    x = start_sample((4, 1, 8, 8), 14.6, seed=3).double()
    for name in ("sa_solver", "sa_solver_pece"):
        errors = []
        for steps in (10, 20):
            sig = calculate_sigmas(schedule, "exponential", steps + 1)[:-1].double()
            out = get_sampler(name)(gaussian_denoiser, x, sig, eta=0.0)
            errors.append((out - exact_ode(x, float(sig[0]), float(sig[-1]))).abs().max().item())
        assert errors[1] * 8 < errors[0], (name, errors)
        simple = get_sampler(name)(gaussian_denoiser, x, sig, eta=0.0, simple_order_2=True)
        assert (simple - exact_ode(x, float(sig[0]), float(sig[-1]))).abs().max().item() < 1e-3


# ---------------------------------------------------------------- reproducibility


@pytest.mark.parametrize("name", GROUP_B)
def test_reproducible_bit_for_bit(name, schedule):
    sigmas = calculate_sigmas(schedule, "karras", 8)
    x = start_sample((2, 1, 8, 8), sigmas[0])

    def run(seed):
        return get_sampler(name)(wobbly_denoiser, x.clone(), sigmas, noise_sampler=seeded_noise_sampler(x, seed))

    first = run(5)
    assert torch.equal(first, run(5))
    if name in STOCHASTIC_SAMPLERS:
        assert not torch.allclose(first, run(6))


@pytest.mark.parametrize("name", GROUP_B)
def test_ksampler_flow_runs_each_sampler(name):
    """Through diffusion.sampling.ksampler.sample as KSampler calls it: seeded, extra_args reach every model call."""
    from diffusion.sampling.ksampler import ksampler_sigmas, sample
    from diffusion.sampling.noise import prepare_noise

    ms = ModelSampling(DiscreteSchedule.from_config())
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigmas = ksampler_sigmas(ms.schedule, "karras", 6, sampler_name=name)
    seen = []

    def model(x, sigma, cond=None):
        seen.append(cond)
        return wobbly_denoiser(x, sigma)

    runs = [sample(model, name, sigmas, latent, prepare_noise(latent, 3), model_sampling=ms, seed=3,
                   extra_args={"cond": "c"}) for _ in range(2)]
    assert torch.isfinite(runs[0]).all() and torch.equal(runs[0], runs[1])
    assert seen and set(seen) == {"c"}
