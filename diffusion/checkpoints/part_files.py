"""Loading the parts of a model kept in files of their own: a diffusion model (UNet) alone, text encoders alone.

UNet files come in three layouts: under `model.diffusion_model.` (what ModelSave writes, and any full
checkpoint), bare original names (`input_blocks.…`), or diffusers' UNet2DConditionModel names
(`down_blocks.…`), which are renamed to ours from the block structure the keys show (levels, ResBlocks per
level, which levels attend) before the shapes are read. Which family a UNet belongs to is read from its shapes
as for checkpoints (an ADM input makes SDXL; 2560 ADM channels the refiner; linear transformer projections
SD2), or from the file's `latentloom.config`.

Text encoder files hold one CLIP text model, in the HF layout (bare `text_model.*`, as CLIPSave writes) or
the OpenCLIP one, possibly under a checkpoint prefix. What kind of encoder a file holds is read from it: no
text projection is OpenAI's CLIP-L (SD1, SDXL's first); a projection 1280 wide or 32 layers deep is OpenCLIP
bigG (SDXL's second, the refiner's only), any other projected encoder OpenCLIP ViT-H (SD2).
"""

from __future__ import annotations

import logging
import os
import types
from collections.abc import Mapping, Sequence

import torch

from ..models.text_encoders import FAMILIES as TEXT_FAMILIES
from ..models.text_encoders import TextEncoders
from ..models.unet import UNetConfig, UNetModel
from ..models.vae import VAEConfig
from .clip_keys import PROJECTION, TEXT, KeyLayoutError, detect_layout, text_encoder_state_dict, to_hf_checkpoint
from .families import SCALING_FACTORS, SD2_V_PROBE, UNET_PREFIX, ModelFamily, config_metadata
from .files import CheckpointError, key_prefixes, read_metadata, read_state_dict, strip_prefix
from .loader import _stored_dtype, fill_module
from .unet_keys import _RESNET_NAMES, _module_prefixes

log = logging.getLogger(__name__)

Tensor = torch.Tensor
SD2_V_STD_THRESHOLD = 0.09
TEXT_PREFIXES = ("", "cond_stage_model.transformer.", "cond_stage_model.model.",
                 "conditioner.embedders.0.transformer.", "conditioner.embedders.0.model.",
                 "conditioner.embedders.1.model.", "text_encoders.clip_l.transformer.",
                 "text_encoders.clip_g.transformer.", "text_encoders.clip_h.transformer.")


def _shown_prefixes(sd: Mapping[str, Tensor]) -> dict[str, int]:
    return dict(sorted(key_prefixes(sd).items(), key=lambda kv: -kv[1])[:8])


def _count(keys: Sequence[str], prefix: str) -> int:
    """How many distinct integer indices follow `prefix` in `keys`."""
    return len({k[len(prefix):].split(".")[0] for k in keys if k.startswith(prefix)})


def diffusers_unet_to_original(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers UNet2DConditionModel state dict renamed to the original layout, its block structure read from
    the keys (see unet_keys for the forward table, used here in reverse)."""
    keys = list(sd)
    levels = _count(keys, "down_blocks.")
    if levels == 0:
        raise CheckpointError("diffusers UNet without down_blocks")
    depth = tuple(1 if any(k.startswith(f"down_blocks.{i}.attentions.") for k in keys) else 0 for i in range(levels))
    structure = types.SimpleNamespace(channel_mult=(1,) * levels, num_res_blocks=_count(keys, "down_blocks.0.resnets."),
                                      transformer_depth=depth)
    table = {theirs: ours for ours, theirs in _module_prefixes(structure, "add_embedding").items()}
    table.update({"class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2"})
    resnet_names = {theirs: ours for ours, theirs in _RESNET_NAMES.items()}
    out, unknown = {}, []
    for key, value in sd.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            theirs = ".".join(parts[:cut])
            if theirs in table:
                rest = ".".join(parts[cut:])
                if ".resnets." in theirs:
                    module, _, param = rest.rpartition(".")
                    rest = f"{resnet_names.get(module, module)}.{param}"
                out[f"{table[theirs]}.{rest}"] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{len(unknown)} diffusers UNet keys have no original name, e.g. {unknown[:4]}")
    return out


def unet_state_dict(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """(the UNet's weights in the original layout, the layout the file used)."""
    prefixed = strip_prefix(sd, UNET_PREFIX)
    if prefixed:
        return prefixed, "checkpoint"
    if "input_blocks.0.0.weight" in sd:
        return dict(sd), "original"
    if "conv_in.weight" in sd and any(k.startswith("down_blocks.") for k in sd):
        return diffusers_unet_to_original(sd), "diffusers"
    raise CheckpointError(
        f"not a diffusion model (UNet): found {len(sd)} keys with prefixes {_shown_prefixes(sd)}; expected "
        f"{UNET_PREFIX}*, input_blocks.* or diffusers' down_blocks.*"
    )


def _family_of_unet(unet: UNetConfig, config: dict) -> str:
    if config.get("family") in SCALING_FACTORS:
        return config["family"]
    if unet.adm_in_channels is None:
        return "sd2" if unet.use_linear_in_transformer else "sd1"
    return "sdxl_refiner" if unet.adm_in_channels == 2560 else "sdxl"


def _unet_prediction(sd: Mapping[str, Tensor], unet_sd: Mapping[str, Tensor], name: str, config: dict) -> str:
    """eps or v, as for checkpoints: the metadata, a `v_pred` key, else for SD2 ComfyUI's weight statistic."""
    if config.get("prediction") in ("eps", "v"):
        return config["prediction"]
    if "v_pred" in sd:
        return "v"
    probe = unet_sd.get(SD2_V_PROBE.removeprefix(UNET_PREFIX))
    if name == "sd2" and probe is not None:
        return "v" if float(probe.float().std()) > SD2_V_STD_THRESHOLD else "eps"
    return "eps"


def load_unet_file(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    round_to: torch.dtype | None = None,
) -> tuple[UNetModel, ModelFamily]:
    """A diffusion-model-only file → (UNet, its family). The family carries the default SD VAE config: the file
    has no VAE, and any VAE of the family's latent space fits. `round_to` (an fp8 dtype) rounds every floating
    weight to that format's precision, kept in `dtype`: the weights an fp8-stored model computes with."""
    sd = read_state_dict(path)
    config = config_metadata(read_metadata(path))
    try:
        unet_sd, layout = unet_state_dict(sd)
        meta = config.get("unet", {})
        heads = {k: int(meta[k]) for k in ("num_heads", "num_head_channels") if k in meta}
        unet_config = UNetConfig.from_state_dict(unet_sd, norm_groups=meta.get("norm_groups"), **heads)
        name = _family_of_unet(unet_config, config)
        with torch.device("meta"):
            unet = UNetModel(unet_config)
        fill_module(unet, unet_sd, "UNet", dtype or _stored_dtype(unet_sd), torch.device(device))
    except (CheckpointError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    family = ModelFamily(
        name=name, inpaint=unet_config.in_channels > unet_config.out_channels,
        prediction=_unet_prediction(sd, unet_sd, name, config), unet=unet_config,
        vae=VAEConfig(z_channels=unet_config.out_channels, embed_dim=unet_config.out_channels),
        latent_channels=unet_config.out_channels, scaling_factor=SCALING_FACTORS[name], text_family=name,
    )
    if round_to is not None:
        with torch.no_grad():
            for param in unet.parameters():
                if param.dtype.is_floating_point:
                    param.copy_(param.to(round_to).to(param.dtype))
    log.info("loaded %s as a %s diffusion model (%s layout)", path, family.title, layout)
    return unet, family


def text_encoder_kind(ours: Mapping[str, Tensor]) -> str:
    """"l" (CLIP-L, no projection), "g" (bigG: 1280 wide or 32 layers) or "h" (another projected encoder)."""
    if PROJECTION not in ours:
        return "l"
    width = ours[TEXT + "embeddings.token_embedding.weight"].shape[1]
    layers = _count(list(ours), TEXT + "encoder.layers.")
    return "g" if width == 1280 or layers >= 32 else "h"


def read_text_encoder(path: str | os.PathLike) -> tuple[dict[str, Tensor], int | None, str | None]:
    """(one text encoder file's weights in our layout, its head count and its kind (l, h, g) from the
    `latentloom.config` metadata, or None: the kind of small test encoders cannot be told from their shapes)."""
    sd = read_state_dict(path)
    clip = config_metadata(read_metadata(path)).get("clip", {})
    heads, kind = clip.get("num_heads"), clip.get("kind")
    if kind not in (None, "l", "h", "g"):
        raise CheckpointError(f"{path}: metadata says the text encoder kind is {kind!r}; expected l, h or g")
    for prefix in TEXT_PREFIXES:
        if detect_layout(sd, prefix) is None:
            continue
        try:
            return text_encoder_state_dict(sd, prefix), None if heads is None else int(heads), kind
        except KeyLayoutError as e:
            raise CheckpointError(f"{path}: {e}") from None
    raise CheckpointError(
        f"{path}: not a CLIP text encoder: found {len(sd)} keys with prefixes {_shown_prefixes(sd)}; expected "
        f"text_model.* (HF) or token_embedding/transformer.resblocks.* (OpenCLIP)"
    )


FAMILY_OF_SINGLE = {"l": "sd1", "h": "sd2", "g": "sdxl_refiner"}


def load_text_encoders(paths: Sequence[str | os.PathLike], clip_type: str, *,
                       dtype: torch.dtype | None = None) -> TextEncoders:
    """Text encoder files → a family's `TextEncoders`. clip_type "stable_diffusion" takes one file (CLIP-L: SD1,
    ViT-H: SD2, bigG: the SDXL refiner); "sdxl" takes CLIP-L and a projected encoder, in either order."""
    read = [(p, *read_text_encoder(p)) for p in paths]
    kinds = [hint or text_encoder_kind(ours) for _, ours, _, hint in read]
    if clip_type == "stable_diffusion":
        if len(read) != 1:
            raise ValueError(f"type stable_diffusion takes one text encoder file, got {len(read)}")
        family = FAMILY_OF_SINGLE[kinds[0]]
        by_name = {TEXT_FAMILIES[family][0].name: read[0]}
    elif clip_type == "sdxl":
        if len(read) != 2 or sorted(k == "l" for k in kinds) != [False, True]:
            shown = ", ".join(f"{os.path.basename(p)}: {k}" for (p, *_), k in zip(read, kinds, strict=True))
            raise ValueError(f"type sdxl needs CLIP-L (no text projection) and CLIP-G (with one); got {shown}")
        family = "sdxl"
        by_name = {("l" if k == "l" else "g"): r for r, k in zip(read, kinds, strict=True)}
    else:
        raise ValueError(f"text encoder type {clip_type!r} is not supported here (Stable Diffusion family only)")
    heads = {h for _, _, h, _ in read if h is not None}
    sd: dict[str, Tensor] = {}
    for spec in TEXT_FAMILIES[family]:
        ours = by_name[spec.name][1]
        if dtype is not None:
            ours = {k: v.to(dtype) if v.dtype.is_floating_point else v for k, v in ours.items()}
        sd.update(to_hf_checkpoint(ours, spec.prefixes[0]))
    try:
        return TextEncoders.from_state_dict(sd, family, num_heads=heads.pop() if len(heads) == 1 else None)
    except (KeyLayoutError, KeyError, ValueError) as e:
        names = ", ".join(os.fspath(p) for p in paths)
        raise CheckpointError(f"{names}: the {family} text encoders cannot be built: {e}") from None
