"""Fine-tuning from a handful of images: TrainLoraFromImages.

The node trains low-rank deltas on the attention projections (to_q, to_k, to_v, to_out.0 of every self- and
cross-attention layer) of the given MODEL's UNet with the model's own objective (eps or v prediction on its
noise schedule, min-SNR weighted), writes them as a kohya `.safetensors` LoRA under models/loras, and returns
them on a LORA socket (the file's tensors). The UNet's own weights are never changed: the deltas are added
by forward hooks that are removed when training ends, so the shared checkpoint stays as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion.handles import ClipModel, DiffusionModel, VAEModel
from diffusion.patches.lora import kohya_unet_names, load_lora, save_lora
from diffusion.patches.patcher import LoraDelta
from diffusion.patches.trainable_lora import LowRankDelta
from graph.node import Float, Input, Int, Node, Output, Socket, String
from graph.types import CLIP, IMAGE, MODEL, STRING, VAE
from nodes.environment import embedding_file_names, safe_join

log = logging.getLogger(__name__)

LORA = "LORA"
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
MIN_SNR = 5.0


def attention_layers(unet: nn.Module) -> dict[str, nn.Linear]:
    """Our module path -> layer for every attention projection of the UNet."""
    return {name: m for name, m in unet.named_modules()
            if isinstance(m, nn.Linear) and name.endswith(tuple("." + t for t in TARGETS)) and ".attn" in name}


def _targets(model: DiffusionModel, latents: Tensor, noise: Tensor, abar: Tensor) -> Tensor:
    if model.model_sampling.prediction == "eps":
        return noise
    return abar.sqrt() * noise - (1 - abar).sqrt() * latents  # v-prediction


def encode_inputs(model: DiffusionModel, clip: ClipModel, vae: VAEModel, images: Tensor, captions: list[str]
                  ) -> tuple[Tensor, Tensor, list[dict[str, Tensor]]]:
    """Scaled latents [B, C, h, w], text contexts [B, T, D] and per-image extra conditioning (SDXL's y)."""
    latents = vae.encode(images).float() * model.latent_scale
    with embedding_file_names(clip):
        encoded = [clip.encode(c) for c in captions]
    tokens = max(cond.shape[1] for cond, _ in encoded)
    contexts = torch.cat([F.pad(cond, (0, 0, 0, tokens - cond.shape[1])) for cond, _ in encoded])
    extras = [model.extra_cond({"pooled_output": pooled}, latents[i:i + 1]) for i, (_, pooled) in enumerate(encoded)]
    return latents, contexts, extras


def train_lora(model: DiffusionModel, clip: ClipModel, vae: VAEModel, images: Tensor, captions: list[str], *,
               steps: int, rank: int, learning_rate: float, seed: int, repeats: int = 4,
               progress: Callable[[int, int, float], None] | None = None) -> tuple[dict[str, LoraDelta], list[float]]:
    """Train a LoRA on `images` [B, H, W, 3] (0..1) with one caption each; returns (kohya name -> delta, the
    loss of every step). Each step sees every image `repeats` times at independent noise levels."""
    if images.ndim != 4 or images.shape[-1] < 3:
        raise ValueError(f"images must be an IMAGE batch [B, H, W, C], got shape {list(images.shape)}")
    if len(captions) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images need {images.shape[0]} captions (one per line), "
                         f"got {len(captions)}")
    gen = torch.Generator().manual_seed(seed)
    latents, contexts, extras = encode_inputs(model, clip, vae, images, captions)
    y = torch.cat([e["y"] for e in extras]) if extras and "y" in extras[0] else None
    alphas_cumprod = model.model_sampling.schedule.alphas_cumprod.float()
    losses: list[float] = []
    with model.manager.use([model.patcher], exclusive=True) as (unet,):  # hooks and flags: nobody else
        device, dtype = model.device, model.dtype
        # down drawn in sorted layer order from the seed's generator: the same seed trains the same LoRA
        layers = {name: LowRankDelta(linear, rank, gen) for name, linear in sorted(attention_layers(unet).items())}
        names = kohya_unet_names(model.family.unet, [n for n, _ in unet.named_parameters()])
        params = [p for layer in layers.values() for p in (layer.down, layer.up)]
        for p in params:
            p.data = p.data.to(device)
        optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
        modules = dict(unet.named_modules())
        handles = [modules[name].register_forward_hook(layer.hook) for name, layer in layers.items()]
        grad_flags = [p.requires_grad for p in unet.parameters()]
        unet.requires_grad_(False)
        x0 = latents.repeat(repeats, 1, 1, 1)
        context = contexts.repeat(repeats, 1, 1).to(device, dtype)
        y_all = None if y is None else y.repeat(repeats, 1).to(device, dtype)
        try:
            for step in range(steps):
                t = torch.randint(0, alphas_cumprod.shape[0], (x0.shape[0],), generator=gen)
                noise = torch.randn(x0.shape, generator=gen)
                abar = alphas_cumprod[t][:, None, None, None]
                noisy = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
                pred = unet(noisy.to(device, dtype), t.float().to(device), context, y_all).float().cpu()
                snr = abar / (1 - abar)
                weight = (snr.clamp(max=MIN_SNR) / snr).flatten()
                per_image = F.mse_loss(pred, _targets(model, x0, noise, abar), reduction="none").mean((1, 2, 3))
                loss = (weight * per_image).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                if progress is not None:
                    progress(step + 1, steps, losses[-1])
        finally:
            for handle in handles:
                handle.remove()
            for p, flag in zip(unet.parameters(), grad_flags, strict=True):
                p.requires_grad_(flag)
    return {names[name]: layer.as_lora() for name, layer in layers.items()}, losses


def lora_path(models_dir: Path, name: str) -> Path:
    """Where `name` goes under models/loras (".safetensors" added when missing); never outside it."""
    name = name.strip()
    if not name:
        raise ValueError("lora_name is empty")
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    return safe_join(models_dir / "loras", name)


class TrainLoraFromImages(Node):
    display_name = "Train LoRA from Images"
    category = "training"
    description = ("Fine-tunes the model's attention layers on a few captioned images and saves the result as "
                   "a LoRA under models/loras, ready for Load LoRA.")
    hidden = ("context",)
    output_node = True
    not_idempotent = True
    inputs: list[Input] = [
        Socket("model", MODEL), Socket("clip", CLIP), Socket("vae", VAE), Socket("images", IMAGE),
        String("captions", multiline=True, tooltip="One caption per image, one per line, in the images' order."),
        Int("steps", default=300, min=1, max=100000, tooltip="Optimiser steps."),
        Int("rank", default=8, min=1, max=256, tooltip="Rank of each low-rank update."),
        Float("learning_rate", default=5e-3, min=1e-7, max=1.0, step=1e-5, round=1e-7,
              tooltip="AdamW learning rate; 5e-3 with 300 steps suits the small shapes model."),
        Int("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF),
        String("lora_name", default="my-lora.safetensors", tooltip="File name under models/loras."),
    ]
    outputs = [Output(LORA, tooltip="The trained LoRA's tensors."),
               Output(STRING, name="lora_name", tooltip="The file name, as Load LoRA lists it.")]

    def execute(self, model, clip, vae, images, captions, steps, rank, learning_rate, seed, lora_name, context):
        lines = [line.strip() for line in captions.splitlines() if line.strip()]
        path = lora_path(context.env.models_dir, lora_name)

        def report(step: int, total: int, loss: float) -> None:
            context.progress(step, total)
            if step == 1 or step == total or step % 50 == 0:
                log.info("TrainLoraFromImages step %d/%d loss %.4f", step, total, loss)

        deltas, losses = train_lora(model, clip, vae, images, lines, steps=steps, rank=rank,
                                    learning_rate=learning_rate, seed=seed, progress=report)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_lora(path, deltas, {"latentloom.training": f"steps={steps} rank={rank} lr={learning_rate} "
                                                        f"seed={seed} images={images.shape[0]}"})
        name = path.relative_to((context.env.models_dir / "loras").resolve()).as_posix()
        log.info("wrote LoRA %s (loss %.4f -> %.4f)", path, losses[0], losses[-1])
        return (load_lora(path), name)


NODE_CLASSES = [TrainLoraFromImages]
