"""Model patches that change how guidance combines predictions: GuidanceHooks for a MODEL clone.

Every hook works on the guider's denoised estimates (x0 space). Where a paper defines its rule on the
network's eps or v output, the rule is rewritten through the VE sample x = x0 + sigma * eps:
eps-space value sigma * eps = x - D, and v = (x / (sigma^2 + 1) - D) * sqrt(sigma^2 + 1) / sigma.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..sampling.guidance import CFGGuider, Conditioning, ExtraCond, GuidanceHooks, GuidanceStep
from ..sampling.model_sampling import ModelSampling


def _per_sample(sigma: Tensor, x: Tensor) -> Tensor:
    return sigma.to(x).reshape(-1, *([1] * (x.ndim - 1)))


def rescale_cfg(step: GuidanceStep, multiplier: float) -> Tensor:
    """RescaleCFG (Lin et al. 2023, section 3.4): CFG at a high scale inflates the prediction's standard
    deviation (over-exposure with zero-terminal-SNR schedules). In v space: v_cfg = v_u + w (v_c - v_u),
    v_rescaled = v_cfg * std(v_c) / std(v_cfg) (per sample, over C, H, W; unbiased std),
    v = phi v_rescaled + (1 - phi) v_cfg; then back to x0: D = x / (sigma^2 + 1) - v sigma / sqrt(sigma^2 + 1)."""
    x = step.x
    s = _per_sample(step.sigma, x)
    root = (s**2 + 1).sqrt()
    x_scaled = x / (s**2 + 1)
    v_cond = (x_scaled - step.cond) * root / s
    v_uncond = (x_scaled - step.uncond) * root / s
    v_cfg = v_uncond + step.cond_scale * (v_cond - v_uncond)
    dims = tuple(range(1, x.ndim))
    ratio = v_cond.std(dim=dims, keepdim=True) / v_cfg.std(dim=dims, keepdim=True)
    v = multiplier * v_cfg * ratio + (1.0 - multiplier) * v_cfg
    return x_scaled - v * s / root


def rescale_cfg_hooks(multiplier: float) -> GuidanceHooks:
    if not 0.0 <= multiplier <= 1.0:
        raise ValueError(f"RescaleCFG multiplier must be within 0..1, got {multiplier}")
    return GuidanceHooks(combine=lambda step: rescale_cfg(step, multiplier))


def optimized_scale(positive: Tensor, negative: Tensor, eps: float = 1e-8) -> Tensor:
    """CFG-Zero* (Fan et al. 2025): s* = <p, n> / (||n||^2 + eps) per sample, the scale of the unconditional
    prediction n that best approximates the conditional p (least squares), shaped [B, 1, ..., 1]."""
    p, n = positive.flatten(1).float(), negative.flatten(1).float()
    scale = (p * n).sum(1) / (n.pow(2).sum(1) + eps)
    return scale.reshape(-1, *([1] * (positive.ndim - 1))).to(positive.dtype)


def cfg_zero_star(step: GuidanceStep) -> Tensor:
    """CFG-Zero*'s optimized scale, as ComfyUI's node exposes it (no zero-init steps: the paper's separate
    option is not part of that interface). s* is measured on the noise predictions x - D_c and x - D_u and
    scales the unconditional estimate: D = s* D_u + w (D_c - s* D_u), w the guidance scale, applied after
    the guider's combination (a post hook: D = combined + (s* - 1) D_u + w (1 - s*) D_u)."""
    alpha = optimized_scale(step.x - step.cond, step.x - step.uncond)
    return step.denoised + step.uncond * (alpha - 1.0) + step.cond_scale * step.uncond * (1.0 - alpha)


def cfg_zero_star_hooks() -> GuidanceHooks:
    return GuidanceHooks(post=[cfg_zero_star])


def perp_neg(cond: Tensor, uncond: Tensor, nocond: Tensor, cfg: float, neg_scale: float) -> Tensor:
    """Perp-Neg (Armandpour et al. 2023): with the empty prompt's estimate e, pos = D_c - e and
    neg = D_n - e, only the negative's component perpendicular to the positive is subtracted:
    perp = neg - <neg, pos> / ||pos||^2 pos (per sample), D = e + cfg (pos - neg_scale perp). So a
    negative that overlaps the positive's meaning cannot cancel it."""
    pos, neg = cond - nocond, uncond - nocond
    dims = tuple(range(1, pos.ndim))
    dot = (neg * pos).sum(dim=dims, keepdim=True)
    norm = pos.pow(2).sum(dim=dims, keepdim=True).clamp_min(torch.finfo(pos.dtype).tiny)
    perp = neg - dot / norm * pos
    return nocond + cfg * (pos - neg_scale * perp)


def positive_only(guider: CFGGuider, conditioning: Conditioning,
                  denoiser: Callable[..., Tensor] | None = None) -> CFGGuider:
    """A guider evaluating only `conditioning` (areas, masks and extra inputs as the guider resolves them),
    with `denoiser` in place of the guider's own when given (e.g. one that adds UNet patches)."""
    return CFGGuider(denoiser or guider.denoiser, guider.model_sampling, conditioning, [], 1.0,
                     extra_cond=guider.extra_cond)


class PerpNegGuidance(CFGGuider):
    """PerpNegGuider: every step evaluates the positive, the negative and the empty conditioning (batched
    where their shapes agree) and combines them with `perp_neg`, at any cfg (also 1); the model's post hooks
    then run on the result as after CFG."""

    def __init__(self, denoiser: Callable[..., Tensor], model_sampling: ModelSampling, positive: Conditioning,
                 negative: Conditioning, empty: Conditioning, cfg: float, neg_scale: float,
                 extra_cond: ExtraCond | None = None, hooks: GuidanceHooks | None = None) -> None:
        if not negative or not empty:
            raise ValueError("PerpNegGuider needs a negative and an empty conditioning")
        super().__init__(denoiser, model_sampling, positive, negative, cfg, extra_cond, hooks)
        self.empty = empty
        self.neg_scale = float(neg_scale)

    def __call__(self, x: Tensor, sigma: Tensor, model_options: dict[str, Any] | None = None, **_: Any) -> Tensor:
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
        cond, uncond, nocond = self._predict([self.positive, self.negative, self.empty], x, sigma)
        step = GuidanceStep(cond, uncond, self.cfg, x, sigma, cond, self)
        step.denoised = perp_neg(cond, uncond, nocond, self.cfg, self.neg_scale)
        for hook in self.hooks.merged((model_options or {}).get("guidance_hooks")).post:
            step.denoised = hook(step)
        return step.denoised


def perp_neg_hooks(empty: Conditioning, neg_scale: float) -> GuidanceHooks:
    """The combination of the (deprecated) PerpNeg node: one extra evaluation of `empty` per step."""

    def combine(step: GuidanceStep) -> Tensor:
        nocond = positive_only(step.guider, empty)(step.x, step.sigma)
        return perp_neg(step.cond, step.uncond, nocond, step.cond_scale, neg_scale)

    return GuidanceHooks(combine=combine)
