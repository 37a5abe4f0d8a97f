"""Random-weight SD2.1 unCLIP checkpoints in the real single-file layout, for tests.

An SD2 checkpoint whose UNet has an ADM input (`label_emb`, 2·D wide), the noise augmentor's schedule buffers
(`noise_augmentor.*`, the squared-cosine schedule's real values) and the image encoder as the unCLIP models
carry it: an OpenCLIP-layout vision tower under `embedder.model.visual.` whose projection is D wide.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

import torch

from ..models.clip_vision import PRESETS, ClipVisionConfig, clip_vision_layout
from ..models.unclip import PREFIX, schedule_buffers, squaredcos_alphas_cumprod
from .families import CONFIG_METADATA_KEY
from .files import write_safetensors
from .random_checkpoints import CheckpointSpec, checkpoint_layout, checkpoint_spec, random_tensor

EMBEDDER_PREFIX = "embedder.model.visual."


def unclip_spec(size: str = "tiny") -> tuple[CheckpointSpec, ClipVisionConfig]:
    """The checkpoint spec (SD2 with an ADM input) and the image encoder of an unCLIP checkpoint: real size is
    the ViT-H model (ADM 2048), tiny a 16-wide embedding (ADM 32)."""
    vision = PRESETS["vit_h" if size == "real" else "tiny"]
    spec = checkpoint_spec("sd2", size)
    return replace(spec, unet=replace(spec.unet, adm_in_channels=2 * vision.projection_dim)), vision


def write_random_unclip_checkpoint(path: str | os.PathLike, *, size: str = "tiny", prediction: str = "v",
                                   seed: int = 0, with_embedder: bool = True) -> CheckpointSpec:
    """Write a random SD2.1 unCLIP checkpoint (v-prediction, as Stability's are); `with_embedder` False leaves
    out the image encoder (some files are shared without it)."""
    spec, vision = unclip_spec(size)
    dtype = torch.float16 if size == "real" else torch.float32
    layout = checkpoint_layout(spec)
    if with_embedder:
        layout.update(clip_vision_layout(vision, "open_clip", EMBEDDER_PREFIX))
    constants = {PREFIX + k: v for k, v in schedule_buffers(squaredcos_alphas_cumprod()).items()}
    layout.update(constants)
    gen = torch.Generator().manual_seed(seed)
    keys = sorted(layout)
    shapes = {k: (dtype if k not in constants else torch.float32, tuple(layout[k].shape)) for k in keys}

    def produce(key: str) -> torch.Tensor:
        return constants[key] if key in constants else random_tensor(key, shapes[key][1], gen).to(dtype)

    metadata = {"format": "pt"}
    if size != "real":
        u = spec.unet
        heads = {"num_heads": u.num_heads} if u.num_heads > 0 else {"num_head_channels": u.num_head_channels}
        config = {"family": "sd2", "prediction": prediction, "unet": {**heads, "norm_groups": u.norm_groups},
                  "vae": {"norm_groups": spec.vae.norm_groups}, "clip": {"num_heads": spec.clip_heads},
                  "clip_vision": {"num_heads": vision.num_heads, "hidden_act": vision.hidden_act}}
        metadata[CONFIG_METADATA_KEY] = json.dumps(config, sort_keys=True)
    write_safetensors(path, shapes, produce, metadata)
    return spec
