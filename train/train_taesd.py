"""Train a TAESD-style tiny preview decoder for the demo model's latent space (distilled from its own VAE).

Recipe (what `python -m train.train_taesd` does with its defaults; timings and numbers in train/README.md):

1. The base model (`--base`, the shipped latentloom-shapes) is loaded through the project's own checkpoint loader;
   its VAE encodes `--images` clean shapes images (posterior means, times SD1's 0.18215) once.
2. Every step draws `--batch` of those latents and turns a share of them into what a sampler's denoised estimate
   looks like before the last step: half stay clean, a quarter get Gaussian noise (std up to 0.5 of the latent
   scale), a quarter are blurred towards their 2x2-pooled version. The target of each is the VAE decoder's own
   output on that very latent (distillation), clamped to 0..1 as previews are shown.
3. The decoder is diffusion/models/taesd.py's TinyDecoder at width `--width` (32: ~0.3 M parameters, a 0.6 MB
   fp16 file), trained with AdamW, warm-up and cosine decay, on mean squared error plus mean absolute error.
4. It is written in fp16 in TAESD's own key layout, named after the checkpoint
   (`models/vae_approx/<checkpoint stem>_taesd_decoder.safetensors`), which is how the preview code finds it.

Deterministic given `--seed` and the thread count: every batch is a function of (seed, step). `--minutes` stops
with the state saved, `--resume` continues from it and ends with the same weights.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion.checkpoints.loader import load_checkpoint
from diffusion.models.taesd import TinyDecoder, write_tiny_decoder

from . import data, shapes
from .recipe import SCALING_FACTOR
from .resumable import ResumableTrainer, add_loop_arguments, run
from .train_model import lr_at

log = logging.getLogger("train.taesd")

PHASE = 4  # data.step_rng's phase number for tiny-decoder batches (0-3 are the other trainers')
NOISE_STD = 0.5  # the most noise added to a latent (in scaled-latent units, where clean latents have std ~1)


class TinyDecoderTrainer(ResumableTrainer):
    """The decoder, its optimiser and step, saved to and restored from one state file."""

    log = log

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        base = load_checkpoint(args.base, dtype=torch.float32)
        self.vae = base.vae.eval().requires_grad_(False)
        torch.manual_seed(args.seed)
        self.net = TinyDecoder(base.vae.config.embed_dim, args.width)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=args.lr, weight_decay=0.0)
        self.latents = self.dataset()

    # ---- state -----------------------------------------------------------------------------------
    def identity(self) -> dict:
        return {"seed": self.args.seed, "width": self.args.width}

    def check_identity(self, stored: dict) -> None:
        if (stored["seed"], stored["width"]) != (self.args.seed, self.args.width):
            raise SystemExit(f"{self.args.state} was trained with --seed {stored['seed']} --width {stored['width']}, "
                             f"not --seed {self.args.seed} --width {self.args.width}")

    # ---- data ------------------------------------------------------------------------------------
    @torch.no_grad()
    def dataset(self) -> Tensor:
        """Scaled latents [N, C, 8, 8] of `--images` clean training images (seed + 200: their own draw)."""
        latents = []
        for start in range(0, self.args.images, 256):
            images, _ = shapes.batch(self.args.seed + 200, "train", range(start, min(start + 256, self.args.images)))
            latents.append(self.vae.encode(data.to_tensor(images)).float())
        return torch.cat(latents) * SCALING_FACTOR

    @torch.no_grad()
    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """(scaled latents, VAE-decoded targets in 0..1 [B, 3, H, W]) of one step: a function of (seed, step)."""
        a = self.args
        rng = data.step_rng(a.seed, PHASE, step)
        z = self.latents[torch.from_numpy(rng.integers(0, len(self.latents), size=a.batch))].clone()
        kind = rng.integers(0, 4, size=a.batch)  # 0, 1: clean; 2: noisy; 3: blurred
        gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
        noise = torch.randn(z.shape, generator=gen) * torch.rand(a.batch, 1, 1, 1, generator=gen) * NOISE_STD
        blurred = F.interpolate(F.avg_pool2d(z, 2), size=z.shape[-2:], mode="bilinear", align_corners=False)
        amount = torch.rand(a.batch, 1, 1, 1, generator=gen)
        noisy, blur = torch.from_numpy(kind == 2)[:, None, None, None], torch.from_numpy(kind == 3)[:, None, None, None]
        z = torch.where(noisy, z + noise, z)
        z = torch.where(blur, torch.lerp(z, blurred, amount), z)
        target = ((self.vae.decode(z / SCALING_FACTOR) + 1) / 2).clamp(0, 1)
        return z, target

    # ---- training --------------------------------------------------------------------------------
    def train_step(self) -> float:
        a = self.args
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, a.steps, a.lr, min(50, a.steps // 10 + 1))
        z, target = self.batch(self.step)
        out = self.net(z)
        loss = F.mse_loss(out, target) + F.l1_loss(out, target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def write(self, path: str | os.PathLike) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_tiny_decoder(path, self.net, metadata={"latentloom.recipe": "train.train_taesd",
                                                     "latentloom.steps": str(self.step),
                                                     "latentloom.seed": str(self.args.seed)})
        log.info("wrote %s (%.2f MB)", path, os.path.getsize(path) / 2**20)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="default: models/vae_approx/<base stem>_taesd_decoder.safetensors")
    add_loop_arguments(p, "train-taesd-state.pt", base_help="the model whose VAE is distilled")
    p.add_argument("--width", type=int, default=32, help="decoder channels (TAESD's own: 64)")
    p.add_argument("--images", type=int, default=4096, help="clean training images encoded once")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    args = p.parse_args(argv)
    if args.out is None:
        args.out = f"models/vae_approx/{Path(args.base).stem}_taesd_decoder.safetensors"
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    return run(TinyDecoderTrainer, args)


if __name__ == "__main__":
    raise SystemExit(main())
