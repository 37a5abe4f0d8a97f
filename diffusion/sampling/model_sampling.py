"""Turn a network (eps-, v- or EDM-prediction) into a denoiser D(x, sigma) -> x0 estimate.

Samplers work on the variance-exploding sample x = x0 + sigma * noise. A discrete-time network was trained on
the variance-preserving sample sqrt(abar) * x0 + sqrt(1 - abar) * noise = x / sqrt(sigma^2 + 1), at the integer
timestep whose sigma is nearest, hence c_in and the timestep conversion below. A continuous-time network
(`ContinuousModelSampling`: EDM, CosXL, Playground v2.5) takes any sigma in its range with Karras et al.'s
preconditioning instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .schedules import DiscreteSchedule, rescale_zero_terminal_snr

PREDICTION_TYPES = ("eps", "v_prediction", "lcm", "x0", "img_to_img")
# ModelSamplingDiscrete's choices, in ComfyUI's order (kept apart: other model samplings may add prediction types).
DISCRETE_SAMPLINGS = ("eps", "v_prediction", "lcm", "x0", "img_to_img")


def _expand(sigma: Tensor, x: Tensor) -> Tensor:
    """Broadcast a per-sample sigma [B] (or scalar) against x [B, ...]."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        return sigma
    return sigma.reshape(sigma.shape[0], *([1] * (x.ndim - 1)))


class ModelSampling:
    """A discrete model's schedule plus its prediction type: everything needed to go between sigma, the
    network's timestep, the network's input scale and its output."""

    def __init__(self, schedule: DiscreteSchedule, prediction: str = "eps", quantize_timesteps: bool = True) -> None:
        if prediction not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {prediction!r}; expected one of {PREDICTION_TYPES}")
        self.schedule = schedule
        self.prediction = prediction
        # ComfyUI feeds the nearest integer timestep; k-diffusion's default interpolates.
        self.quantize_timesteps = quantize_timesteps

    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max

    def timestep(self, sigma: Tensor) -> Tensor:
        return self.schedule.sigma_to_t(sigma, quantize=self.quantize_timesteps)

    def sigma(self, timestep: Tensor) -> Tensor:
        return self.schedule.t_to_sigma(timestep)

    def percent_to_sigma(self, percent: float) -> float:
        """Sigma at a fraction of the sampling process (0 = start, pure noise; 1 = end, clean)."""
        if percent <= 0.0:
            return float("inf")
        if percent >= 1.0:
            return 0.0
        return float(self.sigma(torch.tensor((1.0 - percent) * (len(self.schedule) - 1))))

    def calculate_input(self, sigma: Tensor, x: Tensor) -> Tensor:
        if self.prediction == "img_to_img":  # the network takes the noisy latent as it is
            return x
        return x / (_expand(sigma, x) ** 2 + 1).sqrt()

    def calculate_denoised(self, sigma: Tensor, model_output: Tensor, x: Tensor) -> Tensor:
        """The x0 estimate from the network's output: eps: x - sigma eps; v: x / (sigma^2 + 1) - v sigma /
        sqrt(sigma^2 + 1); x0 and img_to_img: the output itself; lcm: the eps estimate passed through the
        consistency-model boundary condition (`_lcm_denoised`)."""
        s = _expand(sigma, x)
        if self.prediction == "eps":
            return x - s * model_output
        if self.prediction in ("x0", "img_to_img"):
            return model_output
        if self.prediction == "lcm":
            return self._lcm_denoised(sigma, model_output, x)
        return x / (s**2 + 1) - model_output * s / (s**2 + 1).sqrt()

    def _lcm_denoised(self, sigma: Tensor, model_output: Tensor, x: Tensor) -> Tensor:
        """Latent consistency models (Luo et al. 2023) parameterise f(x, t) = c_skip(t) x + c_out(t) x0_eps
        with sigma_data = 0.5 and the timestep scaled by 10: c_skip = sigma_data^2 / ((10t)^2 + sigma_data^2),
        c_out = 10t / sqrt((10t)^2 + sigma_data^2), so f is the identity at t = 0 (the boundary condition)."""
        x0 = x - _expand(sigma, x) * model_output
        t = _expand(self.timestep(torch.as_tensor(sigma, device=x.device).reshape(-1)).to(x), x) * 10.0
        sigma_data = 0.5
        c_skip = sigma_data**2 / (t**2 + sigma_data**2)
        c_out = t / (t**2 + sigma_data**2).sqrt()
        return c_out * x0 + c_skip * x

    def noise_scaling(self, sigma: Tensor | float, noise: Tensor, latent: Tensor, max_denoise: bool = False) -> Tensor:
        """The sample at noise level sigma for clean `latent`. With `max_denoise` (sampling from the top of the
        schedule) the noise is scaled by sqrt(1 + sigma^2), as ComfyUI does: the variance of the trained sample
        at t = T-1 when the latent carries no signal."""
        s = _expand(torch.as_tensor(sigma), noise)
        scale = (1.0 + s**2).sqrt() if max_denoise else s
        return latent + noise * scale

    def inverse_noise_scaling(self, sigma: Tensor | float, latent: Tensor) -> Tensor:
        """Identity for these models: the variance-exploding sample at sigma 0 already is the latent."""
        return latent


class DistilledModelSampling(ModelSampling):
    """The schedule of a model distilled to `levels` of its training timesteps (LCM: 50 of 1000).

    Level k (0 = least noisy) is training timestep k * stride + stride - 1 with stride = T / levels, i.e.
    t = 19, 39, ..., 999 for LCM; schedulers see only these sigmas, and a sigma is fed to the network as the
    training timestep of its nearest level. `percent_to_sigma` and `sigma` speak in training timesteps."""

    def __init__(self, schedule: DiscreteSchedule, prediction: str = "lcm", levels: int = 50) -> None:
        total = len(schedule)
        if levels < 2 or total % levels:
            raise ValueError(f"a distilled schedule needs a number of levels that divides {total}, got {levels}")
        self.stride = total // levels
        self.training_steps = total
        picked = torch.arange(levels) * self.stride + self.stride - 1
        super().__init__(DiscreteSchedule(schedule.alphas_cumprod[picked]), prediction, quantize_timesteps=True)

    def timestep(self, sigma: Tensor) -> Tensor:
        level = self.schedule.sigma_to_t(sigma, quantize=True)
        return level * self.stride + (self.stride - 1)

    def sigma(self, timestep: Tensor) -> Tensor:
        level = ((torch.as_tensor(timestep, dtype=torch.float32) - (self.stride - 1)) / self.stride)
        return self.schedule.t_to_sigma(level.clamp(0, len(self.schedule) - 1))

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return float("inf")
        if percent >= 1.0:
            return 0.0
        return float(self.sigma(torch.tensor((1.0 - percent) * (self.training_steps - 1))))


def discrete_model_sampling(sampling: str, zsnr: bool = False,
                            schedule: DiscreteSchedule | None = None) -> ModelSampling:
    """ModelSamplingDiscrete's choice: SD's scaled-linear schedule (or `schedule`, from its betas) with the
    prediction type `sampling`; `zsnr` rescales it to zero terminal SNR (Lin et al. 2023, `schedules.
    rescale_zero_terminal_snr`), so the last training level is (almost) pure noise. `lcm` also distils the
    schedule to 50 levels (DistilledModelSampling)."""
    if sampling not in DISCRETE_SAMPLINGS:
        raise ValueError(f"unknown sampling {sampling!r}; expected one of {DISCRETE_SAMPLINGS}")
    alphas_cumprod = (schedule or DiscreteSchedule.from_config()).alphas_cumprod
    if zsnr:
        alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod.clone())
    base = DiscreteSchedule(alphas_cumprod)
    if sampling == "lcm":
        return DistilledModelSampling(base, "lcm")
    return ModelSampling(base, sampling)


class Denoiser:
    """`net(x_in, t, **cond) -> eps or v` wrapped as `D(x, sigma, **cond) -> x0 estimate`. With `pass_sigma` the
    net also gets `sigma=` (the exact sigma, which its model patches may need; t is quantized)."""

    def __init__(self, net: Callable[..., Tensor], model_sampling: ModelSampling, pass_sigma: bool = False) -> None:
        self.net = net
        self.model_sampling = model_sampling
        self.pass_sigma = pass_sigma

    def __call__(self, x: Tensor, sigma: Tensor, **cond: Tensor) -> Tensor:
        ms = self.model_sampling
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
        if self.pass_sigma:
            cond = {**cond, "sigma": sigma}
        out = self.net(ms.calculate_input(sigma, x), ms.timestep(sigma).to(x.device), **cond)
        return ms.calculate_denoised(sigma, out.to(x.dtype), x)


# --- continuous-time models (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
# Models", EDM) ----------------------------------------------------------------------------------------------

# ModelSamplingContinuousEDM's choices, in ComfyUI's order.
CONTINUOUS_EDM_SAMPLINGS = ("v_prediction", "edm", "edm_playground_v2.5", "eps", "cosmos_rflow")
CONTINUOUS_V_SAMPLINGS = ("v_prediction",)
# sigma_data of each choice: 1 for the CosXL kind (an SD-style eps/v network made continuous), 0.5 for EDM's own.
SIGMA_DATA = {"v_prediction": 1.0, "eps": 1.0, "edm": 0.5}
CONTINUOUS_LEVELS = 1000  # the size of the sigma table the table-based schedulers (simple, beta...) pick from


class ContinuousSchedule(DiscreteSchedule):
    """The noise levels of a continuous-time model, in the shape the schedulers expect of a DiscreteSchedule.

    `sigmas` is a table of `levels` values log-spaced from sigma_min to sigma_max (what the table-based
    schedulers, simple, ddim_uniform and beta, pick from). The "timestep" index u in [0, levels - 1] that the
    time-based schedulers (normal, sgm_uniform) space evenly is linear in the model's own time variable
    `time(sigma)`: for EDM's 1/4 ln sigma that is the table's log spacing exactly; for ContinuousV's arctan time
    it is evenly spaced in arctan(sigma), as those schedulers space a model's timesteps."""

    def __init__(self, sigma_min: float, sigma_max: float, time: Callable[[Tensor], Tensor] | None = None,
                 inverse: Callable[[Tensor], Tensor] | None = None, levels: int = CONTINUOUS_LEVELS) -> None:
        if not (math.isfinite(sigma_min) and math.isfinite(sigma_max) and 0 < sigma_min < sigma_max):
            raise ValueError(f"a continuous model needs 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, "
                             f"sigma_max={sigma_max}")
        sigmas = torch.linspace(math.log(sigma_min), math.log(sigma_max), levels, dtype=torch.float64).exp()
        super().__init__(1.0 / (1.0 + sigmas**2))
        self.sigmas = sigmas.float()
        self.log_sigmas = sigmas.log().float()
        self._time = time or torch.log
        self._inverse = inverse or torch.exp
        ends = self._time(torch.tensor([sigma_min, sigma_max], dtype=torch.float64))
        self._time_min, self._time_max = float(ends[0]), float(ends[1])
        self._range = (float(sigma_min), float(sigma_max))

    @property
    def sigma_min(self) -> float:
        return self._range[0]

    @property
    def sigma_max(self) -> float:
        return self._range[1]

    def sigma_to_t(self, sigma: Tensor | float, quantize: bool = False) -> Tensor:
        """The index u of `sigma` (clamped to [0, levels - 1]); never quantized: the model takes any sigma."""
        time = self._time(torch.as_tensor(sigma, dtype=torch.float64))
        u = (time - self._time_min) / (self._time_max - self._time_min) * (len(self) - 1)
        return u.clamp(0, len(self) - 1).float()

    def t_to_sigma(self, t: Tensor | float) -> Tensor:
        u = torch.as_tensor(t, dtype=torch.float64).clamp(0, len(self) - 1)
        time = self._time_min + u / (len(self) - 1) * (self._time_max - self._time_min)
        return self._inverse(time).float()


def _edm_time(sigma: Tensor) -> Tensor:
    return 0.25 * torch.as_tensor(sigma).log()


def _edm_sigma(time: Tensor) -> Tensor:
    return (4.0 * torch.as_tensor(time)).exp()


def _arctan_time(sigma: Tensor) -> Tensor:
    return torch.as_tensor(sigma).atan() * (2.0 / math.pi)


def _arctan_sigma(time: Tensor) -> Tensor:
    return (torch.as_tensor(time) * (math.pi / 2.0)).tan()


class ContinuousModelSampling(ModelSampling):
    """A network trained on every sigma in [sigma_min, sigma_max] with EDM's preconditioning:
    D(x, sigma) = c_skip x + c_out F(c_in x, c_noise), c_in = 1 / sqrt(sigma^2 + sigma_data^2) and, by
    prediction type,
      eps:          c_skip = 1, c_out = -sigma (F predicts the noise);
      v_prediction: c_skip = sigma_data^2 / (sigma^2 + sigma_data^2), c_out = -sigma sigma_data /
                    sqrt(sigma^2 + sigma_data^2) (F predicts v; sigma_data = 1 gives the discrete v formula);
      edm:          the same c_skip, c_out = +sigma sigma_data / sqrt(sigma^2 + sigma_data^2) (EDM's F).
    c_noise is the model's time: EDM's 1/4 ln sigma, or (ModelSamplingContinuousV) arctan(sigma) * 2 / pi."""

    def __init__(self, prediction: str, sigma_min: float, sigma_max: float, sigma_data: float = 1.0,
                 time: str = "log") -> None:
        if prediction not in SIGMA_DATA:
            raise ValueError(f"unknown continuous prediction type {prediction!r}; expected one of "
                             f"{tuple(SIGMA_DATA)}")
        if time not in ("log", "arctan"):
            raise ValueError(f"unknown continuous time {time!r}; expected 'log' or 'arctan'")
        if time == "arctan" and sigma_max >= 1e7:
            raise ValueError(f"sigma_max {sigma_max} is too large for arctan time (float precision)")
        self._time, self._inverse = (_edm_time, _edm_sigma) if time == "log" else (_arctan_time, _arctan_sigma)
        self.schedule = ContinuousSchedule(sigma_min, sigma_max, self._time, self._inverse)
        self.prediction = prediction
        self.sigma_data = float(sigma_data)
        self.time = time
        self.quantize_timesteps = False

    def timestep(self, sigma: Tensor) -> Tensor:
        return self._time(torch.as_tensor(sigma, dtype=torch.float32))

    def sigma(self, timestep: Tensor) -> Tensor:
        return self._inverse(torch.as_tensor(timestep, dtype=torch.float32))

    def percent_to_sigma(self, percent: float) -> float:
        """Log-linear between sigma_max (0 %) and sigma_min (100 %); inf before the start, 0 after the end."""
        if percent <= 0.0:
            return float("inf")
        if percent >= 1.0:
            return 0.0
        log_min, log_max = math.log(self.sigma_min), math.log(self.sigma_max)
        return math.exp(log_min + (1.0 - percent) * (log_max - log_min))

    def calculate_input(self, sigma: Tensor, x: Tensor) -> Tensor:
        return x / (_expand(sigma, x) ** 2 + self.sigma_data**2).sqrt()

    def calculate_denoised(self, sigma: Tensor, model_output: Tensor, x: Tensor) -> Tensor:
        s = _expand(sigma, x)
        if self.prediction == "eps":
            return x - s * model_output
        sd2 = self.sigma_data**2
        c_skip = sd2 / (s**2 + sd2)
        c_out = s * self.sigma_data / (s**2 + sd2).sqrt()
        sign = 1.0 if self.prediction == "edm" else -1.0
        return c_skip * x + sign * c_out * model_output


def continuous_edm_model_sampling(sampling: str, sigma_max: float, sigma_min: float) -> ContinuousModelSampling:
    """ModelSamplingContinuousEDM's choice. `edm_playground_v2.5` (Playground v2.5 samples in its own latent
    space: per-channel mean and std of the SDXL VAE's latents) and `cosmos_rflow` (a rectified-flow video
    model's preconditioning) are refused: their models need more than a sigma mapping."""
    if sampling == "edm_playground_v2.5":
        raise ValueError("sampling 'edm_playground_v2.5' is not supported: Playground v2.5 samples in its own "
                         "latent space (per-channel latent mean and std), which this MODEL does not carry; use "
                         "'edm' only for models trained on the checkpoint's own latent scale")
    if sampling == "cosmos_rflow":
        raise ValueError("sampling 'cosmos_rflow' is not supported: it is the rectified-flow preconditioning of "
                         "NVIDIA Cosmos video models, a model family this engine does not load")
    if sampling not in CONTINUOUS_EDM_SAMPLINGS:
        raise ValueError(f"unknown sampling {sampling!r}; expected one of {CONTINUOUS_EDM_SAMPLINGS}")
    return ContinuousModelSampling(sampling, sigma_min, sigma_max, SIGMA_DATA[sampling], time="log")


def continuous_v_model_sampling(sampling: str, sigma_max: float, sigma_min: float) -> ContinuousModelSampling:
    """ModelSamplingContinuousV's choice: v-prediction (sigma_data 1) fed arctan(sigma) * 2 / pi as its time."""
    if sampling not in CONTINUOUS_V_SAMPLINGS:
        raise ValueError(f"unknown sampling {sampling!r}; expected one of {CONTINUOUS_V_SAMPLINGS}")
    return ContinuousModelSampling(sampling, sigma_min, sigma_max, 1.0, time="arctan")
