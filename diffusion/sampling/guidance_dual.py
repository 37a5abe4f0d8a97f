"""Guidance with two positive conditionings and a negative (ComfyUI's DualCFGGuider).

With denoised estimates p (cond1), m (cond2) and n (negative), and CFG(c, u, s) = u + s (c - u):

- "regular": D = CFG(p, m, s1) - m + CFG(m, n, s2) = n + s1 (p - m) + s2 (m - n): two independent guidance
  directions, cond1 away from cond2 and cond2 away from the negative, each with its own scale.
- "nested":  D = n + s2 (CFG(p, m, s1) - n): first guide cond1 against cond2, then guide that result against
  the negative.

s1 is `cfg_conds`, s2 is `cfg_cond2_negative`. Each inner CFG runs the model's guidance hooks (a `combine`
replacing the CFG formula, then the `post` hooks), as a single CFG would; the outer blend of "nested" does not.
In "regular" style a scale of 1 needs no evaluation of its uncond side: s2 == 1 skips the negative (the second
term is then m), and s1 == s2 == 1 also skips cond2 (D = p).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .guidance import CFGGuider, Conditioning, ExtraCond, GuidanceHooks, GuidanceStep
from .model_sampling import ModelSampling

DUAL_CFG_STYLES = ("regular", "nested")


class DualCFGGuider(CFGGuider):
    """`guider(x, sigma) -> denoised` guided by cond1, cond2 and a negative; usable as a sampler's model.

    All entries of the three lists whose inputs have equal shapes run in one batched denoiser call per step."""

    def __init__(
        self,
        denoiser: Callable[..., Tensor],
        model_sampling: ModelSampling,
        cond1: Conditioning,
        cond2: Conditioning,
        negative: Conditioning,
        cfg_conds: float,
        cfg_cond2_negative: float,
        style: str = "regular",
        extra_cond: ExtraCond | None = None,
        hooks: GuidanceHooks | None = None,
    ) -> None:
        if style not in DUAL_CFG_STYLES:
            raise ValueError(f"DualCFGGuider style must be one of {DUAL_CFG_STYLES}, got {style!r}")
        if not cond2:
            raise ValueError("DualCFGGuider: cond2 conditioning is empty")
        if not negative:
            raise ValueError("DualCFGGuider: negative conditioning is empty")
        super().__init__(denoiser, model_sampling, cond1, negative, cfg_conds, extra_cond, hooks)
        self.middle = cond2
        self.cfg2 = float(cfg_cond2_negative)
        self.style = style

    def _cfg(self, cond: Tensor, uncond: Tensor, scale: float, x: Tensor, sigma: Tensor,
             hooks: GuidanceHooks) -> Tensor:
        step = GuidanceStep(cond, uncond, scale, x, sigma, cond, self)
        step.denoised = hooks.combine(step) if hooks.combine else uncond + (cond - uncond) * scale
        for hook in hooks.post:
            step.denoised = hook(step)
        return step.denoised

    def __call__(self, x: Tensor, sigma: Tensor, model_options: dict[str, Any] | None = None, **_: Any) -> Tensor:
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
        hooks = self.hooks.merged((model_options or {}).get("guidance_hooks"))
        s1, s2 = self.cfg, self.cfg2
        if self.style == "nested":
            p, m, n = self._predict([self.positive, self.middle, self.negative], x, sigma)
            return n + s2 * (self._cfg(p, m, s1, x, sigma, hooks) - n)
        if s2 == 1.0 and s1 == 1.0:
            (p,) = self._predict([self.positive], x, sigma)
            m = n = torch.zeros_like(p)
        elif s2 == 1.0:
            p, m = self._predict([self.positive, self.middle], x, sigma)
            n = m
        else:
            p, m, n = self._predict([self.positive, self.middle, self.negative], x, sigma)
        return self._cfg(p, m, s1, x, sigma, hooks) - m + self._cfg(m, n, s2, x, sigma, hooks)
