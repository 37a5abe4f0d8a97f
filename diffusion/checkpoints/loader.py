"""Building the UNet, VAE and text encoders of a single-file checkpoint without a second copy of the weights.

Each module is constructed on the meta device (no memory) and then filled with `load_state_dict(...,
assign=True)`, so its parameters *are* the tensors read from the file: lazy views into the memory map when
the stored dtype is the wanted one, otherwise one freshly cast tensor at a time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..models.text_encoders import FAMILIES as TEXT_FAMILIES
from ..models.text_encoders import TextEncoders
from ..models.unclip import NoiseAugmentor
from ..models.unet import UNetModel
from ..models.vae import AutoencoderKL, VAEConfig
from .cast_cache import CastCache
from .clip_keys import KeyLayoutError
from .families import UNET_PREFIX, VAE_PREFIX, ModelFamily, config_metadata, detect_family
from .files import CheckpointError, key_prefixes, read_metadata, read_state_dict, strip_prefix

log = logging.getLogger(__name__)

Tensor = torch.Tensor
VAE_MODULES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


@dataclass
class LoadedCheckpoint:
    family: ModelFamily
    unet: UNetModel
    vae: AutoencoderKL
    text: TextEncoders
    metadata: dict[str, str]
    noise_augmentor: NoiseAugmentor | None = None  # SD2.1 unCLIP checkpoints' image-embedding noiser


HALF_DTYPES = (torch.float16, torch.bfloat16)
CAST_CHUNK = 1 << 18  # elements of the fp32 scratch a 16-bit → 16-bit cast goes through (1 MiB: stays in L2)


def _cast(t: Tensor, dtype: torch.dtype | None, device: torch.device) -> Tensor:
    """Only floating tensors change dtype; a tensor already right is returned as is (still a file view)."""
    if dtype is None or not t.dtype.is_floating_point:
        return t.to(device=device)
    if device.type == "cpu" and t.dtype != dtype and t.dtype in HALF_DTYPES and dtype in HALF_DTYPES:
        return _cast_half(t, dtype)
    return t.to(device=device, dtype=dtype)


def _cast_half(t: Tensor, dtype: torch.dtype) -> Tensor:
    """fp16 ↔ bf16 on the CPU through an fp32 scratch, chunk by chunk: torch converts between the two 16-bit
    types element by element, about 4x slower than the two vectorised conversions to and from fp32 (measured on
    this project's AVX-512 CPU: 3.3 s vs 0.9 s per billion values; the cast of an fp16 SD1.5 file to bf16 was
    most of its load time). Exact: every fp16 and bf16 value is an fp32 value, so rounding happens once."""
    out = torch.empty(t.shape, dtype=dtype)
    src, dst = t.reshape(-1), out.view(-1)
    scratch = torch.empty(min(CAST_CHUNK, src.numel()), dtype=torch.float32)
    for start in range(0, src.numel(), CAST_CHUNK):
        part = scratch[:min(CAST_CHUNK, src.numel() - start)]
        part.copy_(src[start:start + part.numel()])
        dst[start:start + part.numel()].copy_(part)
    return out


def _cast_cached(cache: CastCache | None, part: str, key: str, t: Tensor, dtype: torch.dtype | None,
                 device: torch.device) -> Tensor:
    """`_cast`, through `cache` for the tensors it changes on the CPU: a stored cast when there is one, else cast
    and kept for the cache's `save`."""
    if cache is None or device.type != "cpu" or dtype is None or not t.dtype.is_floating_point or t.dtype == dtype:
        return _cast(t, dtype, device)
    hit = cache.get(part, key, t, dtype)
    if hit is not None:
        return hit
    out = _cast(t, dtype, device)
    cache.put(part, key, out)
    return out


def _stored_dtype(sd: Mapping[str, Tensor]) -> torch.dtype:
    """The floating dtype holding most of the values (files sometimes keep a few tensors in fp32)."""
    totals: dict[torch.dtype, int] = {}
    for t in sd.values():
        if t.dtype.is_floating_point:
            totals[t.dtype] = totals.get(t.dtype, 0) + t.numel()
    return max(totals, key=totals.__getitem__) if totals else torch.float32


def vae_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16 VAEs overflow in the decoder's large activations: fp16 becomes fp32; bf16 and fp32 stay."""
    return torch.float32 if dtype == torch.float16 else dtype


def fill_module(
    module: nn.Module, sd: Mapping[str, Tensor], what: str, dtype: torch.dtype | None, device: torch.device,
    cache: CastCache | None = None,
) -> nn.Module:
    """Load `sd` into a meta-built `module` by assignment, casting tensor by tensor (through `cache`, when given),
    every key required."""
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - sd.keys()), sorted(sd.keys() - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{what} weights do not match the detected architecture: {len(missing)} missing "
            f"{_sample(missing)}, {len(unexpected)} unexpected {_sample(unexpected)}"
        )
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    wrong = [
        f"{k}: file {list(v.shape)}, model {list(shapes[k])}"
        for k, v in sd.items()
        if tuple(v.shape) != shapes[k] and (*v.shape, 1, 1) != shapes[k]  # linear-stored 1x1 convs load
    ]
    if wrong:
        raise CheckpointError(f"{what} weights do not fit the detected architecture: {_sample(wrong)}")
    cast = {key: _cast_cached(cache, what, key, value, dtype, device) for key, value in sd.items()}
    try:
        module.load_state_dict(cast, strict=True, assign=True)
    except RuntimeError as e:
        details = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise CheckpointError(f"{what} weights do not fit the detected architecture: {details}") from None
    return module.eval().requires_grad_(False)


def _sample(keys: list[str]) -> str:
    return str(keys[:6]) + (" …" if len(keys) > 6 else "")


def _text_keys(sd: Mapping[str, Tensor], family: str) -> dict[str, Tensor]:
    prefixes = tuple(p for spec in TEXT_FAMILIES[family] for p in spec.prefixes)
    return {k: v for k, v in sd.items() if k.startswith(prefixes)}


def build_modules(
    sd: Mapping[str, Tensor],
    family: ModelFamily,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    text_dtype: torch.dtype | None = None,
    autoencoder_dtype: torch.dtype | None = None,
    cache: CastCache | None = None,
) -> tuple[UNetModel, AutoencoderKL, TextEncoders]:
    """The three modules of a checkpoint state dict whose family is known. `text_dtype` and `autoencoder_dtype`
    (None: follow the UNet's, see load_checkpoint) set the text encoders' and the VAE's dtypes apart; `cache` holds
    (and takes) the tensors cast to those dtypes."""
    device = torch.device(device)
    unet_sd = strip_prefix(sd, UNET_PREFIX)
    dtype = dtype or _stored_dtype(unet_sd)
    try:
        with torch.device("meta"):
            unet, vae = UNetModel(family.unet), AutoencoderKL(family.vae)
    except ValueError as e:  # e.g. GroupNorm groups that do not divide a non-standard width
        raise CheckpointError(f"the {family.title} modules cannot be built from the detected shapes: {e}") from None
    fill_module(unet, unet_sd, "UNet", dtype, device, cache)
    fill_module(vae, strip_prefix(sd, VAE_PREFIX), "VAE", autoencoder_dtype or vae_dtype(dtype), device, cache)
    text_sd = {k: _cast_cached(cache, "text", k, v, text_dtype or dtype, device)
               for k, v in _text_keys(sd, family.text_family).items()}
    try:
        text = TextEncoders.from_state_dict(text_sd, family.text_family, num_heads=family.clip_heads)
    except (KeyLayoutError, KeyError, ValueError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise CheckpointError(f"text encoder of this {family.title} checkpoint cannot be built: {message}") from None
    return unet, vae, text


def load_checkpoint(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    prediction: str | None = None,
    text_dtype: torch.dtype | None = None,
    autoencoder_dtype: torch.dtype | None = None,
    cast_cache: str | os.PathLike | None = None,
    cast_cache_limit: int | None = None,
) -> LoadedCheckpoint:
    """UNet, VAE and text encoders of a single-file checkpoint (.safetensors, or a legacy pickle loaded
    without running code). dtype None keeps the UNet's stored dtype; text encoders follow the UNet, the
    VAE too except that fp16 becomes fp32, unless `text_dtype` or `autoencoder_dtype` say otherwise (--bf16-unet,
    --fp32-vae). `prediction` forces "eps" or "v". `cast_cache` (a folder: DATA_DIR/cache/weights) keeps the weights
    this load casts on disk, so that the next load of the same file maps them instead of casting (cast_cache.py),
    the folder kept under `cast_cache_limit` bytes (None: cast_cache.LIMIT)."""
    sd = read_state_dict(path)
    metadata = read_metadata(path)
    cache = None if cast_cache is None else CastCache(cast_cache, path, cast_cache_limit)
    try:
        family = detect_family(sd, metadata, prediction=prediction)
        unet, vae, text = build_modules(sd, family, dtype=dtype, device=device, text_dtype=text_dtype,
                                        autoencoder_dtype=autoencoder_dtype, cache=cache)
    except CheckpointError as e:
        raise type(e)(f"{path}: {e}") from None
    if cache is not None:
        cache.save()
    augmentor = None
    if family.unclip:
        try:
            augmentor = NoiseAugmentor.from_state_dict(sd, family.unet.adm_in_channels // 2)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
    log.info("loaded %s as %s", path, family.title)
    return LoadedCheckpoint(family, unet, vae, text, metadata, augmentor)


def load_vae(
    path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> AutoencoderKL:
    """A standalone VAE file, its keys bare (`encoder.*`, `decoder.*`, ...) or under `first_stage_model.`;
    other entries (EMA or loss weights some files keep) are ignored. dtype None: stored dtype, fp16 → fp32."""
    sd = read_state_dict(path)
    prefixed = strip_prefix(sd, VAE_PREFIX)
    vae_sd = {k: v for k, v in (prefixed or sd).items() if k.startswith(VAE_MODULES)}
    if "encoder.conv_in.weight" not in vae_sd:
        shown = dict(sorted(key_prefixes(sd).items(), key=lambda kv: -kv[1])[:8])
        raise CheckpointError(
            f"{path}: not a VAE: found {len(sd)} keys with prefixes {shown}; expected encoder.*/decoder.* "
            f"(optionally under {VAE_PREFIX})"
        )
    groups = config_metadata(read_metadata(path)).get("vae", {}).get("norm_groups")
    try:
        config = VAEConfig.from_state_dict(vae_sd, norm_groups=groups)
    except ValueError as e:
        raise CheckpointError(f"{path}: not a KL VAE the loader knows: {e}") from None
    try:
        with torch.device("meta"):
            vae = AutoencoderKL(config)
    except ValueError as e:
        raise CheckpointError(f"{path}: the VAE cannot be built from its shapes: {e}") from None
    return fill_module(vae, vae_sd, "VAE", vae_dtype(dtype or _stored_dtype(vae_sd)), torch.device(device))
