"""Conditioning nodes that combine and restrict encoded prompts (no model needed).

A CONDITIONING is a list of `(tensor [1, 77·k, dim], options)`; the sampler's guidance reads the options
`area`, `strength`, `mask`, `mask_strength`, `set_area_to_bounds`, `start_percent`, `end_percent` and
`pooled_output`. Every node returns new lists and option dicts: inputs are never modified, because the
executor caches and shares them.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from graph.node import Combo, Float, Int, Node, Output, Socket
from graph.types import CONDITIONING, MASK
from nodes.tensor_ops import MAX_RESOLUTION, as_mask_batch

log = logging.getLogger(__name__)

Conditioning = list[tuple[torch.Tensor, dict[str, Any]]]


def with_options(conditioning: Conditioning, **options: Any) -> Conditioning:
    return [(tensor, {**opts, **options}) for tensor, opts in conditioning]


def _cond(name: str) -> Socket:
    return Socket(name, CONDITIONING)


class ConditioningCombine(Node):
    display_name = "Conditioning (Combine)"
    category = "conditioning"
    description = "Both conditionings are applied and their predictions averaged (e.g. two regions)."
    inputs = [_cond("conditioning_1"), _cond("conditioning_2")]
    outputs = [Output(CONDITIONING)]

    def execute(self, conditioning_1, conditioning_2):
        return (list(conditioning_1) + list(conditioning_2),)


def _first(conditioning: Conditioning, node: str) -> tuple[torch.Tensor, dict[str, Any]]:
    if not conditioning:
        raise ValueError(f"{node}: the 'from' conditioning is empty")
    if len(conditioning) > 1:
        log.warning("%s: only the first of %d 'from' conditionings is used", node, len(conditioning))
    return conditioning[0]


class ConditioningConcat(Node):
    display_name = "Conditioning (Concat)"
    category = "conditioning"
    description = "Appends the tokens of conditioning_from to each entry of conditioning_to."
    inputs = [_cond("conditioning_to"), _cond("conditioning_from")]
    outputs = [Output(CONDITIONING)]

    def execute(self, conditioning_to, conditioning_from):
        source, _ = _first(conditioning_from, "ConditioningConcat")
        return ([(torch.cat([tensor, source.to(tensor)], dim=1), dict(opts)) for tensor, opts in conditioning_to],)


class ConditioningAverage(Node):
    display_name = "ConditioningAverage"
    category = "conditioning"
    inputs = [_cond("conditioning_to"), _cond("conditioning_from"),
              Float("conditioning_to_strength", default=1.0, min=0.0, max=1.0, step=0.01)]
    outputs = [Output(CONDITIONING)]

    def execute(self, conditioning_to, conditioning_from, conditioning_to_strength):
        source, source_opts = _first(conditioning_from, "ConditioningAverage")
        s = conditioning_to_strength
        out = []
        for tensor, opts in conditioning_to:
            other = source[:, : tensor.shape[1]].to(tensor)
            if other.shape[1] < tensor.shape[1]:  # pad the shorter prompt with zeros
                other = torch.cat([other, torch.zeros(1, tensor.shape[1] - other.shape[1], tensor.shape[2])], 1)
            new_opts = dict(opts)
            pooled, other_pooled = opts.get("pooled_output"), source_opts.get("pooled_output")
            if pooled is not None and other_pooled is not None:
                new_opts["pooled_output"] = pooled * s + other_pooled.to(pooled) * (1 - s)
            out.append((tensor * s + other * (1 - s), new_opts))
        return (out,)


def _area_size(name: str, default: int) -> Int:
    return Int(name, default=default, min=64 if default else 0, max=MAX_RESOLUTION, step=8)


def _fraction(name: str, default: float) -> Float:
    return Float(name, default=default, min=0.0, max=1.0, step=0.01)


def _strength() -> Float:
    return Float("strength", default=1.0, min=0.0, max=10.0, step=0.01)


class ConditioningSetArea(Node):
    display_name = "Conditioning (Set Area)"
    category = "conditioning"
    description = "Restricts the conditioning to a rectangle given in pixels (multiples of 8)."
    inputs = [_cond("conditioning"), _area_size("width", 64), _area_size("height", 64), _area_size("x", 0),
              _area_size("y", 0), _strength()]
    outputs = [Output(CONDITIONING)]

    def execute(self, conditioning, width, height, x, y, strength):
        return (with_options(conditioning, area=(height // 8, width // 8, y // 8, x // 8), strength=strength,
                             set_area_to_bounds=False),)


class ConditioningSetAreaPercentage(Node):
    display_name = "Conditioning (Set Area with Percentage)"
    category = "conditioning"
    inputs = [_cond("conditioning"), _fraction("width", 1.0), _fraction("height", 1.0), _fraction("x", 0.0),
              _fraction("y", 0.0), _strength()]
    outputs = [Output(CONDITIONING)]

    def execute(self, conditioning, width, height, x, y, strength):
        return (with_options(conditioning, area=("percentage", height, width, y, x), strength=strength,
                             set_area_to_bounds=False),)


class ConditioningSetAreaStrength(Node):
    category = "conditioning"
    inputs = [_cond("conditioning"), _strength()]
    outputs = [Output(CONDITIONING)]

    def execute(self, conditioning, strength):
        return (with_options(conditioning, strength=strength),)


class ConditioningSetMask(Node):
    display_name = "Conditioning (Set Mask)"
    category = "conditioning"
    inputs = [_cond("conditioning"), Socket("mask", MASK), _strength(),
              Combo("set_cond_area", ["default", "mask bounds"])]
    outputs = [Output(CONDITIONING)]

    def execute(self, conditioning, mask, strength, set_cond_area):
        return (with_options(conditioning, mask=as_mask_batch(mask), mask_strength=strength,
                             set_area_to_bounds=set_cond_area != "default"),)


class ConditioningSetTimestepRange(Node):
    category = "advanced/conditioning"
    description = "Applies the conditioning only between two points of the sampling schedule (0 = start)."
    inputs = [_cond("conditioning"), Float("start", default=0.0, min=0.0, max=1.0, step=0.001),
              Float("end", default=1.0, min=0.0, max=1.0, step=0.001)]
    outputs = [Output(CONDITIONING)]

    def execute(self, conditioning, start, end):
        return (with_options(conditioning, start_percent=start, end_percent=end),)


class ConditioningZeroOut(Node):
    category = "advanced/conditioning"
    inputs = [_cond("conditioning")]
    outputs = [Output(CONDITIONING)]

    def execute(self, conditioning):
        out = []
        for tensor, opts in conditioning:
            new_opts = dict(opts)
            if opts.get("pooled_output") is not None:
                new_opts["pooled_output"] = torch.zeros_like(opts["pooled_output"])
            out.append((torch.zeros_like(tensor), new_opts))
        return (out,)


NODE_CLASSES = [ConditioningCombine, ConditioningConcat, ConditioningAverage, ConditioningSetArea,
                ConditioningSetAreaPercentage, ConditioningSetAreaStrength, ConditioningSetMask,
                ConditioningSetTimestepRange, ConditioningZeroOut]
