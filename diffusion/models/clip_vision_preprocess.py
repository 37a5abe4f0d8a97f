"""ComfyUI's CLIP vision preprocessing, so an image encodes to the embedding ComfyUI's CLIPVisionEncode gives.

IMAGE [B, H, W, C] in 0..1 → pixel values [B, 3, S, S] for a tower of input size S (224, or 336):
- crop "center": the shorter side is resized to S (bicubic with antialiasing, the other side rounded to keep
  the aspect ratio), then the middle S×S is cut out; crop "none": the whole image is squeezed to S×S;
- an image already S×S is not resampled;
- values are clamped to 0..1 and rounded to 8-bit levels (as an image processor working on 8-bit pictures
  sees them), then normalised with CLIP's training mean and standard deviation per channel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(image: Tensor, size: int = 224, *, crop: bool = True,
                    mean: tuple[float, float, float] = CLIP_MEAN,
                    std: tuple[float, float, float] = CLIP_STD) -> Tensor:
    """[B, H, W, C] in 0..1 (extra channels such as alpha are dropped) → normalised [B, 3, size, size] fp32."""
    if image.ndim != 4 or image.shape[-1] < 3:
        raise ValueError(f"CLIP vision input must be an IMAGE [B, H, W, 3], got shape {list(image.shape)}")
    x = image[..., :3].movedim(-1, 1).float()
    height, width = x.shape[-2:]
    if (height, width) != (size, size):
        if crop:
            scale = size / min(height, width)
            target = (round(scale * height), round(scale * width))
        else:
            target = (size, size)
        x = F.interpolate(x, size=target, mode="bicubic", antialias=True, align_corners=False)
        top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
        x = x[:, :, top:top + size, left:left + size]
    x = (x * 255.0).clamp(0, 255).round() / 255.0
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s
