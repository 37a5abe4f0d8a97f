"""Random-weight Stable Video Diffusion files in Stability's single-file layout, for tests and demos.

The same keys and shapes as `svd.safetensors` / `svd_xt.safetensors` (`size="real"`: the 1.5 B-parameter UNet,
the temporal autoencoder, OpenCLIP ViT-H's visual tower and the text-side tensors OpenCLIP keeps beside it), or
the same structure at tiny widths (`size="tiny"`) that builds in a fraction of a second. Tiny files carry the
hyper-parameters shapes cannot tell (heads, GroupNorm groups, the vision tower's heads and activation) in the
`latentloom.config` metadata, as the other random checkpoints do.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from ..models.clip_vision import PRESETS, ClipVisionConfig, clip_vision_layout
from ..models.svd_unet import SVDUNet, SVDUNetConfig
from ..models.svd_vae import SVDAutoencoder
from ..models.vae import AutoencoderKL, VAEConfig
from .families import CONFIG_METADATA_KEY, UNET_PREFIX, VAE_PREFIX
from .random_checkpoints import _write
from .svd_files import VISION_PREFIX

OPEN_CLIP_MODEL = VISION_PREFIX.removesuffix("visual.")


@dataclass(frozen=True)
class SVDSpec:
    unet: SVDUNetConfig
    vae: VAEConfig
    vision: ClipVisionConfig


def svd_spec(size: str = "tiny") -> SVDSpec:
    """Real: SVD's numbers. Tiny: a 16-wide two-level UNet (context 16 = the tiny CLIP tower's embedding, three
    8-wide ADM embeddings), the tiny SD autoencoder's shape (8x downscale), the tiny CLIP vision tower."""
    if size == "real":
        return SVDSpec(SVDUNetConfig(), VAEConfig(), PRESETS["vit_h"])
    if size != "tiny":
        raise ValueError(f"size must be 'tiny' or 'real', got {size!r}")
    vision = PRESETS["tiny"]
    unet = SVDUNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1),
                         transformer_depth_middle=1, context_dim=vision.projection_dim, num_head_channels=8,
                         adm_in_channels=24, norm_groups=8)
    return SVDSpec(unet, VAEConfig(ch=16, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8), vision)


def svd_layout(spec: SVDSpec, *, image_decoder: bool = False) -> dict[str, torch.Tensor]:
    """Every key of the file -> a meta tensor of its shape (OpenCLIP's logit scale: its real value).
    `image_decoder`: the `*_image_decoder` variants' autoencoder, SD's per-frame decoder (and no quant convs)."""
    with torch.device("meta"):
        unet = SVDUNet(spec.unet).state_dict()
        if image_decoder:
            vae = {k: v for k, v in AutoencoderKL(spec.vae).state_dict().items() if "quant_conv" not in k}
        else:
            vae = SVDAutoencoder(spec.vae).state_dict()
    layout = {UNET_PREFIX + k: v for k, v in unet.items()}
    layout.update({VAE_PREFIX + k: v for k, v in vae.items()})
    layout.update(clip_vision_layout(spec.vision, "open_clip", VISION_PREFIX))
    width = spec.vision.projection_dim  # OpenCLIP keeps its text side's small tensors (the transformer is deleted)
    with torch.device("meta"):
        layout.update({OPEN_CLIP_MODEL + k: torch.empty(shape) for k, shape in {
            "positional_embedding": (77, width), "token_embedding.weight": (49408 if width > 64 else 64, width),
            "ln_final.weight": (width,), "ln_final.bias": (width,), "text_projection": (width, width)}.items()})
    layout[OPEN_CLIP_MODEL + "logit_scale"] = torch.tensor(4.6052)
    return layout


def write_random_svd_checkpoint(path: str | os.PathLike, *, size: str = "tiny", seed: int = 0,
                                dtype: torch.dtype | None = None, image_decoder: bool = False) -> SVDSpec:
    """Write a random SVD file (fp16 at real size, fp32 tiny unless `dtype` says otherwise); `image_decoder` as
    in `svd_layout`."""
    spec = svd_spec(size)
    dtype = dtype or (torch.float16 if size == "real" else torch.float32)
    metadata = {}
    if size != "real":
        u = spec.unet
        config = {"family": "svd", "prediction": "v",
                  "unet": {"num_head_channels": u.num_head_channels, "norm_groups": u.norm_groups},
                  "vae": {"norm_groups": spec.vae.norm_groups},
                  "clip_vision": {"num_heads": spec.vision.num_heads, "hidden_act": spec.vision.hidden_act}}
        metadata[CONFIG_METADATA_KEY] = json.dumps(config, sort_keys=True)
    _write(path, svd_layout(spec, image_decoder=image_decoder), dtype, seed, metadata, {})
    return spec
