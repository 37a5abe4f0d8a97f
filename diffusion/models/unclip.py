"""unCLIP: a CLIP image embedding as the UNet's ADM input (SD2.1 unCLIP), or as SDXL's pooled text embedding
("revision").

SD2.1 unCLIP checkpoints (Stability's stable-diffusion repository, after Ramesh et al. 2022) feed the UNet's
`label_emb` a vector [noised image embedding, embedding of the noise level] of 2·D channels (D = 1024 for the
ViT-H model, 768 for ViT-L). The embedding is noised like a diffusion sample: normalised with the data mean and
std (`noise_augmentor.data_mean` / `data_std` when the file has them, else 0 and 1), taken to noise level
t = round((T − 1) · noise_augmentation) of the augmentor's own schedule (`noise_augmentor.alphas_cumprod` from
the file, else the squared-cosine schedule of its config, T = 1000), un-normalised again; the level enters as a
D-wide sinusoidal embedding. Each unCLIPConditioning entry contributes one such vector per image, times its
strength; several are summed and the sum's embedding half noised once more at level 0, as ComfyUI does.
Without image conditioning (the negative prompt, usually) the ADM input is zeros.

SDXL revision uses the same augmentor (squared-cosine, D = the pooled width, 1280) and keeps the first D
channels: the noised, strength-scaled image embedding replaces the pooled text embedding in SDXL's ADM vector.

The noise is drawn from a fixed seed per entry, so a prompt samples the same picture every time.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .unet_blocks import timestep_embedding

Tensor = torch.Tensor

PREFIX = "noise_augmentor."
NOISE_SEED = 0
# What schedule buffers a real file carries beside alphas_cumprod (written by the random checkpoints too).
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod")


def squaredcos_alphas_cumprod(timesteps: int = 1000, max_beta: float = 0.999) -> Tensor:
    """ᾱ_t of the "squaredcos_cap_v2" schedule (Nichol & Dhariwal's cosine schedule, betas capped at 0.999)."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / timesteps) / alpha_bar(i / timesteps), max_beta) for i in range(timesteps)]
    return torch.cumprod(1 - torch.tensor(betas, dtype=torch.float64), 0).float()


def schedule_buffers(alphas_cumprod: Tensor) -> dict[str, Tensor]:
    """The schedule buffers an LDM noise augmentor stores, from ᾱ (for writing files in the real layout)."""
    acp = alphas_cumprod.double()
    prev = torch.cat([acp.new_ones(1), acp[:-1]])
    values = {"betas": 1 - acp / prev, "alphas_cumprod": acp, "alphas_cumprod_prev": prev,
              "sqrt_alphas_cumprod": acp.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - acp).sqrt(),
              "log_one_minus_alphas_cumprod": (1 - acp).log(), "sqrt_recip_alphas_cumprod": (1 / acp).sqrt(),
              "sqrt_recipm1_alphas_cumprod": (1 / acp - 1).sqrt()}
    return {k: v.float() for k, v in values.items()}


@dataclass(frozen=True)
class NoiseAugmentor:
    """Noises a CLIP image embedding [B, dim] to a level of its own schedule (see the module docstring)."""

    alphas_cumprod: Tensor  # [T]
    data_mean: Tensor  # [1, dim]
    data_std: Tensor  # [1, dim]

    @property
    def dim(self) -> int:
        return int(self.data_mean.shape[-1])

    @property
    def max_noise_level(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @classmethod
    def default(cls, dim: int, timesteps: int = 1000) -> NoiseAugmentor:
        return cls(squaredcos_alphas_cumprod(timesteps), torch.zeros(1, dim), torch.ones(1, dim))

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor], dim: int, prefix: str = PREFIX) -> NoiseAugmentor:
        """The augmentor of an unCLIP checkpoint: its stored schedule and data statistics where present."""
        default = cls.default(dim)
        acp = sd.get(prefix + "alphas_cumprod")
        mean, std = sd.get(prefix + "data_mean"), sd.get(prefix + "data_std")
        for name, value in (("data_mean", mean), ("data_std", std)):
            if value is not None and value.numel() != dim:
                raise ValueError(f"{prefix}{name} has {value.numel()} values; the UNet's ADM input needs {dim}")
        return cls(default.alphas_cumprod if acp is None else acp.float().reshape(-1).clone(),
                   default.data_mean if mean is None else mean.float().reshape(1, dim).clone(),
                   default.data_std if std is None else std.float().reshape(1, dim).clone())

    def level(self, noise_augmentation: float) -> int:
        return round((self.max_noise_level - 1) * float(noise_augmentation))

    def __call__(self, embeds: Tensor, level: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(noised embedding [B, dim], noise-level embedding [B, dim]); the noise comes from `generator`."""
        x = embeds.float().cpu()
        if x.shape[-1] != self.dim:
            raise ValueError(f"the image embedding is {x.shape[-1]} wide; this model's unCLIP input takes {self.dim} "
                             f"(use the CLIP vision model made for it)")
        acp = self.alphas_cumprod[level]
        noise = torch.randn(x.shape, generator=generator)
        z = (x - self.data_mean) / self.data_std
        z = acp.sqrt() * z + (1 - acp).sqrt() * noise
        z = z * self.data_std + self.data_mean
        return z, timestep_embedding(torch.full((x.shape[0],), float(level)), self.dim)


def _entries(unclip: Sequence[Mapping[str, Any]]) -> list[tuple[Tensor, float, float]]:
    """(image embedding [1, D], strength, noise augmentation) for every image of every unCLIP entry."""
    out = []
    for entry in unclip:
        embeds = entry["clip_vision_output"].image_embeds
        for row in embeds.reshape(-1, embeds.shape[-1]):
            out.append((row[None], float(entry["strength"]), float(entry["noise_augmentation"])))
    return out


def unclip_adm(unclip: Sequence[Mapping[str, Any]], augmentor: NoiseAugmentor, merge_augmentation: float = 0.0,
               seed: int = NOISE_SEED) -> Tensor:
    """The ADM input [1, 2·dim] of a conditioning entry's `unclip_conditioning` list (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    vectors = []
    for embeds, strength, augmentation in _entries(unclip):
        noised, level_emb = augmentor(embeds, augmentor.level(augmentation), generator)
        vectors.append(torch.cat([noised, level_emb], 1) * strength)
    if not vectors:
        return torch.zeros(1, 2 * augmentor.dim)
    if len(vectors) == 1:
        return vectors[0]
    total = torch.stack(vectors).sum(0)
    noised, level_emb = augmentor(total[:, :augmentor.dim], augmentor.level(merge_augmentation), generator)
    return torch.cat([noised, level_emb], 1)


@functools.lru_cache(maxsize=4)
def revision_augmentor(dim: int) -> NoiseAugmentor:
    """SDXL's augmentor for revision: squared-cosine over 1000 levels, no data statistics."""
    return NoiseAugmentor.default(dim)


def revision_pooled(unclip: Sequence[Mapping[str, Any]], pooled_width: int | None,
                    seed: int = NOISE_SEED) -> Tensor:
    """SDXL revision: what stands in for the pooled text embedding [1, pooled_width] (None: the text gave no
    pooled embedding; the image embedding's own width, which SDXL's ADM vector then checks)."""
    widths = {embeds.shape[-1] for embeds, _, _ in _entries(unclip)}
    if pooled_width is None and len(widths) == 1:
        pooled_width = widths.pop()
        widths = {pooled_width}
    if widths != {pooled_width}:
        raise ValueError(f"SDXL revision: the image embedding is {sorted(widths)} wide but SDXL's pooled text "
                         f"embedding is {pooled_width}; use the matching CLIP vision model (ViT-bigG, "
                         f"clip_vision_g, at real size)")
    return unclip_adm(unclip, revision_augmentor(pooled_width), seed=seed)[:, :pooled_width]
