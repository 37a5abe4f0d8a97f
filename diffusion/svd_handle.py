"""The MODEL handle of a Stable Video Diffusion checkpoint: a DiffusionModel whose conditioning is an image.

It samples through the same KSampler flow as image models (its model sampling is continuous EDM v-prediction,
sigmas 0.002..700, from the family), but each conditioning entry becomes three UNet inputs instead of a text
context alone (`extra_cond`): the CLIP image embedding as a one-token context (the entry's tensor), the ADM vector
of (fps - 1, motion bucket, augmentation level), and the VAE latent of the start image concatenated to the noisy
latent's channels (unscaled, after the EDM input scaling, as SVD was trained; the negative entry carries zeros).
The batch of latents is the frames of one clip. ComfyUI's defaults (fps 6, motion bucket 127, augmentation 0,
a zero image latent) fill in options an entry lacks.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .checkpoints.svd_files import LoadedSVD
from .handles import ClipVisionModel, DiffusionModel, VAEModel, model_sampling_for
from .memory import ModelManager
from .models.svd_unet import svd_adm
from .patches.patcher import ModelPatcher
from .sampling.model_sampling import Denoiser

DEFAULTS = {"fps": 6, "motion_bucket_id": 127, "augmentation_level": 0.0}


def _to_batch(t: Tensor, batch: int) -> Tensor:
    """`t` [n, ...] as `batch` rows: repeated when n is 1, else rows picked evenly (ComfyUI's resize to batch)."""
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    index = torch.linspace(0, t.shape[0] - 1, batch).round().long()
    return t[index]


def concat_latent(latent: Tensor | None, x: Tensor) -> Tensor:
    """The conditioning image's latent for the rows of `x` [B, C, h, w]: resized (bilinear, centre-cropped to the
    aspect) when its size differs, one copy per frame; zeros when there is none."""
    if latent is None:
        return torch.zeros_like(x)
    latent = latent.to(x.device, x.dtype)
    if latent.shape[1] != x.shape[1]:
        raise ValueError(f"SVD: the conditioning image latent has {latent.shape[1]} channels, the model's latents "
                         f"{x.shape[1]} (encode the start image with this checkpoint's VAE)")
    if latent.shape[-2:] != x.shape[-2:]:
        latent = _center_resize(latent, *x.shape[-2:])
    return _to_batch(latent, x.shape[0])


def _center_resize(t: Tensor, height: int, width: int) -> Tensor:
    """Crop `t` [B, C, H, W] to the aspect of height x width around its centre, then resize bilinearly."""
    h, w = t.shape[-2:]
    if w * height > h * width:  # too wide: crop the sides
        keep = max(1, round(h * width / height))
        x0 = (w - keep) // 2
        t = t[..., x0:x0 + keep]
    elif w * height < h * width:
        keep = max(1, round(w * height / width))
        y0 = (h - keep) // 2
        t = t[..., y0:y0 + keep, :]
    return F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)


@dataclasses.dataclass
class SVDModel(DiffusionModel):
    """MODEL of an SVD / SVD-XT checkpoint (see the module's docstring)."""

    def extra_cond(self, options: dict[str, Any], x: Tensor) -> dict[str, Tensor]:
        batch = x.shape[0]
        values = {name: options.get(name, default) for name, default in DEFAULTS.items()}
        y = svd_adm(values["fps"], values["motion_bucket_id"], values["augmentation_level"],
                    self.family.unet.adm_in_channels)
        return {"y": y.to(x.device).expand(batch, -1),
                "c_concat": concat_latent(options.get("concat_latent_image"), x),
                "frame_index": torch.arange(batch, device=x.device, dtype=torch.float32)[:, None]}

    @contextlib.contextmanager
    def denoiser(self, concat: Tensor | None = None) -> Iterator[Denoiser]:
        if concat is not None:
            raise ValueError("SVD models take their image latent from SVD_img2vid_Conditioning, not from the latent's "
                             "inpainting channels")
        options = self.model_options.get("transformer_options") or {}
        if (self.unet_patches or self.unet_wrapper is not None or options.get("patches")
                or options.get("patches_replace") or self.model_options.get("model_function_wrapper") is not None):
            raise ValueError("model patches that hook into the UNet (FreeU, attention and block patches, DeepCache, "
                             "node packs' transformer patches and wrappers) are not supported on Stable Video "
                             "Diffusion models")
        with self.manager.use([self.patcher]) as (unet,):
            device, dtype = self.manager.device, self.dtype

            def net(x_in: Tensor, t: Tensor, context: Tensor, y: Tensor, c_concat: Tensor, frame_index: Tensor,
                    sigma: Tensor | None = None, unet_patches: Any = None, control: Any = None,
                    transformer_options: dict[str, Any] | None = None) -> Tensor:
                """One UNet call; the guider stacks entries (cond, uncond) as whole clips, so the clip length is
                the number of distinct frame indices."""
                if unet_patches or control or (transformer_options or {}).get("patches"):
                    raise ValueError("ControlNets, GLIGEN and other UNet patches do not apply to Stable Video "
                                     "Diffusion models")
                frames = int(frame_index.max().item()) + 1
                x = torch.cat([x_in, c_concat.to(x_in)], dim=1)
                out = unet(x.to(device, dtype), t.to(device), context.to(device, dtype), y.to(device, dtype), frames)
                return out.float()

            yield Denoiser(net, self.model_sampling, pass_sigma=True)


def wrap_svd(loaded: LoadedSVD, manager: ModelManager, name: str = "svd",
             offload_device: torch.device | str = "cpu") -> tuple[SVDModel, ClipVisionModel, VAEModel]:
    """The MODEL, CLIP_VISION and VAE handles of a loaded SVD file, managed by `manager`."""
    device = manager.device
    vae_dtype = next(loaded.vae.parameters()).dtype
    vae = VAEModel(ModelPatcher(loaded.vae, device, offload_device, name=f"{name} vae"), manager, vae_dtype,
                   loaded.family.vae.downscale)
    model = SVDModel(ModelPatcher(loaded.unet, device, offload_device, name=f"{name} unet"), loaded.family,
                     model_sampling_for(loaded.family), manager, next(loaded.unet.parameters()).dtype,
                     preview_encode=vae.encode)
    vision = ClipVisionModel(ModelPatcher(loaded.clip_vision, device, offload_device, name=f"{name} clip_vision"),
                             manager)
    return model, vision, vae
