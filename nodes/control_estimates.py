"""The ControlNets' share of a sampler's memory estimate (graph/memory_estimate.py, nodes/estimates.py).

How ControlNets reach the estimate: the ControlNet loaders declare a `ControlNetShape` (the file's kind, read from
its header), the apply nodes declare conditioning shapes `{"controls": (shape, ...)}` (the same object in the
positive and the negative output, as the same ControlStep goes to both), the guider nodes pass them on, and the
sampling nodes add `control_device_bytes` to their UNet estimate. A conditioning that went through a node without
an estimate has an unknown shape and its ControlNets are not counted: an estimate must not refuse what fits.

What a ControlNet adds to one UNet call (diffusion/patches/control.py), on every row of the call (the apply nodes
give the control to both CFG halves):
- its forward: the UNet's encoder half walked as in nodes/estimates.py, plus the hint encoder at 8x the latent's
  size, with every residual (one per input block and the middle block's, each the size of the UNet's skip there)
  held until the end; then the float32 accumulator of all residuals and one scaled residual;
- during the UNet call: the float32 accumulator;
- per ControlNet: its hint, resized to 8x the latent (kept per size) and gathered for the call's rows.
ControlNets run one after another, so the device needs the larger of the UNet's and one ControlNet's peak, plus
the accumulator and the hints. T2I-Adapters (features computed once per sampling, kept off the device) count zero.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

from diffusion.models.controlnet import HINT_WIDTHS
from diffusion.models.unet import UNetConfig
from graph.memory_estimate import MemoryEstimate
from nodes.estimates import (
    SD_UNETS,
    _norm_peak,
    _resblock,
    _transformer,
    _Walk,
    compute_itemsize,
    samples_of,
    unet_bytes,
    unet_config,
)

ACCUMULATOR_ITEMSIZE = 4  # control_residuals sums in the UNet input's dtype: the sampler's float32
HINT_CHANNELS = 3


@dataclasses.dataclass(frozen=True, eq=False)  # one per loader output: the apply nodes' shapes keep its identity
class ControlNetShape:
    """What a CONTROL_NET is, as far as memory goes: "controlnet" (plain, diff, Control-LoRA, union) or
    "t2i_adapter"."""

    kind: str = "controlnet"


def _levels(config: UNetConfig, height: int, width: int) -> list[int]:
    return [math.ceil(height / 2**i) * math.ceil(width / 2**i) for i in range(len(config.channel_mult))]


def residual_elements(config: UNetConfig, height: int, width: int) -> tuple[float, float]:
    """(all residuals' elements, the largest one's) of one ControlNet call per batch entry: one per UNet skip,
    plus the middle block's."""
    mc, n = config.model_channels, _levels(config, height, width)
    sizes = [n[0] * mc]
    for i, mult in enumerate(config.channel_mult):
        sizes += [n[i] * mc * mult] * config.num_res_blocks
        if i != len(n) - 1:
            sizes.append(n[i + 1] * mc * mult)
    sizes.append(n[-1] * mc * config.channel_mult[-1])
    return float(sum(sizes)), float(max(sizes))


def controlnet_peak_elements(config: UNetConfig, height: int, width: int, conv_copy: float = 0.0, norm: float = 1.0,
                             hint_widths: tuple[int, ...] = HINT_WIDTHS) -> float:
    """Peak live elements of one ControlNet forward for one batch entry on a height × width latent."""
    walk = _Walk(conv_copy)
    mc, n = config.model_channels, _levels(config, height, width)
    scale = 2 ** (len(hint_widths) - 1)
    walk.held = n[0] * config.in_channels + HINT_CHANNELS * n[0] * scale**2  # x and the hint
    walk.need(n[0] * (config.in_channels * conv_copy + mc))  # conv_in
    h = n[0] * mc
    walk.held += h
    # the hint encoder: a conv reads its input while writing its output; each SiLU makes a copy. The hint reaches it
    # channels-last (an IMAGE is [B, H, W, C]; control.py moves the channel axis), a layout the CPU's convolutions
    # take as it is: no blocked copy, and their outputs stay channels-last.
    convs = [(HINT_CHANNELS, hint_widths[0], 1)]
    for narrow, wide in itertools.pairwise(hint_widths):
        convs += [(narrow, narrow, 1), (narrow, wide, 2)]
    convs.append((hint_widths[-1], mc, 1))
    pixels = n[0] * scale**2
    for k, (c_in, c_out, stride) in enumerate(convs):
        out_pixels = pixels / stride**2
        walk.need(pixels * c_in + out_pixels * c_out)
        if k < len(convs) - 1:
            walk.need(2 * out_pixels * c_out)
        pixels = out_pixels
    walk.need(2 * h)  # the encoded hint and h + hint
    residuals = 0.0

    def zero_conv(elements: float) -> None:
        nonlocal residuals
        walk.need(elements * (1 + conv_copy))
        walk.held += elements
        residuals += elements

    zero_conv(h)
    c_in = mc
    for i, mult in enumerate(config.channel_mult):
        c = mc * mult
        for _ in range(config.num_res_blocks):
            _resblock(walk, c_in, c, n[i], norm)
            if config.transformer_depth[i]:
                walk.held += n[i] * c
                _transformer(walk, c, n[i])
                walk.held -= n[i] * c
            walk.held += n[i] * c - h
            h, c_in = n[i] * c, c
            zero_conv(h)
        if i != len(n) - 1:
            walk.need(n[i] * c * conv_copy + n[i + 1] * c)
            walk.held += n[i + 1] * c - h
            h = n[i + 1] * c
            zero_conv(h)
    deepest = n[-1]
    _resblock(walk, c_in, c_in, deepest, norm)
    walk.held += deepest * c_in
    _transformer(walk, c_in, deepest)
    _resblock(walk, c_in, c_in, deepest, norm)
    zero_conv(deepest * c_in)
    return walk.peak


def control_device_bytes(config: UNetConfig | None, controls: tuple[ControlNetShape, ...], batch: int,
                         batch_factor: int, height: int, width: int, itemsize: int, device_type: str) -> int:
    """What `controls` add to the device memory of a UNet call on `batch_factor` × `batch` entries of a height ×
    width latent (see the module docstring); 0 without ControlNets. An unknown model: the smaller of SD1's and
    SDXL's, as for the UNet."""
    count = sum(1 for c in controls if c.kind == "controlnet")
    if count == 0:
        return 0
    conv_copy = 1.0 if device_type == "cpu" else 0.0
    norm = _norm_peak(itemsize, device_type)
    configs = [config] if config is not None else SD_UNETS
    rows = batch * batch_factor
    extra = []
    for c in configs:
        unet = unet_bytes(c, rows, height, width, itemsize, device_type)
        total, largest = residual_elements(c, height, width)
        forward = controlnet_peak_elements(c, height, width, conv_copy, norm) * itemsize
        end = total * itemsize + largest * ACCUMULATOR_ITEMSIZE  # its residuals and one scaled copy
        control_peak = rows * max(forward, end)
        accumulator = rows * total * ACCUMULATOR_ITEMSIZE
        # each step's resized hint, kept for the sampling (one image or one per latent); the rows' gathered copy
        # is in the forward's walk
        hints = count * batch * HINT_CHANNELS * 64 * height * width * itemsize
        extra.append(max(0, control_peak - unet) + accumulator + hints)
    return int(min(extra))


def with_controls(conditioning: Any, control: Any) -> dict[str, Any]:
    """The shape of a conditioning after an apply node added `control` (a ControlNetShape; None: unknown, not
    counted)."""
    before = conditioning.get("controls", ()) if isinstance(conditioning, dict) else ()
    return {"controls": (*before, control) if isinstance(control, ControlNetShape) else before}


def controls_of(*conditionings: Any) -> tuple[ControlNetShape, ...]:
    """The distinct ControlNet applications in these conditioning shapes (the apply nodes put the same object in
    the positive and the negative, as the same step runs once for both)."""
    seen: dict[int, ControlNetShape] = {}
    for shape in conditionings:
        if isinstance(shape, dict):
            for control in shape.get("controls", ()):
                seen.setdefault(id(control), control)
    return tuple(seen.values())


def add_control_memory(estimate: MemoryEstimate | None, latent: Any, model: Any, controls: tuple[ControlNetShape, ...],
                       batch_factor: int, context: Any) -> MemoryEstimate | None:
    """A sampling node's estimate (nodes.estimates.sampler_estimate) with its ControlNets' device memory added."""
    samples = samples_of(latent)
    if estimate is None or samples is None:
        return estimate
    batch, _, h, w = samples.shape
    extra = control_device_bytes(unet_config(model), controls, batch, batch_factor, h, w, compute_itemsize(context),
                                 context.device_type)
    if extra == 0:
        return estimate
    count = sum(1 for c in controls if c.kind == "controlnet")
    return dataclasses.replace(estimate, device_bytes=estimate.device_bytes + extra,
                               what=f"{estimate.what} with {count} ControlNet{'s' if count > 1 else ''}")


def controlnet_file_shape(context: Any, name: Any) -> MemoryEstimate | None:
    """The ControlNet loaders' estimate: no memory of their own (the model manager holds the weights), a
    ControlNetShape from a safetensors header; None for a pickle (reading one means loading it) or when the file
    cannot be read."""
    from diffusion.checkpoints.files import SAFETENSORS_SUFFIXES
    from diffusion.checkpoints.t2i_adapter_files import is_t2i_adapter_file

    if context.env is None or not isinstance(name, str):
        return None
    try:
        path = context.env.find_model("controlnet", name)
        if not str(path).lower().endswith(SAFETENSORS_SUFFIXES):
            return None
        kind = "t2i_adapter" if is_t2i_adapter_file(path) else "controlnet"
    except (OSError, ValueError):
        return None
    return MemoryEstimate(outputs=(ControlNetShape(kind),), kept_bytes=0)


def apply_estimate(conditionings: tuple[Any, ...], control: Any, strength: Any) -> MemoryEstimate:
    """The apply nodes' estimate: their conditioning outputs with the ControlNet added (the same shape object in
    each, as the same step goes to each); unchanged at strength 0, where the nodes pass their inputs through."""
    if strength == 0 or not isinstance(control, ControlNetShape):
        outputs = tuple(c if isinstance(c, dict) else None for c in conditionings)
    else:
        outputs = tuple(with_controls(c, control) for c in conditionings)
    return MemoryEstimate(outputs=outputs, kept_bytes=0)
