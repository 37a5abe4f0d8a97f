"""Train a silhouette ControlNet for the demo model, and write it as an SD1 ControlNet file (original key names).

Recipe (what `python -m train.train_controlnet` does with its defaults; timings and numbers in train/README.md):

1. The base model (`--base`, the shipped latentloom-shapes) is loaded through the project's own checkpoint loader
   and frozen; its VAE encodes `--images` training images (posterior means, times SD1's 0.18215) once.
2. The hint of every image is its shape's silhouette, white on black at image size (`silhouette`): the same
   procedural shapes, drawn at 4x and box-filtered as the images are, so hint and image agree to the pixel.
3. The ControlNet starts as ControlNet does (Zhang et al. 2023): time embedding, input blocks and middle block
   copied from the base UNet's encoder, the hint encoder random but its last conv at zero, every zero conv
   (`zero_convs.*`, `middle_block_out`) at zero, so step 0 leaves the base model's prediction unchanged.
4. Only the ControlNet trains (`--steps`, batch `--batch`, AdamW `--lr` with warm-up and cosine decay, bf16
   autocast, eager attention): the base model's eps-prediction loss with min-SNR-5 weighting (train/recipe.py),
   its residuals added through the same UNet hooks the ControlNetApply nodes use (diffusion/patches/control.py).
   Captions are the main trainer's mix (full, partial, 10 % empty), so the hint steers where and which shape
   and the prompt keeps the colour.
5. The ControlNet is written in fp16 through `write_controlnet_file` (original layout, head layout in metadata).

Options the shipped file's later stages use (train/README.md): `--init FILE` starts from a ControlNet file
instead of the copy of step 3 (continuing a finished run with a new seed and schedule), and `--shape-weight K`
weights the loss K times on the latent cells the silhouette touches and the cells around them
(`shape_weights`), where the shape's outline is decided; 1 (the default) is the plain loss.
`--empty-target base` (third stage) changes what the empty-caption rows learn: instead of the image's noise (the
hint's shape in whatever colour the empty prompt averages to), the frozen base model's own prediction for that
input without the ControlNet, so the ControlNet stays silent on CFG's unconditional half. Trained on the noise, the
ControlNet drew the shape on both halves, cond in the prompt's colour and uncond in that average colour, and CFG's
difference of the two, amplified 5x, painted a green or cyan rim on small blue stars on black (`controlnet_loss`);
`--empty-fraction` raises the share of empty captions so that the silence is learned in a short stage.

Deterministic given `--seed` and the thread count: every batch and noise draw is a function of (seed, step).
`--minutes` stops with the state saved, `--resume` continues from it and ends with the same weights.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from diffusion.checkpoints.controlnet_files import (
    ControlNetInfo,
    build_controlnet,
    read_controlnet,
    write_controlnet_file,
)
from diffusion.models.controlnet import ControlNet, ControlNetConfig
from diffusion.models.text_encoders import TextEncoders
from diffusion.models.unet import UNetModel
from diffusion.patches.control import residual_patches
from diffusion.sampling.schedules import DiscreteSchedule

from . import data, shapes
from .recipe import SCALING_FACTOR, denoising_loss, use_eager_attention
from .resumable import ResumableTrainer, add_loop_arguments, load_sd1_base, run
from .train_model import lr_at

log = logging.getLogger("train.controlnet")

PHASE = 3  # data.step_rng's phase number for ControlNet batches (0-2 are the main trainer's)
COPIED = ("time_embed.", "input_blocks.", "middle_block.")
# The hint of workflows/controlnet.json (examples/input/silhouette-star.png): a large star in the left cell, where
# shapes._place puts a radius-18 shape of position "left" without jitter. The prompt names no position.
EXAMPLE_HINT = shapes.Sample("star", "yellow", "blue", "large", "left", cx=19.0, cy=31.5, radius=18.0)
EXAMPLE_HINT_FILE = Path(__file__).resolve().parent.parent / "examples" / "input" / "silhouette-star.png"


def silhouette(sample: shapes.Sample) -> np.ndarray:
    """The sample's shape white on black, [64, 64] uint8, anti-aliased exactly as `shapes.render` draws it."""
    s = shapes.SUPERSAMPLE
    canvas = Image.new("L", (shapes.SIZE * s, shapes.SIZE * s), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, r = sample.cx * s, sample.cy * s, sample.radius * s
    if sample.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(shapes.shape_polygon(sample.shape, cx, cy, r), fill=255)
    return np.array(canvas.reduce(s), dtype=np.uint8)


def hint_images(silhouettes: np.ndarray) -> Tensor:
    """uint8 [B, H, W] silhouettes -> [B, 3, H, W] in 0..1, the range ControlNet hints come in."""
    t = torch.from_numpy(silhouettes).float() / 255.0
    return t[:, None].expand(-1, 3, -1, -1).contiguous()


def shape_weights(silhouettes: np.ndarray, weight: float, latent_size: int) -> Tensor:
    """Per-latent-cell loss weights [B, 1, n, n]: `weight` on the cells any of the silhouette covers and their
    neighbours (one cell, the blur of an 8x8 latent's decoder), 1 elsewhere."""
    covered = torch.from_numpy(silhouettes).float()[:, None] / 255.0
    covered = torch.nn.functional.adaptive_max_pool2d(covered, latent_size) > 0
    near = torch.nn.functional.max_pool2d(covered.float(), 3, stride=1, padding=1)
    return 1.0 + (weight - 1.0) * near


def controlnet_from_file(path: str, unet: UNetModel) -> ControlNet:
    """The ControlNet of an earlier run's file (`--init`), checked to fit `unet`."""
    sd, info = read_controlnet(path)
    if info.diff or info.config.unet != unet.config:
        raise SystemExit(f"--init {path}: a {info.family} ControlNet for another UNet than the base model's")
    return build_controlnet(sd, info, dtype=torch.float32).requires_grad_(True)  # built as frozen inference weights


def controlnet_from_unet(unet: UNetModel, seed: int) -> ControlNet:
    """A ControlNet for `unet`: its encoder copied, the hint encoder seeded, every zero conv (and the hint encoder's
    last conv) at zero."""
    torch.manual_seed(seed)
    net = ControlNet(ControlNetConfig(unet.config))
    encoder = {k: v for k, v in unet.state_dict().items() if k.startswith(COPIED)}
    missing = set(net.state_dict()) - set(encoder)
    net.load_state_dict(encoder, strict=False)
    zeroed = [*net.zero_convs, net.middle_block_out, net.input_hint_block[-1]]
    with torch.no_grad():
        for module in zeroed:
            for p in module.parameters():
                p.zero_()
    log.debug("ControlNet: %d tensors copied from the UNet, %d initialised", len(encoder), len(missing))
    return net


def controlnet_loss(controlled, base, latents: Tensor, context: Tensor, empty: Tensor, alphas_cumprod: Tensor,
                    gen: torch.Generator, min_snr: float = 5.0, pixel_weights: Tensor | None = None) -> Tensor:
    """`recipe.denoising_loss` (the same draws from `gen`, the same min-SNR and pixel weighting) except that the rows
    where `empty` [B] bool is set regress onto `base(noisy, t, context)` (the frozen model without the ControlNet,
    no gradient) instead of the noise: there the ControlNet learns to change nothing."""
    def silent_where_empty(noisy: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        if not bool(empty.any()):
            return noise
        with torch.no_grad():
            silent = base(noisy[empty], t[empty].float(), context[empty]).float()
        target = noise.clone()
        target[empty] = silent
        return target

    return denoising_loss(controlled, latents, context, alphas_cumprod, gen, min_snr, pixel_weights,
                          target=silent_where_empty)


class CaptionCache:
    """Caption -> context [77, width] through the base model's own text encoders, cached (few distinct captions)."""

    def __init__(self, text: TextEncoders):
        self.text, self.cache = text, {}

    @torch.no_grad()
    def batch(self, captions: list[str]) -> Tensor:
        for c in captions:
            if c not in self.cache:
                self.cache[c] = self.text.encode(c)[0][0].float()
        return torch.stack([self.cache[c] for c in captions])


class ControlNetTrainer(ResumableTrainer):
    """The ControlNet, its optimiser and step, saved to and restored from one state file."""

    log = log

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        base = load_sd1_base(args.base)
        self.unet = base.unet.eval().requires_grad_(False)
        self.vae = base.vae.eval().requires_grad_(False)
        self.captions = CaptionCache(base.text)
        if args.init:
            self.net = controlnet_from_file(args.init, self.unet)
        else:
            self.net = controlnet_from_unet(self.unet, args.seed)
        use_eager_attention(self.unet)
        use_eager_attention(self.net)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=args.lr, weight_decay=0.0)
        self.alphas_cumprod = DiscreteSchedule.from_config().alphas_cumprod.float()
        self.latents, self.hints, self.samples = self.dataset()

    # ---- data ------------------------------------------------------------------------------------
    @torch.no_grad()
    def dataset(self) -> tuple[Tensor, np.ndarray, list[shapes.Sample]]:
        """Scaled latents [N, 4, 8, 8] of `--images` training images, their silhouettes [N, 64, 64] uint8, and
        their ground truth (images drawn with seed + 100, apart from the base model's own latent set)."""
        a, latents, hints, samples = self.args, [], [], []
        for start in range(0, a.images, 256):
            images, batch = shapes.batch(a.seed + 100, "train", range(start, min(start + 256, a.images)))
            with torch.autocast("cpu", torch.bfloat16, enabled=a.bf16):
                latents.append(self.vae.encode(data.to_tensor(images)).float())
            hints += [silhouette(s) for s in batch]
            samples += batch
        return torch.cat(latents) * SCALING_FACTOR, np.stack(hints), samples

    def caption(self, rng: np.random.Generator, sample: shapes.Sample) -> str:
        """The main trainer's caption mix, with more empty captions when `--empty-fraction` asks for them (an extra
        draw only then, so the default draws stay those of the earlier stages)."""
        caption = data.training_caption(rng, sample)
        extra = (self.args.empty_fraction - data.EMPTY_CAPTION_FRACTION) / (1 - data.EMPTY_CAPTION_FRACTION)
        if caption and extra > 0 and rng.random() < extra:
            return ""
        return caption

    def batch(self, step: int) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor]:
        """(latents, hints, context, loss weights or None, empty-caption rows [B] bool) of one step: a pure function
        of (seed, step)."""
        rng = data.step_rng(self.args.seed, PHASE, step)
        indices = rng.integers(0, len(self.samples), size=self.args.batch)
        captions = [self.caption(rng, self.samples[i]) for i in indices]
        context = self.captions.batch(captions)
        latents = self.latents[torch.from_numpy(indices)]
        weights = None
        if self.args.shape_weight != 1.0:
            weights = shape_weights(self.hints[indices], self.args.shape_weight, latents.shape[-1])
        empty = torch.tensor([c == "" for c in captions])
        return latents, hint_images(self.hints[indices]), context, weights, empty

    # ---- training --------------------------------------------------------------------------------
    def train_step(self) -> float:
        a = self.args
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, a.steps, a.lr, min(100, a.steps // 10 + 1))
        latents, hints, context, weights, empty = self.batch(self.step)
        gen = torch.Generator().manual_seed(a.seed * 1_000_003 + 11 + self.step)

        def controlled(x: Tensor, t: Tensor, ctx: Tensor) -> Tensor:
            return self.unet(x, t, ctx, patches=residual_patches(self.net(x, hints, t, ctx)))

        with torch.autocast("cpu", torch.bfloat16, enabled=a.bf16):
            if a.empty_target == "base":
                loss = controlnet_loss(controlled, self.unet, latents, context, empty, self.alphas_cumprod, gen,
                                       pixel_weights=weights)
            else:
                loss = denoising_loss(controlled, latents, context, self.alphas_cumprod, gen, pixel_weights=weights)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def write(self, path: str | os.PathLike) -> None:
        info = ControlNetInfo("sd1", "original", False, self.net.config)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_controlnet_file(path, self.net.state_dict(), info, dtype=torch.float16)
        log.info("wrote %s (%.1f MB)", path, os.path.getsize(path) / 2**20)


def write_example_hint(path: str | os.PathLike = EXAMPLE_HINT_FILE) -> Path:
    """The shipped workflow's hint image (grayscale PNG, no text chunks)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(silhouette(EXAMPLE_HINT), "L").save(path, optimize=True)
    log.info("wrote %s", path)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="models/controlnet/latentloom-shapes-silhouette.safetensors")
    add_loop_arguments(p, "train-controlnet-state.pt")
    p.add_argument("--images", type=int, default=16384, help="training images (and silhouettes) encoded once")
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--init", metavar="FILE", help="start from this ControlNet file instead of the base UNet's copy")
    p.add_argument("--shape-weight", type=float, default=1.0,
                   help="loss weight of the latent cells on and around the silhouette (1: the plain loss)")
    p.add_argument("--empty-target", choices=("noise", "base"), default="noise",
                   help="what the empty-caption rows learn: the image's noise (the plain loss) or the base model's "
                        "prediction without the ControlNet (the ControlNet stays silent on CFG's unconditional half)")
    p.add_argument("--empty-fraction", type=float, default=data.EMPTY_CAPTION_FRACTION,
                   help=f"share of empty captions, at least the main trainer's {data.EMPTY_CAPTION_FRACTION}")
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    p.add_argument("--example-hint", nargs="?", const=str(EXAMPLE_HINT_FILE), default=None, metavar="PATH",
                   help="only write the shipped workflow's hint image (default examples/input/silhouette-star.png)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    if args.example_hint:
        write_example_hint(args.example_hint)
        return 0
    if not data.EMPTY_CAPTION_FRACTION <= args.empty_fraction <= 1:
        raise SystemExit(f"--empty-fraction {args.empty_fraction}: must be in [{data.EMPTY_CAPTION_FRACTION}, 1]")
    if args.init and not Path(args.init).is_file():
        raise SystemExit(f"--init {args.init}: no such ControlNet file")
    return run(ControlNetTrainer, args)


if __name__ == "__main__":
    raise SystemExit(main())
