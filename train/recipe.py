"""The shapes model: its module sizes, how they are built for training, and how they become an SD1 file.

Sizes are picked so the fp16 file stays under 30 MB: the CLIP token table (49408 rows, the real tokenizer)
costs 49408 x width x 2 bytes, so the text width is 96 (9.5 MB); the UNet (~5.9 M parameters) and the KL
VAE (~2.2 M) make up the rest. Every GroupNorm keeps >= 4 channels per group: with one channel per group
the last norm turns into instance norm and erases absolute colour.

The text encoder is a real `CLIPTextModel`, left frozen at random weights but with its token embeddings
drawn at std 0.1 instead of 0.02: at 0.02 a random encoder barely tells "red" from "blue" in the same slot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import types
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import CLIPTextModel

from diffusion.checkpoints.clip_keys import from_transformers, to_hf_checkpoint
from diffusion.checkpoints.families import CONFIG_METADATA_KEY, SCALING_FACTORS, UNET_PREFIX, VAE_PREFIX
from diffusion.checkpoints.files import write_safetensors
from diffusion.models.text_encoders import TextEncoderConfig
from diffusion.models.unet import UNetConfig, UNetModel
from diffusion.models.unet_blocks import CrossAttention
from diffusion.models.vae import AutoencoderKL, VAEConfig
from diffusion.text.tokenizer import CLIPTokenizer

TEXT_PREFIX = "cond_stage_model.transformer."
SCALING_FACTOR = SCALING_FACTORS["sd1"]  # the loader applies SD1's factor; the VAE's latents are scaled to fit


@dataclass(frozen=True)
class ModelSpec:
    """The three module configs of a shapes model (and the tiny variant the tests use)."""

    unet: UNetConfig
    vae: VAEConfig
    text: TextEncoderConfig
    token_std: float = 0.1
    extra: dict = field(default_factory=dict)


def shapes_spec() -> ModelSpec:
    text = TextEncoderConfig(hidden_size=96, num_layers=4, intermediate_size=384, num_heads=4)
    unet = UNetConfig.sd1(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, transformer_depth=(1, 1, 1),
                          context_dim=text.hidden_size, num_heads=8, norm_groups=8)
    vae = VAEConfig(ch=16, ch_mult=(1, 2, 4, 4), num_res_blocks=1, norm_groups=4)
    return ModelSpec(unet, vae, text)


def tiny_spec() -> ModelSpec:
    """A spec small enough for tests (a few steps in well under a second)."""
    text = TextEncoderConfig(hidden_size=16, num_layers=1, intermediate_size=32, num_heads=2)
    unet = UNetConfig.sd1(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(0, 1),
                          context_dim=16, num_heads=2, norm_groups=4)
    vae = VAEConfig(ch=8, ch_mult=(1, 1, 2, 2), num_res_blocks=1, norm_groups=4)
    return ModelSpec(unet, vae, text)


SPECS = {"shapes": shapes_spec, "tiny": tiny_spec}

# train_model's VAE flags with their v1 values (the defaults, which write the shipped file's bytes): any of them that
# differs is written into the file's `latentloom.training` metadata. RECIPES: the defaults each --recipe changes.
V1_VALUES: dict[str, object] = {"vae_lr": 2e-3, "vae_kl": 1e-6, "vae_band": 0, "vae_edge": 0.0, "vae_small_boost": 0.0,
                                "vae_logvar_init": None, "vae_init": None, "vae_ch": None, "vae_mult": None,
                                "vae_blocks": None}
RECIPES: dict[str, dict[str, object]] = {
    "v1": {},
    # continues a v1 VAE (--vae-init, required) with the shape-edge losses; see train/README.md "Recipe v2"
    "v2": {"vae_steps": 1600, "vae_lr": 1e-3, "vae_band": 2, "vae_edge": 3.0, "vae_small_boost": 4.0,
           "sharpen_steps": 0},
}


def vae_spec(spec: ModelSpec, args: argparse.Namespace) -> ModelSpec:
    """`spec` with the VAE widths and depth `--vae-ch/--vae-mult/--vae-blocks` ask for (the SD1 layout keeps
    4 latent channels and /8, which the nodes assume; widths and depth are free: the loader reads them from
    the tensor shapes)."""
    changes = {}
    if args.vae_ch is not None:
        changes["ch"] = args.vae_ch
    if args.vae_mult is not None:
        mult = tuple(int(m) for m in str(args.vae_mult).split(","))
        if len(mult) != len(spec.vae.ch_mult):
            raise SystemExit(f"--vae-mult {args.vae_mult}: needs {len(spec.vae.ch_mult)} levels (the latents are /8)")
        changes["ch_mult"] = mult
    if args.vae_blocks is not None:
        changes["num_res_blocks"] = args.vae_blocks
    return replace(spec, vae=replace(spec.vae, **changes)) if changes else spec


def build_text_encoder(spec: ModelSpec, seed: int) -> CLIPTextModel:
    torch.manual_seed(seed)
    model = CLIPTextModel(spec.text.transformers_config(CLIPTokenizer.eos_id))
    with torch.no_grad():
        table = model.get_input_embeddings().weight
        table.copy_(torch.randn(table.shape, generator=torch.Generator().manual_seed(seed)) * spec.token_std)
    return model.eval().requires_grad_(False)


def build_vae(spec: ModelSpec, seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(spec.vae)


def build_unet(spec: ModelSpec, seed: int) -> UNetModel:
    torch.manual_seed(seed)
    unet = UNetModel(spec.unet)
    nn.init.zeros_(unet.out[-1].weight)  # start by predicting zero noise: a calmer first few hundred steps
    nn.init.zeros_(unet.out[-1].bias)
    return unet


def _eager_attention(self: CrossAttention, x: Tensor, context: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(d)) v written out: on CPUs the bf16 backward of the fused kernel is slower."""
    context = x if context is None else context
    b, n, _ = x.shape
    q, k, v = (t.view(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (self.to_q(x), self.to_k(context),
                                                                             self.to_v(context)))
    weights = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]), dim=-1)
    return self.to_out((weights @ v).transpose(1, 2).reshape(b, n, -1))


def use_eager_attention(unet: nn.Module) -> None:
    """Switch this module's attention layers (this instance only) to the written-out form for training."""
    for module in unet.modules():
        if isinstance(module, CrossAttention):
            module.forward = types.MethodType(_eager_attention, module)


@torch.no_grad()
def rescale_latents(vae: AutoencoderKL, factor: float) -> None:
    """Make the VAE's latents `factor` times larger without changing what it reconstructs: the mean rows of
    quant_conv are multiplied (log-variance shifted by 2 ln factor), post_quant_conv's input divided. This
    puts the latents at std 1/0.18215, the scale SD1's fixed factor expects."""
    half = vae.config.embed_dim
    vae.quant_conv.weight[:half] *= factor
    vae.quant_conv.bias[:half] *= factor
    vae.quant_conv.bias[half:] += 2.0 * math.log(factor)
    vae.post_quant_conv.weight *= 1.0 / factor


def config_metadata(spec: ModelSpec) -> dict[str, str]:
    """The `latentloom.config` metadata that tells the loader what shapes cannot (heads, norm groups)."""
    config = {"family": "sd1", "prediction": "eps",
              "unet": {"num_heads": spec.unet.num_heads, "norm_groups": spec.unet.norm_groups},
              "vae": {"norm_groups": spec.vae.norm_groups}, "clip": {"num_heads": spec.text.num_heads}}
    return {CONFIG_METADATA_KEY: json.dumps(config, sort_keys=True)}


def checkpoint_tensors(unet: nn.Module, vae: nn.Module, text: CLIPTextModel) -> dict[str, Tensor]:
    """The SD1 single-file key layout of the three modules."""
    tensors = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    tensors.update({VAE_PREFIX + k: v for k, v in vae.state_dict().items()})
    tensors.update(to_hf_checkpoint(from_transformers(text.state_dict()), TEXT_PREFIX, with_position_ids=True))
    return tensors


def write_checkpoint(path: str | os.PathLike, spec: ModelSpec, unet: nn.Module, vae: nn.Module,
                     text: CLIPTextModel, dtype: torch.dtype = torch.float16,
                     extra_metadata: dict[str, str] | None = None) -> None:
    """Write the model as one `.safetensors` in the SD1 layout (floats stored as `dtype`)."""
    tensors = checkpoint_tensors(unet, vae, text)
    keys = sorted(tensors)

    def stored(t: Tensor) -> torch.dtype:
        return dtype if t.dtype.is_floating_point else t.dtype

    shapes = {k: (stored(tensors[k]), tuple(tensors[k].shape)) for k in keys}
    metadata = {"format": "pt", **config_metadata(spec), **(extra_metadata or {})}
    write_safetensors(path, shapes, lambda k: tensors[k].detach().to(shapes[k][0]), metadata)


def denoising_loss(unet: nn.Module, latents: Tensor, context: Tensor, alphas_cumprod: Tensor,
                   gen: torch.Generator, min_snr: float = 5.0, pixel_weights: Tensor | None = None,
                   target: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None) -> Tensor:
    """eps-prediction loss at uniformly drawn timesteps, weighted by min(SNR, gamma)/SNR (Hang et al. 2023),
    which stops the nearly-clean steps from dominating a short training run. `pixel_weights` [B, 1, h, w]
    (optional) weight the latent positions of each sample, normalised to a mean of 1 per sample. `target(noisy, t,
    noise)` (optional) replaces the noise as what the prediction regresses onto (computed after the prediction)."""
    b = latents.shape[0]
    t = torch.randint(0, alphas_cumprod.shape[0], (b,), generator=gen)
    noise = torch.randn(latents.shape, generator=gen)
    abar = alphas_cumprod[t].float()[:, None, None, None]
    noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    pred = unet(noisy, t.float(), context).float()
    goal = noise if target is None else target(noisy, t, noise)
    snr = abar / (1 - abar)
    weight = (snr.clamp(max=min_snr) / snr).flatten()
    err = F.mse_loss(pred, goal, reduction="none")
    if pixel_weights is None:
        per_sample = err.mean(dim=(1, 2, 3))
    else:
        w = pixel_weights.float()
        per_sample = (w * err).mean(dim=(1, 2, 3)) / w.mean(dim=(1, 2, 3))
    return (weight * per_sample).mean()
