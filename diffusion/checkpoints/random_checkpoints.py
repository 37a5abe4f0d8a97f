"""Random-weight checkpoints in the real single-file layout, for tests, benchmarks and demos.

No model hub is reachable from the project's machines, so everything that needs "a checkpoint" gets one
from here: the same keys, shapes and text-encoder layouts as the released SD1.5 / SD2.x / SDXL base /
SDXL refiner files (`size="real"`), or the same structure at tiny widths that builds in well under a
second (`size="tiny"`, plus `"small"`, a mid-size SD1 layout for memory measurements). Tiny files carry
the hyper-parameters that shapes cannot tell in the `latentloom.config` metadata (see families.py).

Files are written one tensor at a time (key -> shape from modules built on the meta device, values drawn
as each tensor is written), so a 2 GB real-size file needs only one tensor's worth of memory.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace

import torch

from ..models.clip_text import ClipTextModel
from ..models.text_encoders import TextEncoderConfig
from ..models.unet import UNetConfig, UNetModel
from ..models.vae import AutoencoderKL, VAEConfig
from .clip_keys import to_hf_checkpoint, to_open_clip
from .families import CONFIG_METADATA_KEY, SD2_V_PROBE, UNET_PREFIX, VAE_PREFIX
from .files import write_safetensors

Tensor = torch.Tensor

SIZES = ("tiny", "small", "real")


@dataclass(frozen=True)
class TextSpec:
    prefix: str
    layout: str  # "hf" or "open_clip"
    config: TextEncoderConfig


@dataclass(frozen=True)
class CheckpointSpec:
    family: str
    unet: UNetConfig
    vae: VAEConfig
    text: tuple[TextSpec, ...]
    clip_heads: int | None = None  # None: real CLIP heads (64 channels each)


CLIP_L = TextEncoderConfig(768, 12, 3072, 12)
OPEN_CLIP_H = TextEncoderConfig(1024, 24, 4096, 16, projection_dim=1024, hidden_act="gelu")
OPEN_CLIP_G = TextEncoderConfig(1280, 32, 5120, 20, projection_dim=1280, hidden_act="gelu")
TINY_HEADS = 2


def _tiny_clip(projection: bool, act: str) -> TextEncoderConfig:
    # width 16: the 49408-row token table dominates a tiny file (49408 x 16 x 4 bytes = 3.2 MB)
    return TextEncoderConfig(16, 3, 32, TINY_HEADS, projection_dim=16 if projection else None, hidden_act=act)


def _text_specs(family: str, size: str) -> tuple[TextSpec, ...]:
    tiny = size == "tiny"
    clip_l = _tiny_clip(False, "quick_gelu") if tiny else CLIP_L
    clip_h = _tiny_clip(True, "gelu") if tiny else OPEN_CLIP_H
    clip_g = _tiny_clip(True, "gelu") if tiny else OPEN_CLIP_G
    if size == "small":
        clip_l = TextEncoderConfig(256, 4, 1024, 4)
    return {
        "sd1": (TextSpec("cond_stage_model.transformer.", "hf", clip_l),),
        "sd2": (TextSpec("cond_stage_model.model.", "open_clip", clip_h),),
        "sdxl": (
            TextSpec("conditioner.embedders.0.transformer.", "hf", clip_l),
            TextSpec("conditioner.embedders.1.model.", "open_clip", clip_g),
        ),
        "sdxl_refiner": (TextSpec("conditioner.embedders.0.model.", "open_clip", clip_g),),
    }[family]


def _unet_config(family: str, size: str, text: tuple[TextSpec, ...]) -> UNetConfig:
    context = sum(t.config.hidden_size for t in text)
    pooled = text[-1].config.projection_dim or 0
    if size == "real":
        return {"sd1": UNetConfig.sd1, "sd2": UNetConfig.sd2, "sdxl": UNetConfig.sdxl,
                "sdxl_refiner": UNetConfig.sdxl_refiner}[family]()
    if size == "small":
        if family != "sd1":
            raise ValueError("size='small' exists for sd1 only (it is for memory measurements)")
        return UNetConfig.sd1(model_channels=64, context_dim=context)
    tiny = {"model_channels": 16, "context_dim": context, "norm_groups": 8}
    if family == "sd1":
        return UNetConfig.sd1(channel_mult=(1, 2, 2, 2), num_heads=2, **tiny)
    if family == "sd2":
        return UNetConfig.sd2(channel_mult=(1, 2, 2, 2), num_head_channels=8, **tiny)
    if family == "sdxl":  # six size/crop embeddings of 8 channels after the pooled bigG vector
        return UNetConfig.sdxl(channel_mult=(1, 2, 2), transformer_depth=(0, 1, 2), transformer_depth_middle=1,
                               num_head_channels=8, adm_in_channels=pooled + 6 * 8, **tiny)
    return UNetConfig.sdxl_refiner(channel_mult=(1, 2, 2, 2), transformer_depth=(0, 1, 1, 0),
                                   transformer_depth_middle=1, num_head_channels=8,
                                   adm_in_channels=pooled + 5 * 8, **tiny)


def checkpoint_spec(family: str, size: str = "tiny", *, inpaint: bool = False) -> CheckpointSpec:
    """The configs of the modules a `family` checkpoint of `size` holds."""
    if family not in ("sd1", "sd2", "sdxl", "sdxl_refiner"):
        raise ValueError(f"unknown family {family!r}; known: sd1, sd2, sdxl, sdxl_refiner")
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    text = _text_specs(family, size)
    unet = _unet_config(family, size, text)
    vae = {
        "tiny": VAEConfig(ch=16, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8),
        "small": VAEConfig(ch=32),
        "real": VAEConfig(),
    }[size]
    if inpaint:  # latent + mask + masked-image latent
        unet = replace(unet, in_channels=2 * vae.embed_dim + 1)
    clip_heads = {"tiny": TINY_HEADS, "small": 4, "real": None}[size]
    return CheckpointSpec(family, unet, vae, text, clip_heads)


def _text_layout(spec: TextSpec) -> dict[str, Tensor]:
    with torch.device("meta"):
        ours = ClipTextModel(spec.config.clip_config()).state_dict()  # our layout, as the model's names are
    if spec.layout == "hf":  # released SD1/SDXL files keep the position_ids buffer
        return to_hf_checkpoint(ours, spec.prefix, with_position_ids=True)
    return to_open_clip(ours, spec.prefix)


def checkpoint_layout(spec: CheckpointSpec, *, vae_prefix: str = VAE_PREFIX) -> dict[str, Tensor]:
    """Every key of the checkpoint -> a meta tensor of its shape (or the real value for the few
    constants a file carries: position ids, OpenCLIP's logit scale). Costs no weight memory."""
    with torch.device("meta"):
        unet = UNetModel(spec.unet).state_dict()
        vae = AutoencoderKL(spec.vae).state_dict()
    layout = {UNET_PREFIX + k: v for k, v in unet.items()}
    layout.update({vae_prefix + k: v for k, v in vae.items()})
    for text in spec.text:
        layout.update(_text_layout(text))
    return layout


def random_tensor(key: str, shape: tuple[int, ...], gen: torch.Generator, std_override: float | None = None) -> Tensor:
    """Noise scaled so activations stay near unit size: norm scales 1 ± 0.2, biases 0.1, matrices and
    convs 1/sqrt(fan-in). Output layers that training would start at zero are random too, so no
    output is trivially zero."""
    noise = torch.randn(shape, generator=gen)  # scaled in place: one temporary per tensor at most
    if std_override is not None:
        return noise.mul_(std_override)
    if len(shape) == 1 and key.endswith("weight"):
        return noise.mul_(0.2).add_(1.0)
    if len(shape) <= 1:
        return noise.mul_(0.1)
    return noise.div_(math.sqrt(math.prod(shape[1:])))


def _write(path: str | os.PathLike, layout: dict[str, Tensor], dtype: torch.dtype, seed: int,
           metadata: dict[str, str], overrides: dict[str, float]) -> None:
    gen = torch.Generator().manual_seed(seed)
    keys = sorted(layout)

    def stored_dtype(t: Tensor) -> torch.dtype:
        return dtype if t.dtype.is_floating_point else t.dtype

    shapes = {k: (stored_dtype(layout[k]), tuple(layout[k].shape)) for k in keys}

    def produce(key: str) -> Tensor:
        t = layout[key]
        value = t if not t.is_meta else random_tensor(key, tuple(t.shape), gen, overrides.get(key))
        return value.to(shapes[key][0])

    write_safetensors(path, shapes, produce, {"format": "pt", **metadata})


def _config_metadata(spec: CheckpointSpec, prediction: str) -> dict[str, str]:
    u = spec.unet
    heads = {"num_heads": u.num_heads} if u.num_heads > 0 else {"num_head_channels": u.num_head_channels}
    config = {
        "family": spec.family,
        "prediction": prediction,
        "unet": {**heads, "norm_groups": u.norm_groups},
        "vae": {"norm_groups": spec.vae.norm_groups},
        "clip": {"num_heads": spec.clip_heads},
    }
    return {CONFIG_METADATA_KEY: json.dumps(config, sort_keys=True)}


def write_random_checkpoint(
    path: str | os.PathLike,
    family: str,
    *,
    size: str = "tiny",
    inpaint: bool = False,
    prediction: str = "eps",
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> CheckpointSpec:
    """Write a random `family` checkpoint ("sd1", "sd2", "sdxl", "sdxl_refiner") to `path` (.safetensors).

    dtype: float16 for real size, float32 otherwise, unless given. prediction "v" is marked as real files
    mark it: SDXL with a `v_pred` key; SD2 by the spread of the weights ComfyUI's heuristic looks at (and,
    below real size, in the metadata)."""
    if prediction not in ("eps", "v"):
        raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
    if prediction == "v" and family not in ("sd2", "sdxl"):
        raise ValueError(f"{family} checkpoints are eps-prediction only here; v exists for sd2 and sdxl")
    spec = checkpoint_spec(family, size, inpaint=inpaint)
    dtype = dtype or (torch.float16 if size == "real" else torch.float32)
    layout = checkpoint_layout(spec)
    overrides = {}
    if family == "sd2" and SD2_V_PROBE in layout:
        overrides[SD2_V_PROBE] = 0.15 if prediction == "v" else 0.05
    if family == "sdxl" and prediction == "v":
        layout["v_pred"] = torch.empty(0)
    metadata = _config_metadata(spec, prediction) if size != "real" else {}
    _write(path, layout, dtype, seed, metadata, overrides)
    return spec


def write_random_vae(
    path: str | os.PathLike,
    *,
    prefix: bool = True,
    size: str = "tiny",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> VAEConfig:
    """A standalone VAE file (`models/vae`), its keys under `first_stage_model.` or bare."""
    spec = checkpoint_spec("sd1", "real" if size == "real" else "tiny")
    with torch.device("meta"):
        layout = {(VAE_PREFIX if prefix else "") + k: v for k, v in AutoencoderKL(spec.vae).state_dict().items()}
    metadata = {}
    if size == "tiny":
        metadata = {CONFIG_METADATA_KEY: json.dumps({"vae": {"norm_groups": spec.vae.norm_groups}})}
    _write(path, layout, dtype, seed, metadata, {})
    return spec.vae


def layout_shapes(family: str, size: str = "real", *, inpaint: bool = False) -> dict[str, Tensor]:
    """The full key -> meta tensor map of a checkpoint, without writing it (for detection tests)."""
    return checkpoint_layout(checkpoint_spec(family, size, inpaint=inpaint))

