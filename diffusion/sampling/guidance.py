"""Classifier-free guidance over ComfyUI-style conditioning lists.

A conditioning is a list of `(context [1, T, dim], options)`. Every entry is one evaluation of the denoiser
on (a region of) the batch; entries of one list are blended by weighted averaging, each weighted by its
strength (times its mask, or an 8-pixel ramp at an area's inner edges), so overlapping areas mix and
uncovered pixels fall back to the other entries. Guidance: denoised = uncond + (cond - uncond) * cfg.

Options understood: `area` (h, w, y, x) in latent pixels (or ("percentage", h, w, y, x) in fractions of the
latent), `strength`, `mask` ([H, W] or [1, H, W], any
resolution, resized bilinearly to the latent) with `mask_strength` and `set_area_to_bounds`, and
`start_percent` / `end_percent` (active while the sampling progress is in that range). Other keys (e.g.
`pooled_output`) are turned into network kwargs by the caller's `extra_cond(options, x) -> dict`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..patches.context_bias import batch_bias, context_bias_patches
from ..patches.gligen_patch import grounding_patches
from ..patches.unet_patches import batch_roles
from .context_windows import window_rows
from .model_sampling import ModelSampling

Conditioning = list[tuple[Tensor, dict[str, Any]]]
ExtraCond = Callable[[dict[str, Any], Tensor], dict[str, Tensor]]


@dataclass
class GuidanceStep:
    """One guided evaluation, as the hooks see it: the denoised estimates of the positive and negative lists
    (`uncond` is `cond` when the negative is not evaluated), the guidance scale, the input and its sigma, and
    `denoised`, the combination so far. Hooks return a new `denoised`."""

    cond: Tensor
    uncond: Tensor
    cond_scale: float
    x: Tensor
    sigma: Tensor
    denoised: Tensor
    guider: Any


GuidanceHook = Callable[[GuidanceStep], Tensor]
# (x, sigma, inner) -> denoised: runs around the whole guided evaluation (context windows call `inner` per window)
GuidanceWrapper = Callable[[Tensor, Tensor, Callable[[Tensor, Tensor], Tensor]], Tensor]


@dataclass
class GuidanceHooks:
    """How a guider combines and post-processes its predictions (model patches such as RescaleCFG set these;
    CFG++ samplers add a post hook per call through `model_options`): `combine` replaces
    `uncond + (cond - uncond) * cfg`, then each `post` hook runs in order on the result. Each `wrap` runs around
    the whole evaluation, the first added innermost (AnimateDiff's frame count, context windows). Each `pre` hook
    returns new (cond, uncond) predictions before they are combined (ComfyUI's pre-cfg functions); with
    `uncond_at_cfg1` the negative is evaluated at cfg 1 too (ComfyUI's disable_cfg1_optimization); with
    `negative_first` a batched call puts the negative's rows first, the order ComfyUI's node packs read their
    `cond_or_uncond` in (set for a MODEL that carries packs' model_options)."""

    combine: GuidanceHook | None = None
    post: list[GuidanceHook] = field(default_factory=list)
    wrap: list[GuidanceWrapper] = field(default_factory=list)
    pre: list[Callable[[GuidanceStep], tuple[Tensor, Tensor]]] = field(default_factory=list)
    uncond_at_cfg1: bool = False
    negative_first: bool = False

    def merged(self, other: GuidanceHooks | None) -> GuidanceHooks:
        if other is None:
            return self
        return GuidanceHooks(other.combine or self.combine, [*self.post, *other.post], [*self.wrap, *other.wrap],
                             [*self.pre, *other.pre], self.uncond_at_cfg1 or other.uncond_at_cfg1,
                             self.negative_first or other.negative_first)

_AREA_FEATHER = 8  # latent pixels over which an area's weight ramps up from its inner edges
_EMPTY_WEIGHT = 1e-37  # so pixels no entry covers divide to 0 instead of NaN


def _mask_bounds(mask: Tensor) -> tuple[int, int, int, int]:
    """(h, w, y, x) of the bounding box of mask > 0 over all batch entries."""
    nonzero = (mask > 0).reshape(-1, *mask.shape[-2:]).any(0)
    rows, cols = torch.where(nonzero.any(1))[0], torch.where(nonzero.any(0))[0]
    if rows.numel() == 0:
        return 0, 0, 0, 0
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    return y1 - y0 + 1, x1 - x0 + 1, y0, x0


def _feather(weight: Tensor, area: tuple[int, int, int, int], full_h: int, full_w: int) -> Tensor:
    """Ramp the weight linearly over the first pixels inside each area edge that is not the latent's edge."""
    h, w, y, x = area
    ramp = [(k + 1) / _AREA_FEATHER for k in range(_AREA_FEATHER)]
    for k, r in enumerate(ramp):
        if y != 0 and k < h:
            weight[:, :, k] *= r
        if y + h < full_h and k < h:
            weight[:, :, h - 1 - k] *= r
        if x != 0 and k < w:
            weight[:, :, :, k] *= r
        if x + w < full_w and k < w:
            weight[:, :, :, w - 1 - k] *= r
    return weight


class _Job:
    """One conditioning entry resolved for the current step: where it applies, with what weight."""

    def __init__(self, slot: int, context: Tensor, area: tuple[int, int, int, int], weight: Tensor,
                 kwargs: dict[str, Tensor], options: dict[str, Any] | None = None) -> None:
        self.slot, self.context, self.area, self.weight, self.kwargs = slot, context, area, weight, kwargs
        self.options = options or {}
        self.output: Tensor | None = None

    def batch_key(self) -> tuple:
        shapes = tuple(sorted((k, tuple(v.shape[1:])) for k, v in self.kwargs.items()))
        return self.area[:2], self.context.shape[-1], shapes


def _lcm_repeat(contexts: list[Tensor]) -> list[Tensor]:
    """Repeat contexts along tokens to a common length; attention over k copies of a sequence equals attention
    over the sequence (softmax weights split evenly between copies), so this is exact."""
    lengths = [c.shape[1] for c in contexts]
    target = math.lcm(*lengths)
    return [c.repeat(1, target // c.shape[1], 1) for c in contexts]


class CFGGuider:
    """`guider(x, sigma) -> denoised` with classifier-free guidance; usable as a sampler's model.

    `denoiser(x, sigma, context=..., **kwargs) -> D` is called once per step for all entries of both lists
    whose inputs have equal shapes (all of them unless areas of different sizes are used). At cfg == 1 the
    negative list is not evaluated.
    """

    def __init__(
        self,
        denoiser: Callable[..., Tensor],
        model_sampling: ModelSampling,
        positive: Conditioning,
        negative: Conditioning,
        cfg: float,
        extra_cond: ExtraCond | None = None,
        hooks: GuidanceHooks | None = None,
    ) -> None:
        if not positive:
            raise ValueError("positive conditioning is empty")
        self.denoiser = denoiser
        self.model_sampling = model_sampling
        self.positive, self.negative = positive, negative
        self.cfg = float(cfg)
        self.extra_cond = extra_cond
        self.hooks = hooks or GuidanceHooks()

    def _resolve(self, slot: int, entry: tuple[Tensor, dict[str, Any]], x: Tensor, sigma: float) -> _Job | None:
        context, opts = entry
        context, opts = window_rows(context), {k: window_rows(v) for k, v in opts.items()}  # per-frame entries
        if context.ndim != 3:
            raise ValueError(f"conditioning tensor must be [1, tokens, dim], got {tuple(context.shape)}")
        if "start_percent" in opts and sigma > self.model_sampling.percent_to_sigma(opts["start_percent"]):
            return None
        if "end_percent" in opts and sigma < self.model_sampling.percent_to_sigma(opts["end_percent"]):
            return None
        batch, _, full_h, full_w = x.shape
        area = opts.get("area", (full_h, full_w, 0, 0))
        if len(area) == 5 and area[0] == "percentage":  # fractions of the latent, from ConditioningSetAreaPercentage
            _, ph, pw, py, px = area
            area = (round(ph * full_h), round(pw * full_w), round(py * full_h), round(px * full_w))
        area = tuple(int(v) for v in area)
        if len(area) != 4:
            raise ValueError(f"conditioning area must be (h, w, y, x), got {opts['area']!r}")
        mask = opts.get("mask")
        if mask is not None:
            mask = mask.reshape(-1, *mask.shape[-2:]).to(x.device, x.dtype)
            if mask.shape[0] not in (1, batch):
                raise ValueError(f"conditioning mask batch {mask.shape[0]} does not match latent batch {batch}")
            if mask.shape[-2:] != (full_h, full_w):
                mask = F.interpolate(mask[:, None], size=(full_h, full_w), mode="bilinear")[:, 0]
            if opts.get("set_area_to_bounds", False):
                area = _mask_bounds(mask)
        h, w, y, x0 = area
        h, w = min(h, full_h - y), min(w, full_w - x0)
        area = (h, w, y, x0)
        if h <= 0 or w <= 0:
            return None
        strength = float(opts.get("strength", 1.0))
        if mask is not None:
            region = mask[:, y : y + h, x0 : x0 + w] * float(opts.get("mask_strength", 1.0))
            weight = (region[:, None] * strength).expand(batch, x.shape[1], h, w).clone()
        else:
            weight = x.new_full((batch, x.shape[1], h, w), strength)
            if "area" in opts:
                weight = _feather(weight, area, full_h, full_w)
        kwargs = {}
        if self.extra_cond is not None:
            kwargs = {k: v.to(x.device) for k, v in self.extra_cond(opts, x[:, :, y : y + h, x0 : x0 + w]).items()}
            for name, value in kwargs.items():
                if value.shape[0] not in (1, batch):
                    raise ValueError(f"extra_cond kwarg {name!r} has batch {value.shape[0]}, expected 1 or {batch}")
        return _Job(slot, context.to(x.device, x.dtype), area, weight, kwargs, opts)

    def _run(self, jobs: list[_Job], x: Tensor, sigma: Tensor, uncond_slot: int = -1) -> None:
        """Evaluate jobs of equal input shape in one batched call; store each output on its job. The UNet's
        patches learn which rows evaluate `uncond_slot` (the negative list) through `uncond_rows()`."""
        batch = x.shape[0]
        xs = [x[:, :, j.area[2] : j.area[2] + j.area[0], j.area[3] : j.area[3] + j.area[1]] for j in jobs]
        contexts = [c.expand(batch, -1, -1) for c in _lcm_repeat([j.context for j in jobs])]
        kwargs = {name: torch.cat([j.kwargs[name].expand(batch, *j.kwargs[name].shape[1:]) for j in jobs])
                  for name in jobs[0].kwargs}
        # GLIGEN boxes on an entry become UNet patches of this call (null grounding for the entries without)
        grounding = grounding_patches([j.options for j in jobs], batch, tuple(xs[0].shape[-2:]))
        if grounding is not None:
            kwargs["unet_patches"] = grounding
        # a style model's attn_bias on some entry: every cross-attention of this call biases those tokens
        bias = batch_bias([j.options for j in jobs], [j.context.shape[1] for j in jobs], batch)
        if bias is not None:
            biased = context_bias_patches(bias.to(x.device))
            kwargs["unet_patches"] = biased if grounding is None else grounding.merged(biased)
        controls = [j.options.get("control") for j in jobs]  # ControlNet chains: each entry's rows get their own
        if any(controls):
            kwargs["control"] = [(chain, batch) for chain in controls]
        with batch_roles(tuple(j.slot == uncond_slot for j in jobs for _ in range(batch)), chunk=batch):
            out = self.denoiser(torch.cat(xs), sigma.repeat(len(jobs)), context=torch.cat(contexts), **kwargs)
        for j, chunk in zip(jobs, out.chunk(len(jobs)), strict=True):
            j.output = chunk

    def _predict(self, lists: list[Conditioning], x: Tensor, sigma: Tensor) -> list[Tensor]:
        """The weighted-average denoised estimate of each conditioning list: every entry of every list whose
        inputs have equal shapes in one denoiser call."""
        level = float(sigma.max())
        jobs = [j for slot, entries in enumerate(lists) for e in entries if (j := self._resolve(slot, e, x, level))]
        groups: dict[tuple, list[_Job]] = {}
        for j in jobs:
            groups.setdefault(j.batch_key(), []).append(j)
        uncond_slot = next((i for i, entries in enumerate(lists) if len(lists) > 1 and entries is self.negative), -1)
        for group in groups.values():  # negative_first: the later lists' rows lead the batch (ComfyUI's order)
            self._run(group[::-1] if self.hooks.negative_first else group, x, sigma, uncond_slot)
        sums = [torch.zeros_like(x) for _ in lists]
        weights = [torch.full_like(x, _EMPTY_WEIGHT) for _ in lists]
        for j in jobs:
            h, w, y, x0 = j.area
            sums[j.slot][:, :, y : y + h, x0 : x0 + w] += j.output * j.weight
            weights[j.slot][:, :, y : y + h, x0 : x0 + w] += j.weight
        return [total / weight for total, weight in zip(sums, weights, strict=True)]

    def __call__(self, x: Tensor, sigma: Tensor, model_options: dict[str, Any] | None = None, **_: Any) -> Tensor:
        """The guided denoised estimate. `model_options["guidance_hooks"]` (a GuidanceHooks) adds hooks for this
        call only, after the guider's own."""
        hooks = self.hooks.merged((model_options or {}).get("guidance_hooks"))
        run = functools.partial(self._guided, hooks=hooks)
        for wrapper in hooks.wrap:
            run = functools.partial(wrapper, inner=run)
        return run(x, sigma)

    def _guided(self, x: Tensor, sigma: Tensor, hooks: GuidanceHooks) -> Tensor:
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
        skip_uncond = self.cfg == 1.0 and not hooks.uncond_at_cfg1
        lists = [self.positive] if skip_uncond or not self.negative else [self.positive, self.negative]
        predictions = self._predict(lists, x, sigma)
        cond = predictions[0]
        uncond = predictions[1] if len(lists) == 2 else cond
        if len(lists) == 1 and not hooks.post and not hooks.pre:
            return cond
        step = GuidanceStep(cond, uncond, self.cfg, x, sigma, cond, self)
        for pre in hooks.pre:
            step.cond, step.uncond = pre(step)
            step.denoised = step.cond
        if len(lists) == 2:
            step.denoised = (hooks.combine(step) if hooks.combine
                             else step.uncond + (step.cond - step.uncond) * self.cfg)
        for hook in hooks.post:
            step.denoised = hook(step)
        return step.denoised
