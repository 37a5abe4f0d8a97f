"""The command-line flags of `python -m train.train_model` (its docstring is the recipe): v1's defaults write the
first model; `--recipe v2` changes the defaults listed in `recipe.RECIPES` (the shipped checkpoint: train/README.md,
Recipe v2)."""

from __future__ import annotations

import argparse

from .recipe import RECIPES, SPECS, V1_VALUES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description='Train the demo model ("latentloom-shapes") from procedurally drawn '
                                            'shapes, and write it as an SD1 file.')
    p.add_argument("--recipe", choices=sorted(RECIPES), default="v1",
                   help="v1: the first model's recipe; v2 (the shipped model's, from a v1 VAE: --vae-init): the "
                        "sharper VAE (its flags' defaults change; flags given explicitly still win)")
    p.add_argument("--out", default="models/checkpoints/latentloom-shapes.safetensors")
    p.add_argument("--state", default="train-state.pt", help="training-state file (written, and read by --resume)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spec", choices=sorted(SPECS), default="shapes")
    p.add_argument("--vae-steps", type=int, default=2400)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--latents", type=int, default=32768, help="training images encoded for the UNet")
    p.add_argument("--unet-steps", type=int, default=1800)
    p.add_argument("--unet-batch", type=int, default=64)
    p.add_argument("--unet-lr", type=float, default=1e-3)
    p.add_argument("--decoder-steps", type=int, default=400)
    p.add_argument("--decoder-lr", type=float, default=1e-3)
    p.add_argument("--sharpen-steps", type=int, default=600, help="phase 5 (decoder sharpening); 0: skip it")
    p.add_argument("--sharpen-lr", type=float, default=1e-3)
    p.add_argument("--sharpen-band", type=int, default=3, help="pixels around the shape weighted as the shape")
    p.add_argument("--from-checkpoint", metavar="FILE",
                   help="run phase 5 alone, from a file phases 1-4 wrote with the same seed and arguments")
    p.add_argument("--vae-kl", type=float, default=V1_VALUES["vae_kl"], help="KL weight of phase 1")
    p.add_argument("--vae-band", type=int, default=0,
                   help="phase 1 weights the shape and this many pixels around it 5x (0: the shape alone)")
    p.add_argument("--vae-edge", type=float, default=0.0,
                   help="weight of phase 1's edge loss (L1 of the images' horizontal and vertical differences)")
    p.add_argument("--vae-small-boost", type=float, default=0.0,
                   help="phase 1 raises the weight of shapes smaller than data.SMALL_SHAPE_AREA pixels, up to this "
                        "factor (0: off)")
    p.add_argument("--vae-logvar-init", type=float, default=None,
                   help="initial log-variance of the VAE's posterior (default: about 0, a unit-std noise)")
    p.add_argument("--vae-init", metavar="FILE", default=None,
                   help="start phase 1 from this checkpoint's VAE instead of random weights")
    p.add_argument("--vae-ch", type=int, default=None, help="VAE base width (default: the spec's)")
    p.add_argument("--vae-mult", default=None, help="VAE width multipliers per level, e.g. 1,2,4,8")
    p.add_argument("--vae-blocks", type=int, default=None, help="ResBlocks per VAE level (default: the spec's)")
    p.add_argument("--minutes", type=float, default=0.0, help="stop (state saved) after this long; 0: no limit")
    p.add_argument("--stop-after", type=int, default=0, help="stop (state saved) after this many steps; 0: no limit")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--log-every", type=int, default=50)
    recipe = p.parse_known_args(argv)[0].recipe
    p.set_defaults(**RECIPES[recipe])
    return p.parse_args(argv)
