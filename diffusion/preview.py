"""Fast latent -> RGB previews for progress display.

Instead of hard-coded per-family factors, the projection is fitted to the model's own VAE: encode a few
synthetic images (blocks of flat colour), average-pool them down to latent resolution, and solve least squares
for rgb = latent @ W + b. That works for any latent space, including the project's own small models.
Fitting on encoded images rather than on decoded random latents matters: a sampler's denoised estimates look
like the encoder's latents, not like noise. On the shipped demo model the mean colour error of a preview falls
from 63/255 to 31-33/255 this way; a least-squares fit on the very latents being shown, the best any linear map
could do, is 23/255 off.
A TAESD-style tiny decoder (diffusion/models/taesd.py) does far better where one exists for the model (the demo
model's ships: 6/255 off the decoded image); its previews are kept to a share of the sampling time (PreviewBudget).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class LatentRGBProjection:
    weight: Tensor  # [C, 3]
    bias: Tensor  # [3]

    def __call__(self, latent: Tensor) -> Tensor:
        """[C, h, w] latent -> [h, w, 3] colours (unclamped)."""
        return torch.einsum("chw,cr->hwr", latent.float(), self.weight.to(latent.device)) + self.bias.to(latent.device)


@torch.no_grad()
def fit_latent_rgb_projection(
    encode: Callable[[Tensor], Tensor],
    samples: int = 6,
    size: int = 64,
    seed: int = 0,
) -> LatentRGBProjection:
    """Fit a linear latent -> RGB map to `encode` (images [B, H, W, 3] in 0..1 -> raw latents [B, C, h, w]).

    The images are random flat colours in blocks of three sizes (the whole image, quadrants, 4x4), `samples`
    of each: every colour, with edges between colours at several scales.
    """
    generator = torch.Generator().manual_seed(seed)
    images = torch.cat([F.interpolate(torch.rand(samples, 3, cells, cells, generator=generator), size=(size, size),
                                      mode="nearest") for cells in (1, 2, 4)])
    latents = encode(images.movedim(1, -1)).float().cpu()
    pooled = F.adaptive_avg_pool2d(images, latents.shape[-2:])
    channels = latents.shape[1]
    inputs = latents.permute(0, 2, 3, 1).reshape(-1, channels)
    inputs = torch.cat([inputs, torch.ones(inputs.shape[0], 1)], dim=1).double()
    targets = pooled.permute(0, 2, 3, 1).reshape(-1, 3).double()
    solution = torch.linalg.lstsq(inputs, targets).solution.float()
    return LatentRGBProjection(weight=solution[:-1].contiguous(), bias=solution[-1].contiguous())


# The fit encodes 18 small images through the VAE encoder: about 2-10 s for a full-size VAE on a small CPU, paid
# by the first preview after every start. Its result depends only on the encoder's weights and the fit's
# settings, so it is kept on disk under a digest of both (PreviewCache) and read back in microseconds.
FIT_SETTINGS = {"samples": 6, "size": 64, "seed": 0, "version": 1}
ENCODER_PREFIXES = ("encoder.", "quant_conv.")


def weights_digest(module: torch.nn.Module, prefixes: tuple[str, ...] = ENCODER_PREFIXES) -> str:
    """A content digest (BLAKE2b) of the tensors of `module` whose names start with one of `prefixes`: names,
    dtypes, shapes and bytes. About 0.1 s for an SD VAE encoder's 34M values."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        if not name.startswith(prefixes):
            continue
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().data if flat.numel() else b"")
    return digest.hexdigest()


@dataclass(frozen=True)
class PreviewCache:
    """Where fitted latent -> RGB maps are kept (a folder of small JSON files, one per VAE encoder and fit
    settings) and the VAE whose encoder they are fitted to."""

    folder: Path
    vae: torch.nn.Module

    def projection(self, encode: Callable[[Tensor], Tensor]) -> LatentRGBProjection:
        """The map of `encode` (the VAE's encoder), read from the folder when fitted before, else fitted and
        written there (atomically; a folder that cannot be written costs only the cache)."""
        key = hashlib.blake2b(json.dumps([weights_digest(self.vae), FIT_SETTINGS]).encode(), digest_size=16)
        path = self.folder / f"latent_rgb_{key.hexdigest()}.json"
        try:
            stored = json.loads(path.read_text())
            return LatentRGBProjection(torch.tensor(stored["weight"]), torch.tensor(stored["bias"]))
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("preview map cache %s unreadable (%s); fitting again", path, exc)
        settings = {k: v for k, v in FIT_SETTINGS.items() if k != "version"}
        projection = fit_latent_rgb_projection(encode, **settings)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.folder, suffix=".tmp", delete=False) as f:
                json.dump({"weight": projection.weight.tolist(), "bias": projection.bias.tolist()}, f)
            os.replace(f.name, path)
        except OSError as exc:
            log.warning("preview map not cached in %s: %s", self.folder, exc)
        return projection


def latent_preview_image(latent: Tensor, projection: LatentRGBProjection, max_size: int = 512) -> Image.Image:
    """RGB image of the first latent of a batch ([B, C, h, w] or [C, h, w]), at latent resolution or shrunk
    to fit `max_size`."""
    if latent.ndim == 4:
        latent = latent[0]
    if latent.ndim != 3 or latent.shape[0] != projection.weight.shape[0]:
        raise ValueError(
            f"latent must be [C, h, w] with C = {projection.weight.shape[0]}, got {tuple(latent.shape)}"
        )
    rgb = (projection(latent.detach()).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    image = Image.fromarray(rgb)
    if max(image.size) > max_size:
        image.thumbnail((max_size, max_size), Image.Resampling.BILINEAR)
    return image


def encode_preview_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# ---- tiny decoders (TAESD-style, diffusion/models/taesd.py) ------------------------------------------------------
# The files people have for each family (ComfyUI's models/vae_approx names); a decoder named after the checkpoint
# (`<checkpoint stem>_taesd_decoder.*`, how the demo model's own decoder ships) is looked for first.
TINY_DECODER_FAMILIES = {"sd1": "taesd_decoder", "sd2": "taesd_decoder", "sdxl": "taesdxl_decoder"}
TINY_DECODER_EXTENSIONS = (".safetensors", ".pth")
# Larger latents are area-pooled to this side first: the decoder's cost grows with its output's pixels, and a
# 256 px preview stays a small share of a step (train/README.md has the measurements).
TINY_DECODER_MAX_LATENT = 32


def tiny_decoder_names(family: str, checkpoint: str | None = None) -> list[str]:
    """File names a tiny preview decoder for a checkpoint may have, best first: named after the checkpoint's
    stem, then its family's TAESD file."""
    stems = [f"{checkpoint}_taesd_decoder"] if checkpoint else []
    if family in TINY_DECODER_FAMILIES:
        stems.append(TINY_DECODER_FAMILIES[family])
    return [stem + ext for stem in stems for ext in TINY_DECODER_EXTENSIONS]


@torch.no_grad()
def tiny_decoder_rgb(latent: Tensor, decoder: torch.nn.Module, max_latent: int = TINY_DECODER_MAX_LATENT) -> Tensor:
    """[C, h, w] scaled latent -> [H, W, 3] colours in 0..1 through a tiny decoder, the latent area-pooled first
    when its longer side exceeds `max_latent` (the preview then comes out at that side x8)."""
    x = latent[None].float()
    longest = max(x.shape[-2:])
    if longest > max_latent:
        size = (max(1, round(x.shape[-2] * max_latent / longest)), max(1, round(x.shape[-1] * max_latent / longest)))
        x = F.adaptive_avg_pool2d(x, size)
    param = next(decoder.parameters())
    rgb = decoder(x.to(param.device, param.dtype, memory_format=torch.channels_last))[0].float().clamp(0, 1)
    return rgb.permute(1, 2, 0).cpu()


def tiny_decoder_preview_image(latent: Tensor, decoder: torch.nn.Module, max_size: int = 512) -> Image.Image:
    """RGB image of the first latent of a batch ([B, C, h, w] or [C, h, w], scaled as the UNet sees it) made by a
    tiny decoder, shrunk to fit `max_size`."""
    if latent.ndim == 4:
        latent = latent[0]
    channels = decoder[1].in_channels if isinstance(decoder, torch.nn.Sequential) else None
    if latent.ndim != 3 or (channels is not None and latent.shape[0] != channels):
        raise ValueError(f"latent must be [C, h, w] with C = {channels}, got {tuple(latent.shape)}")
    rgb = (tiny_decoder_rgb(latent.detach(), decoder) * 255).round().to(torch.uint8).numpy()
    image = Image.fromarray(rgb)
    if max(image.size) > max_size:
        image.thumbnail((max_size, max_size), Image.Resampling.BILINEAR)
    return image


class PreviewBudget:
    """Keeps a sampler's previews to `share` of its time: a preview is made while the time spent making them stays
    within `share` of the time since the run's first preview (so a slow previewer skips frames instead of slowing
    the run); the first preview of a run (warm-up) is free, a pause longer than `idle` seconds starts a new run.
    `share` defaults to LATENTLOOM_PREVIEW_SHARE (0.1; 1 or more: every frame). `clock` is injectable for tests."""

    def __init__(self, share: float | None = None, idle: float = 5.0, clock: Callable[[], float] | None = None):
        import os
        import time

        self.share = float(os.environ.get("LATENTLOOM_PREVIEW_SHARE", "0.1")) if share is None else share
        self.idle, self.clock = idle, clock or time.perf_counter
        self.start: float | None = None
        self.last = self.spent = 0.0
        self.warm = False

    def allows(self) -> bool:
        now = self.clock()
        if self.start is None or now - self.last > self.idle:
            self.start, self.spent, self.warm = now, 0.0, False
        self.last = now
        return self.share >= 1 or self.spent <= self.share * (now - self.start)

    def spend(self, seconds: float) -> None:
        if self.warm:
            self.spent += seconds
        self.warm = True
        self.last = self.clock()
