"""Which Stable Diffusion family a single-file checkpoint belongs to, read from its keys and shapes.

The UNet decides most of it (ADM input or not, linear or conv transformer projections, input channels);
the text encoders' key layouts then tell SD1 (HF CLIP-L) from SD2 (OpenCLIP ViT-H) and SDXL base (CLIP-L +
bigG) from the refiner (bigG alone). Hyper-parameters that no shape reveals (attention heads, GroupNorm
groups) take the family defaults, unless the file's safetensors metadata carries `latentloom.config`, a
JSON object our own test-checkpoint writer adds for tiny models:
`{"family", "prediction", "unet": {"num_heads" | "num_head_channels", "norm_groups"}, "vae": {"norm_groups"},
"clip": {"num_heads"}}`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..models.text_encoders import FAMILIES as TEXT_FAMILIES
from ..models.unet import UNetConfig
from ..models.vae import VAEConfig
from .files import CheckpointError, key_prefixes, strip_prefix

log = logging.getLogger(__name__)

Tensor = torch.Tensor

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CONFIG_METADATA_KEY = "latentloom.config"
FAMILY_NAMES = ("sd1", "sd2", "sdxl", "sdxl_refiner")
TITLES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL base", "sdxl_refiner": "SDXL refiner",
          "svd": "Stable Video Diffusion"}  # svd: detected and loaded by svd_files.py
SCALING_FACTORS = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025, "sdxl_refiner": 0.13025, "svd": 0.18215}
SVD_UNET_MARKER = UNET_PREFIX + "input_blocks.1.0.time_stack.in_layers.0.weight"
# ComfyUI's test for SD2 v-prediction checkpoints: the v models' weights here are spread wider.
SD2_V_PROBE = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
SD2_V_STD_THRESHOLD = 0.09


class FamilyError(CheckpointError):
    """The keys and shapes of a checkpoint do not make a supported Stable Diffusion model."""


@dataclass(frozen=True)
class ModelFamily:
    """What a checkpoint is and how to build its modules.

    `text_family` is the name `TextEncoders.from_state_dict` takes; `clip_heads` None means real CLIP
    heads (64 channels each)."""

    name: str
    inpaint: bool
    prediction: str  # "eps" or "v"
    unet: UNetConfig
    vae: VAEConfig
    latent_channels: int
    scaling_factor: float
    text_family: str
    clip_heads: int | None = None
    unclip: bool = False  # SD2.1 unCLIP: the UNet's ADM input takes a noised CLIP image embedding (models/unclip.py)
    # Marker keys some trainers write beside the weights: `edm_vpred.sigma_min/max` (CosXL: a continuous-time
    # EDM v-prediction model, sampled between those sigmas) and `ztsnr` (trained on a zero-terminal-SNR schedule).
    continuous: tuple[float, float] | None = None
    zsnr: bool = False

    @property
    def title(self) -> str:
        inpaint = " inpainting" if self.inpaint else ""
        unclip = " unCLIP" if self.unclip else ""
        return f"{TITLES[self.name]}{unclip}{inpaint} ({self.prediction}-prediction)"


def config_metadata(metadata: Mapping[str, str] | None) -> dict:
    """The parsed `latentloom.config` object, or {} when absent."""
    raw = (metadata or {}).get(CONFIG_METADATA_KEY)
    if raw is None:
        return {}
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as e:
        raise FamilyError(f"checkpoint metadata {CONFIG_METADATA_KEY!r} is not valid JSON: {e}") from None
    if not isinstance(parsed, dict):
        raise FamilyError(f"checkpoint metadata {CONFIG_METADATA_KEY!r} must be a JSON object, got {raw[:80]!r}")
    return parsed


def detect_family(
    sd: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None, *, prediction: str | None = None
) -> ModelFamily:
    """The family of a full checkpoint state dict (original single-file key layout). `prediction` forces
    "eps" or "v" (for SD2-style models whose file does not say)."""
    if prediction not in (None, "eps", "v"):
        raise ValueError(f"prediction must be 'eps', 'v' or None, got {prediction!r}")
    config = config_metadata(metadata)
    unet_sd = strip_prefix(sd, UNET_PREFIX)
    if not unet_sd:
        raise FamilyError(_not_a_checkpoint(sd))
    if SVD_UNET_MARKER in sd:
        raise FamilyError("this is a Stable Video Diffusion (image-to-video) checkpoint: its UNet has temporal layers "
                          "(time_stack) and no text encoder; load it with ImageOnlyCheckpointLoader")
    unet = _unet_config(unet_sd, config)
    name = _family_name(sd, unet, config)
    vae_sd = strip_prefix(sd, VAE_PREFIX)
    if not vae_sd:
        raise FamilyError(
            f"{TITLES[name]} checkpoint without a VAE: found its UNet and text encoder(s) but no "
            f"{VAE_PREFIX}* keys; load a VAE file separately"
        )
    vae = _vae_config(vae_sd, config)
    _check_latents(unet, vae)
    clip_heads = config.get("clip", {}).get("num_heads")
    return ModelFamily(
        name=name,
        inpaint=unet.in_channels > vae.embed_dim,
        prediction=prediction or _prediction(sd, name, unet, config),
        unet=unet,
        vae=vae,
        latent_channels=vae.embed_dim,
        scaling_factor=SCALING_FACTORS[name],
        text_family=name,
        clip_heads=None if clip_heads is None else int(clip_heads),
        unclip=name == "sd2" and unet.adm_in_channels is not None,
        continuous=_edm_vpred_range(sd),
        zsnr="ztsnr" in sd,
    )


def _edm_vpred_range(sd: Mapping[str, Tensor]) -> tuple[float, float] | None:
    """(sigma_min, sigma_max) of a CosXL-style checkpoint's `edm_vpred.*` keys, or None without them."""
    if "edm_vpred.sigma_max" not in sd and "edm_vpred.sigma_min" not in sd:
        return None
    try:
        low, high = (float(sd[f"edm_vpred.{end}"].float().reshape(-1)[0]) for end in ("sigma_min", "sigma_max"))
    except (KeyError, IndexError, RuntimeError, NotImplementedError) as e:
        raise FamilyError(f"the checkpoint's edm_vpred.sigma_min/sigma_max keys are unreadable: {e}") from None
    if not (math.isfinite(low) and math.isfinite(high) and 0 < low < high):
        raise FamilyError(f"the checkpoint's edm_vpred sigmas must satisfy 0 < sigma_min < sigma_max, got "
                          f"sigma_min={low}, sigma_max={high}")
    return low, high


def _not_a_checkpoint(sd: Mapping[str, Tensor]) -> str:
    counts = key_prefixes(sd)
    shown = dict(sorted(counts.items(), key=lambda kv: -kv[1])[:8])
    hint = ""
    if {"encoder", "decoder"} <= counts.keys():
        hint = " (this looks like a standalone VAE: load it as a VAE)"
    elif "down_blocks" in counts or "up_blocks" in counts:
        hint = " (this looks like a diffusers-format UNet, not a single-file checkpoint)"
    return (
        f"not a Stable Diffusion checkpoint: found {len(sd)} keys with prefixes {shown}; "
        f"expected {UNET_PREFIX}*{hint}"
    )


def _unet_config(unet_sd: dict[str, Tensor], config: dict) -> UNetConfig:
    meta = config.get("unet", {})
    heads = {k: int(meta[k]) for k in ("num_heads", "num_head_channels") if k in meta}
    groups = meta.get("norm_groups")
    try:
        return UNetConfig.from_state_dict(unet_sd, norm_groups=groups, **heads)
    except ValueError as e:
        raise FamilyError(f"{UNET_PREFIX}* keys do not make a UNet the loader knows: {e}") from None


def _vae_config(vae_sd: dict[str, Tensor], config: dict) -> VAEConfig:
    try:
        return VAEConfig.from_state_dict(vae_sd, norm_groups=config.get("vae", {}).get("norm_groups"))
    except ValueError as e:
        raise FamilyError(f"{VAE_PREFIX}* keys do not make a KL VAE: {e}") from None


def _has_encoder(sd: Mapping[str, Tensor], prefixes: tuple[str, ...]) -> bool:
    return any(key.startswith(prefixes) for key in sd)


def _guess_from_unet(unet: UNetConfig, config: dict) -> str:
    """The family a UNet alone suggests: the metadata's word, else the real models' numbers."""
    if config.get("family") in FAMILY_NAMES:
        return config["family"]
    if unet.adm_in_channels is None:
        return "sd2" if unet.use_linear_in_transformer else "sd1"
    return "sdxl_refiner" if unet.adm_in_channels == 2560 else "sdxl"


def _has_text_encoders(sd: Mapping[str, Tensor], name: str) -> bool:
    return all(_has_encoder(sd, spec.prefixes) for spec in TEXT_FAMILIES[name])


def _family_name(sd: Mapping[str, Tensor], unet: UNetConfig, config: dict) -> str:
    """An ADM input makes SDXL base or refiner (or SD2.1 unCLIP), none SD1 or SD2; the text encoders present
    pick one."""
    candidates = ("sdxl", "sdxl_refiner", "sd2") if unet.adm_in_channels is not None else ("sd1", "sd2")
    complete = [name for name in candidates if _has_text_encoders(sd, name)]
    guess = _guess_from_unet(unet, config)
    if complete:
        name = guess if guess in complete else complete[0]
        _check_context(sd, name, unet)
        return name
    name = guess if guess in candidates else candidates[0]
    missing = [spec for spec in TEXT_FAMILIES[name] if not _has_encoder(sd, spec.prefixes)]
    wanted = " and ".join(f"clip_{spec.name} under {' or '.join(spec.prefixes)}" for spec in missing)
    others = [other for other in FAMILY_NAMES if other not in candidates and _has_text_encoders(sd, other)]
    mismatch = f" (its text encoders are those of {TITLES[others[0]]})" if others else ""
    raise FamilyError(f"{TITLES[name]} checkpoint without its text encoder: found the UNet but not {wanted}{mismatch}")


def _text_width(sd: Mapping[str, Tensor], prefixes: tuple[str, ...]) -> int | None:
    for prefix in prefixes:
        for key in ("token_embedding.weight", "text_model.embeddings.token_embedding.weight",
                    "embeddings.token_embedding.weight"):
            if prefix + key in sd:
                return int(sd[prefix + key].shape[1])
    return None


def _check_context(sd: Mapping[str, Tensor], name: str, unet: UNetConfig) -> None:
    """The UNet attends to the text encoders' hidden states: their widths must add up to its context."""
    widths = [_text_width(sd, spec.prefixes) for spec in TEXT_FAMILIES[name]]
    if None in widths:
        return  # a layout without a token table: the text encoder loader will say what is missing
    if sum(widths) != unet.context_dim:
        raise FamilyError(
            f"{TITLES[name]} checkpoint is inconsistent: the UNet's cross-attention takes {unet.context_dim} "
            f"channels but the text encoder hidden widths {widths} add up to {sum(widths)}"
        )


def _check_latents(unet: UNetConfig, vae: VAEConfig) -> None:
    if unet.out_channels != vae.embed_dim or unet.in_channels not in (vae.embed_dim, 2 * vae.embed_dim + 1):
        raise FamilyError(
            f"checkpoint is inconsistent: the VAE makes {vae.embed_dim}-channel latents but the UNet takes "
            f"{unet.in_channels} and predicts {unet.out_channels} channels"
        )


def _prediction(sd: Mapping[str, Tensor], name: str, unet: UNetConfig, config: dict) -> str:
    """eps or v: our metadata, else the `v_pred` marker key, else for SD2 ComfyUI's weight statistic."""
    if config.get("prediction") in ("eps", "v"):
        return config["prediction"]
    if "v_pred" in sd:
        return "v"
    probe = sd.get(SD2_V_PROBE)
    if name == "sd2" and unet.in_channels == 4 and probe is not None and not probe.is_meta:
        std = float(probe.float().std())
        log.debug("SD2 v-prediction probe: std %.4f (threshold %.2f)", std, SD2_V_STD_THRESHOLD)
        return "v" if std > SD2_V_STD_THRESHOLD else "eps"
    return "eps"
