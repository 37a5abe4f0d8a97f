"""Stable Video Diffusion single files (`svd.safetensors`, `svd_xt.safetensors`, their fp16 and image-decoder
variants): detection and loading of the UNet, the autoencoder and the CLIP image encoder they carry.

Stability's layout: `model.diffusion_model.*` (the spatio-temporal UNet, models/svd_unet.py; the marker is its
`time_stack`), `first_stage_model.{encoder,decoder}.*` (models/svd_vae.py: a temporal decoder when the file has
`decoder.mid.block_1.mix_factor`, the plain SD decoder in the "image decoder" variants), and the conditioner:
`conditioner.embedders.0.open_clip.model.visual.*` (OpenCLIP ViT-H/14, whose projected image embedding is the
UNet's context); the rest of the conditioner (OpenCLIP's leftover text-side tensors, the conditioning frames'
encoder copy) is not needed and not read. SVD and SVD-XT share one architecture; they differ in training length
(14 and 25 frames), which the workflow's `video_frames` chooses. The network is an EDM v-predictor between sigmas
0.002 and 700 (the family's `continuous` range). `svd_checkpoint_plan` writes the same layout back (the image
encoder, the UNet and the autoencoder; ComfyUI's ImageOnlyCheckpointSave).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..models.clip_vision import clip_vision_from_state_dict, to_open_clip
from ..models.svd_unet import SVD_MARKER, SVDUNet, SVDUNetConfig
from ..models.svd_vae import SVD_VAE_MARKER, SVDAutoencoder, svd_vae_config
from ..models.vae import AutoencoderKL
from ..patches.patcher import ModelPatcher
from .families import (
    CONFIG_METADATA_KEY,
    UNET_PREFIX,
    VAE_PREFIX,
    FamilyError,
    ModelFamily,
    config_metadata,
    detect_family,
)
from .files import CheckpointError, key_prefixes, read_metadata, read_state_dict, strip_prefix
from .loader import _stored_dtype, fill_module, vae_dtype
from .saving import TensorPlan, checkpoint_plan, patched_state_dict
from .saving import config_metadata as saving_config_metadata

if TYPE_CHECKING:  # transformers is imported only when a tower is built (models/transformers_clip.py)
    from transformers import CLIPVisionModelWithProjection

log = logging.getLogger(__name__)

Tensor = torch.Tensor

VISION_PREFIX = "conditioner.embedders.0.open_clip.model.visual."
SVD_SIGMAS = (0.002, 700.0)  # the EDM sigma range SVD was trained on
SVD_SCALING_FACTOR = 0.18215


@dataclass
class LoadedSVD:
    family: ModelFamily
    unet: SVDUNet
    vae: SVDAutoencoder | AutoencoderKL
    clip_vision: CLIPVisionModelWithProjection
    metadata: dict[str, str]


def is_svd(sd: Mapping[str, Tensor]) -> bool:
    return UNET_PREFIX + SVD_MARKER in sd


def detect_svd(sd: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> ModelFamily:
    """The family of an SVD file; a FamilyError that names what the file is otherwise."""
    if not is_svd(sd):
        raise FamilyError(_not_svd(sd, metadata))
    config = config_metadata(metadata)
    meta = config.get("unet", {})
    heads = {k: int(meta[k]) for k in ("num_heads", "num_head_channels") if k in meta}
    try:
        unet = SVDUNetConfig.from_state_dict(strip_prefix(sd, UNET_PREFIX), norm_groups=meta.get("norm_groups"),
                                             **heads)
    except ValueError as e:
        raise FamilyError(f"{UNET_PREFIX}* keys do not make an SVD UNet: {e}") from None
    vae_sd = strip_prefix(sd, VAE_PREFIX)
    if not vae_sd:
        raise FamilyError(f"Stable Video Diffusion checkpoint without its autoencoder: no {VAE_PREFIX}* keys")
    try:
        vae = svd_vae_config(vae_sd, norm_groups=config.get("vae", {}).get("norm_groups"))
    except ValueError as e:
        raise FamilyError(f"{VAE_PREFIX}* keys do not make the SVD autoencoder: {e}") from None
    if unet.out_channels != vae.z_channels or unet.in_channels != 2 * vae.z_channels:
        raise FamilyError(f"SVD checkpoint is inconsistent: the autoencoder makes {vae.z_channels}-channel latents "
                          f"but the UNet takes {unet.in_channels} (latent + conditioning latent) and predicts "
                          f"{unet.out_channels}")
    return ModelFamily(name="svd", inpaint=False, prediction="v", unet=unet, vae=vae,
                       latent_channels=vae.z_channels, scaling_factor=SVD_SCALING_FACTOR, text_family="svd",
                       continuous=SVD_SIGMAS)


def _not_svd(sd: Mapping[str, Tensor], metadata: Mapping[str, str] | None) -> str:
    try:
        found = f"an image model checkpoint ({detect_family(sd, metadata).title})"
    except CheckpointError:
        shown = dict(sorted(key_prefixes(sd).items(), key=lambda kv: -kv[1])[:6])
        found = f"not a checkpoint this loader knows ({len(sd)} keys with prefixes {shown})"
    return (f"this is {found}, not a Stable Video Diffusion (image-to-video) model: no {UNET_PREFIX}{SVD_MARKER}; "
            f"load image models with CheckpointLoaderSimple")


def build_svd_modules(sd: Mapping[str, Tensor], family: ModelFamily, metadata: Mapping[str, str] | None = None, *,
                      dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                      autoencoder_dtype: torch.dtype | None = None
                      ) -> tuple[SVDUNet, SVDAutoencoder | AutoencoderKL, CLIPVisionModelWithProjection]:
    """UNet, autoencoder and CLIP image encoder, each built on the meta device and filled with the file's tensors.
    dtype None keeps the UNet's stored dtype; the autoencoder follows it except that fp16 becomes fp32."""
    device = torch.device(device)
    unet_sd = strip_prefix(sd, UNET_PREFIX)
    dtype = dtype or _stored_dtype(unet_sd)
    vae_sd = {k: v for k, v in strip_prefix(sd, VAE_PREFIX).items() if k.startswith(("encoder.", "decoder."))}
    temporal = SVD_VAE_MARKER in vae_sd
    try:
        with torch.device("meta"):
            unet = SVDUNet(family.unet)
            vae = SVDAutoencoder(family.vae) if temporal else _image_decoder_vae(family)
    except ValueError as e:
        raise CheckpointError(f"the SVD modules cannot be built from the detected shapes: {e}") from None
    fill_module(unet, unet_sd, "SVD UNet", dtype, device)
    if not temporal:  # the "image decoder" variants: SD's decoder, and no quant convs in the file
        vae_sd = {**vae_sd, **_identity_quant(family)}
    fill_module(vae, vae_sd, "SVD autoencoder", autoencoder_dtype or vae_dtype(dtype), device)
    vision_sd = {"visual." + k: v for k, v in strip_prefix(sd, VISION_PREFIX).items()}
    if not vision_sd:
        raise CheckpointError(f"Stable Video Diffusion checkpoint without its CLIP image encoder: no {VISION_PREFIX}* "
                              f"keys")
    try:
        vision = clip_vision_from_state_dict(vision_sd, metadata, dtype=dtype, device=device,
                                             what="SVD image encoder")
    except CheckpointError as e:
        raise CheckpointError(f"the SVD image encoder ({VISION_PREFIX}*) cannot be built: {e}") from None
    if vision.config.projection_dim != family.unet.context_dim:
        raise CheckpointError(f"SVD checkpoint is inconsistent: the image encoder's embedding is "
                              f"{vision.config.projection_dim} wide, the UNet attends to {family.unet.context_dim}")
    return unet, vae, vision


def _image_decoder_vae(family: ModelFamily) -> AutoencoderKL:
    return AutoencoderKL(family.vae)


def _identity_quant(family: ModelFamily) -> dict[str, Tensor]:
    """quant_conv / post_quant_conv that change nothing, for a file whose autoencoder has none."""
    z, e = family.vae.z_channels, family.vae.embed_dim
    return {"quant_conv.weight": torch.eye(2 * e, 2 * z)[:, :, None, None], "quant_conv.bias": torch.zeros(2 * e),
            "post_quant_conv.weight": torch.eye(z, e)[:, :, None, None], "post_quant_conv.bias": torch.zeros(z)}


def load_svd_checkpoint(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu", autoencoder_dtype: torch.dtype | None = None) -> LoadedSVD:
    """An SVD / SVD-XT single file (.safetensors, or a pickle loaded without running code); errors name the file."""
    sd = read_state_dict(path)
    metadata = read_metadata(path)
    try:
        family = detect_svd(sd, metadata)
        unet, vae, vision = build_svd_modules(sd, family, metadata, dtype=dtype, device=device,
                                              autoencoder_dtype=autoencoder_dtype)
    except CheckpointError as e:
        raise type(e)(f"{path}: {e}") from None
    log.info("loaded %s as %s", path, family.title)
    return LoadedSVD(family, unet, vae, vision, metadata)


def svd_checkpoint_plan(unet: ModelPatcher, vision: ModelPatcher, vae: ModelPatcher) -> TensorPlan:
    """An SVD file's tensors in Stability's layout, the UNet's and the autoencoder's patches applied (saving.py
    streams them one at a time), the image encoder converted back to OpenCLIP's layout under its prefix."""
    plan = checkpoint_plan(unet, vae=vae)
    for key, value in to_open_clip(patched_state_dict(vision), VISION_PREFIX).items():
        plan.add_tensor(key, value)
    return plan


def svd_config_metadata(family: ModelFamily, vae_norm_groups: int, vision_heads: int, vision_act: str) -> dict:
    """The `latentloom.config` entry that lets a saved tiny SVD load back as itself (real sizes need none)."""
    raw = saving_config_metadata("svd", "v", family.unet, vae_norm_groups)[CONFIG_METADATA_KEY]
    config = {**json.loads(raw), "clip_vision": {"num_heads": vision_heads, "hidden_act": vision_act}}
    return {CONFIG_METADATA_KEY: json.dumps(config, sort_keys=True)}
