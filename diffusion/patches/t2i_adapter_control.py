"""How T2I-Adapter features reach the UNet. An adapter travels the ControlNet path (diffusion/patches/control.py):
`ControlNetLoader` gives a `T2IAdapterHandle` as CONTROL_NET, the apply nodes put it in a `ControlStep` of the
conditioning's control chain, and `control_residuals` asks the handle for its residuals on the rows it acts on.

What differs from a ControlNet:
- The features depend only on the hint, so they are computed once per hint and latent size (the adapter runs on
  the first step that needs them, then the features are reused by every step, CFG half and batch row; they are
  kept on the offload device, since a cached conditioning can outlive the sampling).
- They are added inside the encoder, to the hidden state after one input block per level (so the next blocks see
  them and the skip connection carries them), not to the skips at the decoder. Which block: the rule of diffusers'
  `down_intrablock_additional_residuals` — a level with attention gets its feature after its last block, one without
  (SDXL's first) after its downsample; SDXL's fourth feature goes to the middle block's output. For the SD1.x and
  SDXL UNets these are ComfyUI's places too (input blocks 2, 5, 8, 11; and 3, 5, 8 and the middle).
- The hint is resized (center crop, nearest-exact, as ControlNet hints) to the latent's size x 8, rounded up to a
  multiple of the adapter's pixel-unshuffle factor, as ComfyUI does; a one-channel adapter (canny, sketch) gets the
  mean of the image's RGB channels.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checkpoints.families import TITLES
from ..checkpoints.t2i_adapter_files import T2IAdapterInfo
from ..memory import ModelManager
from ..models.t2i_adapter import T2IAdapter
from ..models.unet import UNetConfig
from .patcher import ModelPatcher
from .unet_patches import Site, UNetPatches

if TYPE_CHECKING:
    from .control import ControlStep

MIDDLE = "middle"
Sites = list[int | str]  # per feature: the input block index it is added after, or MIDDLE


def intrablock_sites(config_channels: Sequence[int], unet: UNetConfig) -> Sites:
    """Where each adapter feature goes in a UNet of `unet`'s shape (diffusers' rule, see the module docstring);
    a ValueError when the features do not fit its levels and widths."""
    nrb, widths = unet.num_res_blocks, [unet.model_channels * m for m in unet.channel_mult]
    last = len(widths) - 1
    sites: Sites = []
    site_widths = []
    for level, depth in enumerate(unet.transformer_depth):
        end = level * (nrb + 1) + nrb  # the level's last block
        sites.append(end + 1 if depth == 0 and level != last else end)
        site_widths.append(widths[level])
    if len(config_channels) == len(sites) + 1:
        sites.append(MIDDLE)
        site_widths.append(widths[-1])
    if len(config_channels) != len(sites) or list(config_channels) != site_widths:
        raise ValueError(f"its features ({list(config_channels)} channels) do not fit the UNet's levels "
                         f"({site_widths} channels)")
    return sites


class ControlResiduals(list):
    """What `control_residuals` returns when a T2I-Adapter acts: the ControlNets' residuals (one per skip, then the
    middle block's; empty when no ControlNet acts) as the list itself, and `intrablock`: site -> summed adapter
    residual [N, C, h, w] over the call's rows."""

    def __init__(self, controlnet: Sequence[Tensor], intrablock: dict[int | str, Tensor]):
        super().__init__(controlnet)
        self.intrablock = intrablock


def intrablock_patches(residuals: dict[int | str, Tensor]) -> UNetPatches:
    """Hooks adding residuals[i] to the hidden state after input block i (before it is kept as a skip) and
    residuals[MIDDLE] to the middle block's output (where output block 0 takes it: nothing runs in between). A
    feature map a patch resized (deep shrink) gets the residual resized bilinearly to it."""

    def fit(r: Tensor, like: Tensor) -> Tensor:
        if r.shape[-2:] != like.shape[-2:]:
            r = F.interpolate(r.float(), size=tuple(like.shape[-2:]), mode="bilinear")
        return r.to(like.dtype)

    def input_hook(h: Tensor, site: Site) -> Tensor:
        r = residuals.get(site.block[1])
        return h if r is None else h + fit(r, h)

    def middle_hook(h: Tensor, skip: Tensor, site: Site) -> tuple[Tensor, Tensor]:
        if site.block[1] == 0:
            h = h + fit(residuals[MIDDLE], h)
        return h, skip

    inputs = (input_hook,) if any(k != MIDDLE for k in residuals) else ()
    return UNetPatches(input_block=inputs, output_block=(middle_hook,) if MIDDLE in residuals else ())


@dataclasses.dataclass(eq=False)  # compared and hashed by identity: one loaded adapter, however many uses
class T2IAdapterHandle:
    """CONTROL_NET holding a loaded T2I-Adapter and what it was made for."""

    patcher: ModelPatcher
    info: T2IAdapterInfo
    manager: ModelManager
    dtype: torch.dtype
    name: str
    _features: weakref.WeakKeyDictionary = dataclasses.field(default_factory=weakref.WeakKeyDictionary, repr=False)
    _sites: tuple[UNetConfig, Sites] | None = dataclasses.field(default=None, repr=False)

    @property
    def title(self) -> str:
        return f"T2I-Adapter {self.name!r} ({self.info.title})"

    def check_fits(self, family: str, family_title: str, unet: UNetConfig) -> None:
        """A clear error when the adapter was made for another family (an SD1.x adapter also fits SD2.x, whose
        UNet has the same widths) or another shape of UNet; remembers where its features go in `unet`."""
        mine = self.info.family
        if family != mine and not (mine == "sd1" and family == "sd2"):
            raise ValueError(f"{self.title} does not fit the model: it is an {self.info.title} T2I-Adapter and the "
                             f"model is {family_title}; use a T2I-Adapter made for {TITLES.get(family, family)}")
        try:
            self._sites = (unet, intrablock_sites(self.info.config.channels, unet))
        except ValueError as e:
            raise ValueError(f"{self.title} does not fit the model's UNet ({family_title}): {e}") from None

    def features(self, step: ControlStep, height: int, width: int) -> list[Tensor]:
        """The adapter's features [Bh, C_i, ...] for a latent of height x width (offload device, adapter dtype),
        computed on the first call for this step and size."""
        cache = self._features.setdefault(step, {})
        if (height, width) not in cache:
            factor = self.info.config.unshuffle
            hint_h, hint_w = (math.ceil(side * 8 / factor) * factor for side in (height, width))
            with self.manager.use([self.patcher]) as (net,), torch.no_grad():
                hint = step.hint_for(hint_h, hint_w, self.manager.device, self.dtype)
                if self.info.config.in_channels == 1:
                    hint = hint.mean(1, keepdim=True)
                cache[(height, width)] = [f.to(self.manager.offload_device) for f in net(hint)]
        return cache[(height, width)]

    def intrablock_residuals(self, step: ControlStep, spans: Sequence[tuple[int, int]],
                             x: Tensor) -> dict[int | str, Tensor]:
        """strength x features per site over the N rows of one UNet call (x [N, C, h, w]): the rows of `spans`
        (start, count) get them (a hint of batch 1 goes to every latent, else one hint per latent), the others
        zeros. Needs `check_fits` first (it says where the features go)."""
        if self._sites is None:
            raise RuntimeError(f"{self.title}: check_fits(...) must run before the adapter is applied")
        sites = self._sites[1]
        features = self.features(step, x.shape[-2], x.shape[-1])
        every = sum(n for _, n in spans) == x.shape[0]
        out: dict[int | str, Tensor] = {}
        for site, feature in zip(sites, features, strict=True):
            feature = feature.to(x.device, x.dtype) * step.strength
            parts = []
            for _, rows in spans:
                if feature.shape[0] == rows:
                    parts.append(feature)
                elif feature.shape[0] == 1:
                    parts.append(feature.expand(rows, -1, -1, -1))
                else:
                    raise ValueError(f"{self.title}: the hint image batch is {feature.shape[0]} but the latent "
                                     f"batch is {rows}; give one hint image or one per latent")
            rows_out = torch.cat(parts)
            if every:
                out[site] = rows_out
            else:
                index = torch.cat([torch.arange(s, s + n, device=x.device) for s, n in spans])
                full = torch.zeros(x.shape[0], *rows_out.shape[1:], device=x.device, dtype=x.dtype)
                out[site] = full.index_add_(0, index, rows_out)
        return out


def load_t2i_adapter_handle(net: T2IAdapter, info: T2IAdapterInfo, manager: ModelManager, name: str,
                            offload_device: torch.device | str = "cpu") -> T2IAdapterHandle:
    """Wrap a loaded adapter for the model manager."""
    dtype = next(net.parameters()).dtype
    patcher = ModelPatcher(net, manager.device, offload_device, name=f"{name} t2i-adapter")
    return T2IAdapterHandle(patcher, info, manager, dtype, name)
