"""IP-Adapter's decoupled cross-attention, as a UNet patch carried by a MODEL clone.

At every cross-attention of the UNet, with q the attention's queries:
    out = Attn(q, K_text, V_text) + weight * Attn(q, to_k_ip(image tokens), to_v_ip(image tokens))
(both through the attention's output projection; its bias is added once). The image tokens are the projection
of the reference image's CLIP embedding for the rows that evaluate the positive conditioning, and of the
negative embedding for the rows of the negative one (zeros for the plain variant, a black image's hidden
states for "plus" and "full", or the embedding of a given negative image), as IP-Adapter's own pipeline does.
The guider says which rows are which (`uncond_rows()`); a call outside a guider treats every row as positive.

The patch acts while the sampler's sigma lies in [sigma_end, sigma_start] (from start/end percents) and, with
a mask, only where the mask (resized to each attention's feature map) is nonzero: it multiplies the image
attention's contribution token by token (one mask, for every latent of the batch). Weight 0 or a step outside
the range leaves the output bit for bit unchanged. Several reference images are combined before projection
(`combine_embeds`) or, with "concat", each projected and their tokens concatenated. A weight type other than
linear gives each cross-attention's block its own multiplier (ip_adapter_weights.py; blocks it leaves out keep
the plain output, bit for bit).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.ip_adapter import FAMILY_TITLES, IPAdapterError, IPAdapterModel, Where, cross_attention_numbers
from .ip_adapter_weights import Block, LayerWeight
from .placement import PlacedModel
from .unet_patches import Site, UNetPatches, uncond_rows

log = logging.getLogger(__name__)

COMBINE_METHODS = ("concat", "add", "subtract", "average", "norm average")
EMBEDS_COMBINE_METHODS = (*COMBINE_METHODS, "max", "min")  # IPAdapterCombineEmbeds has two more


class IPAdapterHandle(PlacedModel[IPAdapterModel]):
    """IPADAPTER: a loaded IP-Adapter and its file name (errors name it). `placed(device, dtype)` gives the
    model on the UNet's device in its dtype; one such copy is kept (the original when it already fits)."""

    def describe(self) -> str:
        return f"IP-Adapter {self.name!r} ({self.model.info.title})"


def combine_embeds(embeds: Tensor, method: str) -> Tensor:
    """Several images' embeddings [N, ...] combined into [1, ...] (or kept, for "concat"): `add` sums them,
    `subtract` takes the first minus the mean of the others, `average` their mean, `norm average` the mean of
    the embeddings each scaled to unit length along the width, rescaled to the images' mean length; `max` and
    `min` element by element."""
    if method not in EMBEDS_COMBINE_METHODS:
        raise ValueError(f"combine method {method!r} is not supported; expected one of "
                         f"{', '.join(EMBEDS_COMBINE_METHODS)}")
    if method == "concat" or embeds.shape[0] == 1:
        return embeds
    if method == "add":
        return embeds.sum(0, keepdim=True)
    if method == "subtract":
        return embeds[:1] - embeds[1:].mean(0, keepdim=True)
    if method == "average":
        return embeds.mean(0, keepdim=True)
    if method in ("max", "min"):
        return embeds.amax(0, keepdim=True) if method == "max" else embeds.amin(0, keepdim=True)
    norms = embeds.norm(dim=-1, keepdim=True)
    return (embeds / norms.clamp_min(1e-12)).mean(0, keepdim=True) * norms.mean(0, keepdim=True)


@torch.no_grad()
def image_tokens(model: IPAdapterModel, embeds: Tensor, method: str = "concat") -> Tensor:
    """The image tokens [1, images * T, C] (fp32, CPU) of CLIP vision embeddings after `combine_embeds`."""
    tokens = model.project(combine_embeds(embeds.float(), method))
    return tokens.reshape(1, -1, tokens.shape[-1]).float().cpu()


def encoder_pixel_mask(mask: Tensor, size: int, node: str = "IPAdapterEncoder") -> Tensor:
    """IPAdapterEncoder's mask (MASK [1, H, W] or [H, W]) as the pixel mask [1, size, size] of a CLIP vision input of
    `size` pixels, as the node pack makes it: cut to its centre square and resized (bicubic, antialiased, not
    clamped), so that it covers the pixels the crop-center preprocessing keeps of the image; a mask already at
    size x size is taken as it is. The encoding multiplies the normalised pixels by it: a masked-out region reads
    as the normalisation's mean colour, i.e. the reference image loses that part (it does not restrict where the
    adapter acts: that is the apply nodes' attn_mask)."""
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3 or mask.shape[0] != 1:
        raise IPAdapterError(f"{node}: mask must be one MASK [1, H, W] (it applies to every image of the batch), "
                             f"got {list(mask.shape)}")
    mask = mask.float().cpu()
    if tuple(mask.shape[-2:]) == (size, size):
        return mask
    height, width = mask.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = mask[:, top:top + side, left:left + side]
    return F.interpolate(square[:, None], size=(size, size), mode="bicubic", antialias=True, align_corners=False)[:, 0]


def check_fits(handle: IPAdapterHandle, unet: nn.Module, family_title: str,
               node: str = "IPAdapter") -> dict[Where, tuple[int, int]]:
    """Each cross-attention of `unet` → its (number, width), after checking the adapter has a projection of that
    width for every one of them; a clear error naming both families otherwise."""
    info = handle.model.info
    numbers = cross_attention_numbers(unet)
    first = next((m for m in unet.modules() if hasattr(m, "transformer_blocks")), None)
    context_dim = first.transformer_blocks[0].attn2.to_k.in_features if first is not None else 0
    if context_dim != info.cross_attention_dim:
        theirs = FAMILY_TITLES.get(info.family or "", f"{info.cross_attention_dim}-wide text")
        raise IPAdapterError(f"{node}: {handle.describe()} is for {theirs} models ({info.cross_attention_dim}-wide "
                             f"text context); this model is {family_title} ({context_dim}-wide)")
    projections = dict(handle.model.ip_adapter.items())
    for where, (n, width) in numbers.items():
        kv = projections.get(str(n))
        if kv is None or kv.to_k_ip.out_features != width:
            has = "none" if kv is None else f"{kv.to_k_ip.out_features} wide"
            raise IPAdapterError(f"{node}: {handle.describe()} does not fit this {family_title} model: its "
                                 f"cross-attention {where} ({width} wide) would take ip_adapter.{n} ({has})")
    return numbers


class IPAttentionHook:
    """`cross_attention_out` hook adding the image attention at every cross-attention (see the module doc)."""

    def __init__(self, handle: IPAdapterHandle, numbers: dict[Where, tuple[int, int]], cond: Tensor,
                 uncond: Tensor, weight: float, sigma_start: float, sigma_end: float,
                 sigma_of: Callable[[Tensor], Tensor], mask: Tensor | None = None,
                 blocks: dict[Block, LayerWeight] | None = None) -> None:
        if mask is not None and mask.ndim == 2:
            mask = mask[None]
        if mask is not None and (mask.ndim != 3 or mask.shape[0] != 1):
            raise IPAdapterError(f"attn_mask must be one MASK [1, H, W] (it applies to every latent of the "
                                 f"batch), got {list(mask.shape)}")
        self.handle, self.numbers, self.cond, self.uncond = handle, numbers, cond, uncond
        self.weight, self.sigma_start, self.sigma_end, self.sigma_of = weight, sigma_start, sigma_end, sigma_of
        self.mask = None if mask is None else mask.float().cpu()
        # None: every cross-attention at `weight` (linear); else only the listed blocks (ip_adapter_weights.py)
        self.blocks = blocks
        # nothing to add anywhere (a weight of 0; "style and composition" keeps its composition layer at 1.0 then)
        self.silent = weight == 0 if blocks is None else not any(rule.scale for rule in blocks.values())

    def active(self, site: Site) -> bool:
        if self.silent:
            return False
        if site.sigmas is not None:
            sigma = float(torch.as_tensor(site.sigmas).reshape(-1)[0])
        else:
            sigma = float(self.sigma_of(site.timesteps.reshape(-1)[:1].float().cpu()))
        return self.sigma_end <= sigma <= self.sigma_start

    def _mask(self, size: tuple[int, int], like: Tensor) -> Tensor | None:
        """[1, h*w, 1]: the mask at this attention's feature size (bilinear), for every row."""
        if self.mask is None:
            return None
        m = F.interpolate(self.mask[:, None], size=size, mode="bilinear", align_corners=False)
        return m.flatten(1)[..., None].to(like.device, like.dtype)

    def __call__(self, out: Tensor, x: Tensor, site: Site) -> Tensor:
        if not self.active(site):
            return out
        where = (site.block[0], site.block[1], site.transformer)
        if where not in self.numbers:
            raise IPAdapterError(f"{self.handle.describe()}: no projection for the cross-attention at {where}")
        rule = LayerWeight(self.weight) if self.blocks is None else self.blocks.get(site.block)
        if rule is None or rule.scale == 0:
            return out
        attention = site.attention
        kv = self.handle.placed(x.device, x.dtype).ip_adapter[str(self.numbers[where][0])]
        rows, heads = x.shape[0], attention.heads
        flags = uncond_rows()
        if flags is None or len(flags) != rows:
            flags = (False,) * rows
        # a flipped layer: the negative rows attend to the reference image, the positive ones to nothing (zero
        # tokens give zero keys and values, hence exactly zero attention output)
        groups = ((True, self.cond),) if rule.flipped else ((False, self.cond), (True, self.uncond))
        if rule.flipped and not any(flags):
            return out
        q = attention.to_q(x)
        ip = torch.zeros_like(q) if rule.flipped else torch.empty_like(q)
        for negative, tokens in groups:
            index = [r for r in range(rows) if flags[r] == negative]
            if not index:
                continue
            t = tokens.to(x.device, x.dtype)
            k, v = kv.to_k_ip(t), kv.to_v_ip(t)
            sel = q if len(index) == rows else q[index]
            b = sel.shape[0]
            qh = sel.view(b, -1, heads, sel.shape[-1] // heads).transpose(1, 2)
            kh, vh = (p.view(1, -1, heads, p.shape[-1] // heads).transpose(1, 2).expand(b, -1, -1, -1) for p in (k, v))
            res = F.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).reshape(b, -1, sel.shape[-1])
            if len(index) == rows:
                ip = res
            else:
                ip[index] = res
        ip = ip * rule.scale
        mask = self._mask(site.size, ip)
        if mask is not None:
            ip = ip * mask
        return out + F.linear(ip, attention.to_out[0].weight)


def ip_adapter_patches(hook: IPAttentionHook) -> UNetPatches:
    """The UNet patches of one applied IP-Adapter (a MODEL clone merges them after its earlier ones, so several
    adapters add their image attentions in turn)."""
    return UNetPatches(cross_attention_out=(hook,))
