"""Train an AnimateDiff-style motion module for the demo model, written as an AnimateDiff v2 file.

Recipe (what `python -m train.train_motion` does with its defaults; timings and numbers in train/README.md):

1. The base model (`--base`, the shipped latentloom-shapes) is loaded through the project's checkpoint loader and
   frozen. Its VAE encodes `--clips` training clips of `--frames` frames once (train/motion_data.py: one shape
   moving left to right, right to left, up or down; posterior means times SD1's 0.18215).
2. The motion module set has AnimateDiff v2's layout for this UNet (diffusion/models/motion_module.py): one
   temporal transformer after each input-level block (widths 64/128/128), two after each output level's blocks,
   one in the middle block, 8 heads, a 32-frame position encoding, GroupNorm 32. Its `proj_out` layers start at
   zero (as AnimateDiff's do), so step 0 is the image model applied to every frame.
3. With them trains an image-model adapter (`--lora-rank`, 0: none): low-rank deltas on the UNet's
   cross-attention projections (attn2 to_q/to_k/to_v/to_out), as AnimateDiff v3 ships a LoRA beside its module.
   The motion module never sees the text; it reads the caption only through the image UNet's per-frame features,
   and the frozen demo UNet's features barely change between "moving to the left" and "... to the right". The
   adapter lets the caption's direction change those features. The image UNet's own weights stay frozen:
   eps-prediction loss with one timestep per clip (every frame equally noisy, noise independent per frame),
   min-SNR-5 weighting with an SNR floor (`--snr-floor`; the shipped module: 1, and `--high-noise-share 0.5`: see
   clip_loss), the base model's own noise schedule (the one it samples with: use beta_schedule "use existing"
   with it), AdamW
   `--lr` with warm-up and cosine decay, bf16 autocast. A clip is used forwards or reversed in time with the
   opposite direction's caption (a free second clip); captions are "a red circle on a gray background moving to
   the top", 15 % with the size word, 10 % empty for classifier-free guidance.
4. The set is written in fp16 with the original AnimateDiff key names, so it loads (and is detected as v2) from
   `models/animatediff_models` like a downloaded module; the adapter as a kohya LoRA (`--lora-out`, fp16,
   alpha = rank) for LoraLoaderModelOnly, to be applied together with the module.

Deterministic given `--seed` and the thread count: every batch and noise draw is a function of (seed, step).
`--minutes` stops with the state saved, `--resume` continues from it and ends with the same weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion.checkpoints.files import write_safetensors
from diffusion.models.motion_module import MotionConfig, MotionModuleSet
from diffusion.models.unet import UNetModel
from diffusion.patches.lora import kohya_unet_names, save_lora
from diffusion.patches.motion_patch import _locate
from diffusion.patches.patcher import LoraDelta
from diffusion.patches.trainable_lora import LowRankDelta
from diffusion.patches.unet_patches import Site, UNetPatches
from diffusion.sampling.schedules import DiscreteSchedule

from . import data, motion_data
from .recipe import SCALING_FACTOR, use_eager_attention
from .resumable import ResumableTrainer, add_loop_arguments, load_sd1_base, run
from .train_controlnet import CaptionCache
from .train_model import lr_at

log = logging.getLogger("train.motion")

PHASE = 4  # data.step_rng's phase number for motion batches (0-2: the main trainer, 3: the ControlNet)
DEFAULT_OUT = "models/animatediff_models/latentloom-shapes-motion.safetensors"
DEFAULT_LORA_OUT = "models/loras/latentloom-shapes-motion-adapter.safetensors"
LORA_TARGETS = ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")  # the UNet's cross-attention


def motion_config_for(unet: UNetModel, max_len: int = 32) -> MotionConfig:
    """AnimateDiff v2's layout fitted to `unet`: a module per ResBlock on the input side, one per block on the
    output side, one in the middle; the loader detects the same config back from the file's keys."""
    c = unet.config
    channels = tuple(c.model_channels * m for m in c.channel_mult)
    return MotionConfig(channels=channels, down_per_level=c.num_res_blocks, up_per_level=c.num_res_blocks + 1,
                        mid=True, max_len=max_len, version="v2", groups=min(32, channels[0]))


def new_motion_set(unet: UNetModel, seed: int) -> MotionModuleSet:
    """Seeded initial weights, every `proj_out` at zero: the set starts as a no-op on the UNet's features."""
    torch.manual_seed(seed)
    motion = MotionModuleSet(motion_config_for(unet))
    with torch.no_grad():
        for name, p in motion.named_parameters():
            if ".proj_out." in name:
                p.zero_()
    return motion


class MotionAndAdapter(nn.Module):
    """What the recipe trains: the motion module set and, keyed by UNet module path ('.' as '-'), the adapter's
    low-rank deltas on the UNet's cross-attention (none at rank 0)."""

    def __init__(self, motion: MotionModuleSet, unet: UNetModel, rank: int, seed: int):
        super().__init__()
        self.motion = motion
        gen = torch.Generator().manual_seed(seed * 1_000_003 + 29)
        layers = {} if rank <= 0 else {
            name: m for name, m in sorted(unet.named_modules())
            if isinstance(m, nn.Linear) and name.endswith(LORA_TARGETS)}
        self.adapter = nn.ModuleDict({name.replace(".", "-"): LowRankDelta(m, rank, gen) for name, m in layers.items()})

    def attach(self, unet: UNetModel) -> list:
        """Hook the adapter's deltas into `unet` (the trainer's own frozen copy); returns the hook handles."""
        modules = dict(unet.named_modules())
        return [modules[key.replace("-", ".")].register_forward_hook(delta.hook)
                for key, delta in self.adapter.items()]

    def lora_deltas(self, unet: UNetModel) -> dict[str, LoraDelta]:
        """kohya layer name -> the adapter's delta (alpha = rank: scale 1 at strength 1)."""
        names = kohya_unet_names(unet.config, [n for n, _ in unet.named_parameters()])
        return {names[key.replace("-", ".")]: d.as_lora(torch.float16) for key, d in self.adapter.items()}


def training_patches(motion: MotionModuleSet, num_res_blocks: int, frames: int) -> UNetPatches:
    """The UNet hook that runs the trainable modules themselves (the sampling patch runs a device/dtype copy of
    a loaded set, which would not pass gradients back), every `frames` batch rows one clip."""
    levels = len(motion.config.channels)

    def hook(h: Tensor, site: Site) -> Tensor:
        where = _locate(site, levels, num_res_blocks)
        module = None if where is None else motion.module_at(*where)
        return h if module is None else module(h, frames)

    return UNetPatches(block_features=(hook,))


def clip_loss(predict: Callable[[Tensor, Tensor, Tensor], Tensor], latents: Tensor, context: Tensor,
              alphas_cumprod: Tensor, gen: torch.Generator, frames: int, min_snr: float = 5.0,
              high_noise_share: float = 0.0, snr_floor: float = 0.0) -> Tensor:
    """eps-prediction loss on [clips * frames, C, h, w] latents: one timestep per clip, noise per frame, each
    clip weighted by clamp(SNR, snr_floor, min_snr) / SNR. A `high_noise_share` of the clips draw their timestep
    from the noisier half of the schedule only, where a clip's layout over time, and so its direction, is decided
    (at low noise the noisy frames already show where the shape is).

    Why the floor: an eps error is sqrt(SNR) times the implied x0 error, so min-SNR weighting prices an x0 error
    at SNR (0.005 at t = 999 on SD's schedule): at high noise, where the layout is decided, a clip moving the wrong
    way costs almost nothing. With a floor the x0 error there costs as much as at SNR = snr_floor."""
    clips, steps = latents.shape[0] // frames, alphas_cumprod.shape[0]
    t = torch.randint(0, steps, (clips,), generator=gen)
    if high_noise_share > 0:
        noisier = torch.randint(steps // 2, steps, (clips,), generator=gen)
        t = torch.where(torch.rand(clips, generator=gen) < high_noise_share, noisier, t)
    t = t.repeat_interleave(frames)
    noise = torch.randn(latents.shape, generator=gen)
    abar = alphas_cumprod[t].float()[:, None, None, None]
    noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    pred = predict(noisy, t.float(), context).float()
    snr = abar / (1 - abar)
    weight = (snr.clamp(min=snr_floor, max=min_snr) / snr).flatten()
    return (weight * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()


class MotionTrainer(ResumableTrainer):
    """The motion module set, its optimiser and step, saved to and restored from one state file."""

    log = log

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        base = load_sd1_base(args.base)
        if not 2 <= args.frames <= 32:
            raise SystemExit(f"--frames {args.frames}: the module's position encoding covers 2 to 32 frames")
        self.unet = base.unet.eval().requires_grad_(False)
        self.vae = base.vae.eval().requires_grad_(False)
        self.captions = CaptionCache(base.text)
        self.net = MotionAndAdapter(new_motion_set(self.unet, args.seed), self.unet, args.lora_rank, args.seed)
        self.net.attach(self.unet)
        use_eager_attention(self.unet)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=args.lr, weight_decay=0.0)
        self.alphas_cumprod = DiscreteSchedule.from_config().alphas_cumprod.float()
        self.latents, self.clips = self.dataset()

    def identity(self) -> dict:
        a = self.args
        identity = {"seed": a.seed, "frames": a.frames, "clips": a.clips, "lora-rank": a.lora_rank}
        for flag, value in (("high-noise-share", a.high_noise_share), ("snr-floor", a.snr_floor)):
            if value:  # absent from the states of runs before the flag
                identity[flag] = value
        return identity

    def check_identity(self, stored: dict) -> None:
        for key, value in self.identity().items():
            if stored.get(key) != value:
                raise SystemExit(f"{self.args.state} was trained with --{key} {stored.get(key)}, not {value}")

    # ---- data ------------------------------------------------------------------------------------
    @torch.no_grad()
    def dataset(self) -> tuple[Tensor, list[motion_data.Clip]]:
        """Scaled latents [N, F, 4, 8, 8] of `--clips` training clips (seed + 300) and their ground truth."""
        a, latents = self.args, []
        clips = motion_data.clips(a.seed + 300, "train", range(a.clips), a.frames)
        per_chunk = max(1, 256 // a.frames)
        for start in range(0, len(clips), per_chunk):
            frames = np.concatenate([motion_data.render_clip(c) for c in clips[start: start + per_chunk]])
            with torch.autocast("cpu", torch.bfloat16, enabled=a.bf16):
                encoded = self.vae.encode(data.to_tensor(frames)).float()
            latents.append(encoded.reshape(-1, a.frames, *encoded.shape[1:]))
        log.info("encoded %d clips of %d frames", len(clips), a.frames)
        return torch.cat(latents) * SCALING_FACTOR, clips

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """(latents [B*F, 4, h, w], context [B*F, 77, width]) of one step: a pure function of (seed, step). Each
        clip is played forwards or backwards (then captioned with the opposite direction)."""
        a = self.args
        rng = data.step_rng(a.seed, PHASE, step)
        indices = rng.integers(0, len(self.clips), size=a.batch)
        backwards = rng.random(a.batch) < 0.5
        latents, captions = [], []
        for i, back in zip(indices, backwards, strict=True):
            clip = self.clips[i]
            if back:
                clip = motion_data.reversed_direction(clip)
                latents.append(self.latents[i].flip(0))
            else:
                latents.append(self.latents[i])
            captions.append(motion_data.training_caption(rng, clip))
        context = self.captions.batch(captions).repeat_interleave(a.frames, dim=0)
        return torch.cat(latents), context

    # ---- training --------------------------------------------------------------------------------
    def train_step(self) -> float:
        a = self.args
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, a.steps, a.lr, min(100, a.steps // 10 + 1))
        latents, context = self.batch(self.step)
        gen = torch.Generator().manual_seed(a.seed * 1_000_003 + 13 + self.step)
        patches = training_patches(self.net.motion, self.unet.config.num_res_blocks, a.frames)

        def predict(x: Tensor, t: Tensor, ctx: Tensor) -> Tensor:
            return self.unet(x, t, ctx, patches=patches)

        with torch.autocast("cpu", torch.bfloat16, enabled=a.bf16):
            loss = clip_loss(predict, latents, context, self.alphas_cumprod, gen, a.frames,
                             high_noise_share=a.high_noise_share, snr_floor=a.snr_floor)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def write(self, path: str | os.PathLike) -> None:
        """The module in fp16 with original AnimateDiff key names, and the adapter (if any) as a kohya LoRA at
        `--lora-out`; the recipe in both files' metadata."""
        a = self.args
        tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in self.net.motion.state_dict().items()}
        recipe = json.dumps({"steps": a.steps, "batch": a.batch, "frames": a.frames, "clips": a.clips, "lr": a.lr,
                             "seed": a.seed, "lora_rank": a.lora_rank, "high_noise_share": a.high_noise_share,
                             "snr_floor": a.snr_floor,
                             "schedule": "the base model's (use beta_schedule 'use existing')"}, sort_keys=True)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_safetensors(path, {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}, tensors.__getitem__,
                          {"format": "pt", "latentloom.recipe": recipe})
        log.info("wrote %s (%.1f MB)", path, os.path.getsize(path) / 2**20)
        if self.net.adapter:
            Path(a.lora_out).parent.mkdir(parents=True, exist_ok=True)
            save_lora(a.lora_out, self.net.lora_deltas(self.unet),
                      {"latentloom.recipe": recipe, "latentloom.motion_module": Path(path).name})
            log.info("wrote %s (%.2f MB)", a.lora_out, os.path.getsize(a.lora_out) / 2**20)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=DEFAULT_OUT)
    add_loop_arguments(p, "train-motion-state.pt")
    p.add_argument("--clips", type=int, default=1024, help="training clips encoded once")
    p.add_argument("--frames", type=int, default=motion_data.DEFAULT_FRAMES)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=4, help="clips per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lora-rank", type=int, default=16,
                   help="rank of the cross-attention adapter trained with the module; 0: the module alone")
    p.add_argument("--lora-out", default=DEFAULT_LORA_OUT, help="where the adapter's LoRA file goes")
    p.add_argument("--high-noise-share", type=float, default=0.0,
                   help="share of clips whose timestep comes from the noisier half of the schedule (0: uniform)")
    p.add_argument("--snr-floor", type=float, default=0.0,
                   help="price x0 errors at no less than this SNR (0: min-SNR-5 alone, the recipe before)")
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    args = p.parse_args(argv)
    if not 0 <= args.snr_floor <= 5:
        raise SystemExit(f"--snr-floor {args.snr_floor}: must be in [0, 5] (5: min-SNR's own cap)")
    if not 0 <= args.high_noise_share <= 1:
        raise SystemExit(f"--high-noise-share {args.high_noise_share}: must be in [0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    return run(MotionTrainer, args)


if __name__ == "__main__":
    raise SystemExit(main())
