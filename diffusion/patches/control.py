"""How ControlNet residuals reach the UNet: conditioning options carry the control, the guider hands each batch row
its own, and the UNet call adds the residuals through UNetPatches hooks.

- `ControlNetHandle` (CONTROL_NET) is a loaded ControlNet: a `ModelPatcher` the model manager loads, moves and
  evicts like the UNet or the VAE, shared by every conditioning it is applied to (never copied per prompt).
- `apply_control` appends one `ControlStep` (the handle, the hint image, strength, start/end percent) to the
  `control` option of every entry of a conditioning: a tuple, so ControlNets applied one after another chain
  (their residuals add up), each with its own strength and step range. The same step object goes to the positive
  and the negative conditioning (ControlNetApplyAdvanced), so both halves of a CFG batch run the ControlNet in one
  call.
- The guider passes `control=[(chain or None, rows), ...]` (one pair per conditioning entry, in batch order) to
  the denoiser; `control_patches` runs each step's ControlNet once on the rows whose chain holds it (its hint
  resized to the rows' latent size × 8, center-cropped to its aspect ratio, matched to the latent batch), while
  the sigma is within the step's range, and returns hooks adding strength × residual to the UNet's skip
  connections and middle block output (rows without that step get nothing).
- Variants: a handle's `options` go to the network's forward (a union ControlNet's control type, set per use by
  SetUnionControlNetType on a copy of the handle); a Control-LoRA's handle (control_lora_handle.py) is turned into
  an ordinary one by `bind(model)`, composing the ControlNet from the model of the UNet call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checkpoints.controlnet_files import ControlNetInfo
from ..checkpoints.families import TITLES
from ..memory import ModelManager
from ..models.controlnet import ControlNet
from ..models.unet import UNetConfig
from ..sampling.context_windows import window_rows
from ..sampling.model_sampling import ModelSampling
from .context_bias import cross_attention_bias
from .patcher import ModelPatcher
from .t2i_adapter_control import ControlResiduals, T2IAdapterHandle, intrablock_patches
from .unet_patches import Site, UNetPatches

Conditioning = list[tuple[Tensor, dict[str, Any]]]
ControlRows = Sequence[tuple[tuple["ControlStep", ...] | None, int]]
HINT_RESIZE = "nearest-exact"  # as ComfyUI resizes ControlNet hints


@dataclasses.dataclass(eq=False)  # compared and hashed by identity: one loaded ControlNet, however many uses
class ControlNetHandle:
    """CONTROL_NET: a loaded ControlNet and what it was made for."""

    patcher: ModelPatcher
    info: ControlNetInfo
    manager: ModelManager
    dtype: torch.dtype
    name: str
    # what the network's forward takes per use (a union ControlNet's control_type: SetUnionControlNetType sets it
    # on a copy of the handle, which shares the loaded network)
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def title(self) -> str:
        return f"ControlNet {self.name!r} ({self.info.title})"

    def check_fits(self, family: str, family_title: str, unet: UNetConfig) -> None:
        """A clear error when this ControlNet was made for another model family (or another shape of UNet)."""
        if family != self.info.family:
            raise ValueError(f"{self.title} does not fit the model: it is an {self.info.title} ControlNet and the "
                             f"model is {family_title}; use a ControlNet made for {TITLES.get(family, family)}")
        mine = self.info.config.unet
        fields = ("model_channels", "channel_mult", "num_res_blocks", "context_dim", "adm_in_channels")
        differ = [f"{f} {getattr(mine, f)} vs {getattr(unet, f)}" for f in fields
                  if getattr(mine, f) != getattr(unet, f)]
        if differ:
            raise ValueError(f"{self.title} does not fit the model's UNet ({family_title}): " + ", ".join(differ))


@dataclasses.dataclass(eq=False)
class ControlStep:
    """One application of a ControlNet: the hint images [B, H, W, C] (0..1, on the CPU), its strength and the
    part of the sampling (0 = start, 1 = end) during which it acts. Resized hints are kept per size."""

    control_net: ControlNetHandle
    hint: Tensor
    strength: float
    start_percent: float = 0.0
    end_percent: float = 1.0
    _resized: dict[tuple, Tensor] = dataclasses.field(default_factory=dict, repr=False)

    def active(self, sigma: float, model_sampling: ModelSampling) -> bool:
        start = model_sampling.percent_to_sigma(self.start_percent)
        end = model_sampling.percent_to_sigma(self.end_percent)
        return end <= sigma <= start

    def hint_for(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The hint [Bh, C, height, width]: center-cropped to the aspect ratio, then resized."""
        key = (height, width, str(device), dtype)
        if key not in self._resized:
            channels = self.control_net.info.config.hint_channels
            image = self.hint[..., :channels].movedim(-1, 1).float()
            self._resized[key] = _fit(image, height, width).to(device, dtype)
        return self._resized[key]


def _fit(image: Tensor, height: int, width: int) -> Tensor:
    h, w = image.shape[-2:]
    if h * width != w * height:  # crop the longer side around the centre to the target's aspect ratio
        if w * height > h * width:
            keep = max(1, round(h * width / height))
            x0 = (w - keep) // 2
            image = image[..., x0:x0 + keep]
        else:
            keep = max(1, round(w * height / width))
            y0 = (h - keep) // 2
            image = image[..., y0:y0 + keep, :]
    if tuple(image.shape[-2:]) == (height, width):
        return image
    return F.interpolate(image, size=(height, width), mode=HINT_RESIZE)


def apply_control(conditioning: Conditioning, step: ControlStep, *, to_uncond: bool = False) -> Conditioning:
    """A copy of `conditioning` whose every entry's control chain ends with `step` (tensors are shared). With
    `to_uncond` (ComfyUI's old ControlNetApply) the guider also gives the chain to a negative without one
    (`uncond_control`)."""
    if step.hint.ndim != 4 or step.hint.shape[-1] < step.control_net.info.config.hint_channels:
        raise ValueError(f"ControlNet hint must be an IMAGE [B, H, W, {step.control_net.info.config.hint_channels}], "
                         f"got {list(step.hint.shape)}")
    return [(context, {**options, "control": (*options.get("control", ()), step), "control_apply_to_uncond": to_uncond})
            for context, options in conditioning]


def uncond_control(positive: Conditioning, negative: Conditioning) -> Conditioning:
    """The negative conditioning with the chains of positive entries marked `control_apply_to_uncond`, as ComfyUI
    fills them in: only when no negative entry has a control of its own, and only between entries without an
    area; the k-th such chain goes to the (k mod n)-th negative entry (a later chain replacing an earlier one)."""
    if any(opts.get("control") and "area" not in opts for _, opts in negative):
        return negative
    chains = [opts["control"] for _, opts in positive
              if "area" not in opts and opts.get("control") and opts.get("control_apply_to_uncond")]
    targets = [i for i, (_, opts) in enumerate(negative) if "area" not in opts]
    if not chains or not targets:
        return negative
    out = list(negative)
    for k, chain in enumerate(chains):
        i = targets[k % len(targets)]
        context, opts = negative[i]
        out[i] = (context, {**opts, "control": chain})
    return out


def _hint_rows(step: ControlStep, jobs: list[tuple[int, int]], height: int, width: int, device: torch.device,
               dtype: torch.dtype) -> Tensor:
    """The hint of each row the step acts on: rows of an entry are the latent's batch, matched by index (a hint
    of batch 1 goes to every latent)."""
    scale = step.control_net.info.config.hint_downscale
    hint = window_rows(step.hint_for(height * scale, width * scale, device, dtype))  # one hint per frame: the window's
    parts = []
    for _, rows in jobs:
        if hint.shape[0] == rows:
            parts.append(hint)
        elif hint.shape[0] == 1:
            parts.append(hint.expand(rows, -1, -1, -1))
        else:
            raise ValueError(f"{step.control_net.title}: the hint image batch is {hint.shape[0]} but the latent "
                             f"batch is {rows}; give one hint image or one per latent")
    return torch.cat(parts)


def _rows(v: Tensor, index: Tensor, every: bool) -> Tensor:
    return v if every else v[index]


def control_residuals(control: ControlRows, x: Tensor, t: Tensor, context: Tensor, y: Tensor | None,
                      sigma: Tensor | None, model_sampling: ModelSampling,
                      fits: Any = None, model: Any = None, bias: Tensor | None = None) -> list[Tensor] | None:
    """Summed strength × residuals [N, C_i, h_i, w_i] of every active step over the N rows of one UNet call (x is
    the UNet's scaled input, without inpainting channels); None when no step acts now. `fits(handle)` raises when
    a ControlNet does not fit the model. `model` (the DiffusionModel whose call this is) is what a Control-LoRA
    is composed with (`bind`, control_lora_handle.py). `bias` [N, tokens] (a style model's attn_bias, the UNet
    call's `patches_bias`) biases the ControlNets' cross-attentions as it does the UNet's."""
    offsets, start = [], 0
    for _, rows in control:
        offsets.append((start, rows))
        start += rows
    if start != x.shape[0]:
        raise ValueError(f"control rows cover {start} rows but the UNet batch has {x.shape[0]}")
    level = float(sigma.max()) if sigma is not None else float("nan")
    steps: dict[ControlStep, list[tuple[int, int]]] = {}
    for (chain, _), span in zip(control, offsets, strict=True):
        for step in chain or ():
            steps.setdefault(step, []).append(span)
    total: list[Tensor] | None = None
    adapters: dict[int | str, Tensor] = {}  # T2I-Adapters' residuals inside the encoder (t2i_adapter_control.py)
    for step, spans in steps.items():
        if step.strength == 0 or (sigma is not None and not step.active(level, model_sampling)):
            continue
        handle = step.control_net
        if fits is not None:
            fits(handle)
        if isinstance(handle, T2IAdapterHandle):
            for site, r in handle.intrablock_residuals(step, spans, x).items():
                adapters[site] = adapters[site] + r if site in adapters else r
            continue
        if hasattr(handle, "bind"):  # a Control-LoRA: its ControlNet is made of the model it is applied to
            handle = handle.bind(model)
        index = torch.cat([torch.arange(s, s + n, device=x.device) for s, n in spans])
        every = index.numel() == x.shape[0]
        with handle.manager.use([handle.patcher]) as (net,), torch.no_grad():
            device, dtype = handle.manager.device, handle.dtype
            hint = _hint_rows(step, spans, x.shape[-2], x.shape[-1], device, dtype)
            rows_bias = None if bias is None else _rows(bias, index, every).to(device)
            with cross_attention_bias(net, rows_bias):
                out = net(_rows(x, index, every).to(device, dtype), hint,
                          _rows(t.expand(x.shape[0]), index, every).to(device),
                          _rows(context, index, every).to(device, dtype),
                          None if y is None else _rows(y, index, every).to(device, dtype), **handle.options)
        if total is None:
            total = [torch.zeros(x.shape[0], *r.shape[1:], device=x.device, dtype=x.dtype) for r in out]
        for acc, r in zip(total, out, strict=True):
            r = r.to(x.device, x.dtype) * step.strength
            if every:
                acc += r
            else:
                acc.index_add_(0, index, r)
    return ControlResiduals(total or [], adapters) if adapters else total


def residual_patches(residuals: list[Tensor]) -> UNetPatches:
    """Hooks adding residuals[i] to the skip of input block i when an output block joins it, and the last one to
    the middle block's output, as ControlNet's UNet does. The middle one is added where output block 0 takes the
    backbone (nothing runs in between; being the first output hook, it comes before FreeU's, as in ControlNet's
    UNet). A feature map that a patch resized (deep shrink) gets the residual resized bilinearly to it."""
    intrablock = getattr(residuals, "intrablock", None)  # T2I-Adapters' (ControlResiduals)
    if intrablock:
        patches = intrablock_patches(intrablock)
        return patches.merged(residual_patches(list(residuals))) if residuals else patches
    skips, middle = residuals[:-1], residuals[-1]

    def fit(r: Tensor, like: Tensor) -> Tensor:
        if r.shape[-2:] != like.shape[-2:]:
            r = F.interpolate(r.float(), size=tuple(like.shape[-2:]), mode="bilinear")
        return r.to(like.dtype)

    def output_hook(h: Tensor, skip: Tensor, site: Site) -> tuple[Tensor, Tensor]:
        index = site.block[1]
        if index == 0:
            h = h + fit(middle, h)
        return h, skip + fit(skips[len(skips) - 1 - index], skip)

    return UNetPatches(output_block=(output_hook,))


def load_controlnet_handle(net: ControlNet, info: ControlNetInfo, manager: ModelManager, name: str,
                           offload_device: torch.device | str = "cpu") -> ControlNetHandle:
    """Wrap a loaded ControlNet for the model manager."""
    dtype = next(net.parameters()).dtype
    patcher = ModelPatcher(net, manager.device, offload_device, name=f"{name} controlnet")
    return ControlNetHandle(patcher, info, manager, dtype, name)
