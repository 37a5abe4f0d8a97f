"""Fast latent -> RGB previews for progress display.

Instead of hard-coded per-family factors, the projection is fitted to the model's own VAE: decode a few
random smooth latents, average-pool the images down to latent resolution, and solve least squares for
rgb = latent @ W + b. That works for any latent space, including the project's own small models.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor


@dataclass(frozen=True)
class LatentRGBProjection:
    weight: Tensor  # [C, 3]
    bias: Tensor  # [3]

    def __call__(self, latent: Tensor) -> Tensor:
        """[C, h, w] latent -> [h, w, 3] colours (unclamped)."""
        return torch.einsum("chw,cr->hwr", latent.float(), self.weight.to(latent.device)) + self.bias.to(latent.device)


def _as_bchw(image: Tensor) -> Tensor:
    if image.ndim == 4 and image.shape[-1] in (3, 4) and image.shape[1] not in (3, 4):
        return image[..., :3].permute(0, 3, 1, 2)
    if image.ndim == 4 and image.shape[1] >= 3:
        return image[:, :3]
    raise ValueError(f"decode must return [B, H, W, 3] or [B, 3, H, W] images, got {tuple(image.shape)}")


@torch.no_grad()
def fit_latent_rgb_projection(
    decode: Callable[[Tensor], Tensor],
    latent_channels: int,
    samples: int = 4,
    size: int = 16,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LatentRGBProjection:
    """Fit a linear latent -> RGB map to `decode` (latent [B, C, h, w] -> image in 0..1, BHWC or BCHW).

    The random latents are standard-normal noise at 1/4 resolution upsampled bilinearly: smooth enough to
    decode to colour fields rather than texture, varied enough to pin down every channel.
    """
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(samples, latent_channels, max(size // 4, 1), max(size // 4, 1), generator=generator)
    latents = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    images = _as_bchw(decode(latents.to(device, dtype)).float().cpu())
    pooled = F.adaptive_avg_pool2d(images, (size, size))
    inputs = latents.permute(0, 2, 3, 1).reshape(-1, latent_channels)
    inputs = torch.cat([inputs, torch.ones(inputs.shape[0], 1)], dim=1).double()
    targets = pooled.permute(0, 2, 3, 1).reshape(-1, 3).double()
    solution = torch.linalg.lstsq(inputs, targets).solution.float()
    return LatentRGBProjection(weight=solution[:-1].contiguous(), bias=solution[-1].contiguous())


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
