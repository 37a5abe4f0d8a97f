"""Train the demo model ("latentloom-shapes") from procedurally drawn shapes, and write it as an SD1 file.

Recipe (what `python -m train.train_model` does with its defaults; see train/README.md for timings):

1. VAE (`--vae-steps`, batch 16, AdamW 2e-3 with warm-up and cosine decay, bf16 autocast): L1 + MSE with the
   shape's pixels weighted 5x, plus 1e-6 KL; half the images are recoloured at random so the VAE reproduces
   any flat colour, not just the palette.
2. Latents: the posterior means of `--latents` training images; the VAE is then rescaled (exactly, see
   `recipe.rescale_latents`) so that SD1's fixed factor 0.18215 brings them to unit standard deviation.
3. UNet (`--unet-steps`, batch 64, AdamW 1e-3, warm-up then cosine, bf16 autocast, eager attention, EMA 0.998):
   eps-prediction on SD's scaled-linear schedule with min-SNR-5 weighting, on captions from the frozen random
   text encoder (10% empty for classifier-free guidance, 30% partial captions such as "a red shape").
4. Decoder polish (`--decoder-steps`, batch as the VAE's, AdamW 1e-3, cosine): the decoder alone learns to
   decode the posterior means (the latents the UNet produces) without the sampling noise of phase 1; the
   encoder, and so the latent space the UNet learnt, are unchanged. 25% of its images are recoloured.
5. Decoder sharpening (`--sharpen-steps`, batch as the VAE's, AdamW `--sharpen-lr`, cosine; added 2026-12-02):
   the decoder alone again, starting from the fp16-rounded weights a checkpoint of phases 1-4 holds, with the
   loss weight of the shape extended to the background within `--sharpen-band` pixels of it
   (`data.band_weights`). Phases 1 and 4 weight the shape 5x and the background 1x, so a blurred edge costs
   little spilling outwards: their decoder drew shapes 1.4x too large and soft (IoU of the checker's mask of a
   reconstruction with the true silhouette 0.72; after this phase 0.8+). The encoder is untouched, so the
   latents (and the UNet, ControlNet, LoRA and tiny decoder trained on them) stay valid.
   `--from-checkpoint FILE` runs this phase alone on a file phases 1-4 wrote (checked tensor by tensor against
   what this seed's text encoder and that file's metadata say), giving the same bytes as the full run.
6. The EMA UNet, the VAE and the text encoder are written in fp16 through our own safetensors writer.

Recipe v2 (`--recipe v2 --vae-init V1_FILE`, the shipped file since 2026-12-02; train/README.md "Recipe
v2" has the experiments): phase 1 starts from a v1 model's VAE and continues it 1600 steps at lr 1e-3 with the
shape's weight extended 2 pixels around it (`--vae-band`), small shapes weighted like large ones (`--vae-small-boost
4`) and an edge loss on the images' pixel differences (`--vae-edge 3`); the decoder polish uses the same loss and the
sharpening phase is left out. The UNet and the decoder then train as in v1 on the new latents. Each v2 flag also
works alone, from random weights too (`--vae-logvar-init`, `--vae-ch/--vae-mult/--vae-blocks` for other VAE sizes).

Deterministic given `--seed` (and the thread count): every batch and noise draw is a function of (seed, step).
`--resume` continues from the training-state file written every `--save-every` steps and when `--minutes` runs
out, so a run cut short by the budget picks up where it stopped and ends with the same weights.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
from pathlib import Path

import torch

from diffusion.checkpoints.families import UNET_PREFIX, VAE_PREFIX
from diffusion.checkpoints.files import read_metadata, read_state_dict, strip_prefix
from diffusion.sampling.schedules import DiscreteSchedule

from . import data, shapes
from .model_flags import parse_args
from .recipe import (
    SCALING_FACTOR,
    SPECS,
    V1_VALUES,
    ModelSpec,
    build_text_encoder,
    build_unet,
    build_vae,
    checkpoint_tensors,
    denoising_loss,
    rescale_latents,
    use_eager_attention,
    vae_spec,
    write_checkpoint,
)

log = logging.getLogger("train")

EMA_DECAY = 0.998


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


class Trainer:
    """Both phases, with their state (weights, optimisers, step) saved to and restored from one file."""

    def __init__(self, args: argparse.Namespace, spec: ModelSpec):
        spec = vae_spec(spec, args)
        self.args, self.spec = args, spec
        self.text = build_text_encoder(spec, args.seed)
        self.vae = build_vae(spec, args.seed + 1)
        if args.vae_logvar_init is not None:
            with torch.no_grad():  # start with little posterior noise
                self.vae.quant_conv.bias[spec.vae.embed_dim:] = args.vae_logvar_init
        self.unet = build_unet(spec, args.seed + 2)
        self.ema = build_unet(spec, args.seed + 2).requires_grad_(False)
        self.ema.load_state_dict(self.unet.state_dict())
        use_eager_attention(self.unet)
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
        self.unet_opt = torch.optim.AdamW(self.unet.parameters(), lr=args.unet_lr, weight_decay=0.01)
        decoder = [*self.vae.decoder.parameters(), *self.vae.post_quant_conv.parameters()]
        self.decoder_opt = torch.optim.AdamW(decoder, lr=args.decoder_lr, weight_decay=0.0)
        self.sharpen_opt = torch.optim.AdamW(decoder, lr=args.sharpen_lr, weight_decay=0.0)
        self.phase, self.step = "vae", 0
        self.alphas_cumprod = DiscreteSchedule.from_config().alphas_cumprod.float()
        self.started = time.monotonic()
        self.steps_this_run = 0

    # ---- state -----------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"phase": self.phase, "step": self.step, "seed": self.args.seed, "text": self.text.state_dict(),
                "vae": self.vae.state_dict(), "vae_opt": self.vae_opt.state_dict(),
                "unet": self.unet.state_dict(), "unet_opt": self.unet_opt.state_dict(), "ema": self.ema.state_dict(),
                "decoder_opt": self.decoder_opt.state_dict(), "sharpen_opt": self.sharpen_opt.state_dict()}

    def save_state(self) -> None:
        path = Path(self.args.state)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(self.state(), tmp)
        os.replace(tmp, path)  # never leave a half-written state behind
        log.info("saved training state (%s step %d) to %s", self.phase, self.step, path)

    def load_state(self) -> None:
        state = torch.load(self.args.state, weights_only=True)
        if state["seed"] != self.args.seed:
            raise SystemExit(f"{self.args.state} was trained with --seed {state['seed']}, not {self.args.seed}")
        self.text.load_state_dict(state["text"])
        try:
            self.vae.load_state_dict(state["vae"])
        except RuntimeError as e:
            raise SystemExit(f"{self.args.state}: its VAE is not the one these flags build (--recipe, --vae-ch, "
                             f"--vae-mult, --vae-blocks): {str(e).splitlines()[1].strip()}") from None
        self.vae_opt.load_state_dict(state["vae_opt"])
        self.unet.load_state_dict(state["unet"])
        self.unet_opt.load_state_dict(state["unet_opt"])
        self.ema.load_state_dict(state["ema"])
        if "decoder_opt" in state:  # states written before the decoder phase existed have none
            self.decoder_opt.load_state_dict(state["decoder_opt"])
        if "sharpen_opt" in state:  # nor before the sharpening phase
            self.sharpen_opt.load_state_dict(state["sharpen_opt"])
        self.phase, self.step = state["phase"], state["step"]
        log.info("resumed from %s at %s step %d", self.args.state, self.phase, self.step)

    def out_of_time(self) -> bool:
        a = self.args
        if a.stop_after and self.steps_this_run >= a.stop_after:
            return True
        return a.minutes > 0 and time.monotonic() - self.started > 60 * a.minutes

    def autocast(self):
        return torch.autocast("cpu", torch.bfloat16, enabled=self.args.bf16)

    # ---- phase 1: VAE ----------------------------------------------------------------------------
    def vae_step(self) -> float:
        a = self.args
        for group in self.vae_opt.param_groups:
            group["lr"] = lr_at(self.step, a.vae_steps, a.vae_lr, min(100, a.vae_steps // 10 + 1))
        images, weights = data.vae_batch(a.seed, self.step, a.vae_batch)
        gen = torch.Generator().manual_seed(a.seed * 1_000_003 + self.step)
        with self.autocast():
            mean, logvar = self.vae.encode_moments(images)
            z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=gen)
            recon = self.vae.decode(z).float()
        loss = self.reconstruction_loss(recon, images, weights, a.vae_band or None)
        kl = 0.5 * (mean.float().square() + logvar.float().exp() - 1.0 - logvar.float()).sum(dim=(1, 2, 3)).mean()
        (loss + a.vae_kl * kl).backward()
        self.vae_opt.step()
        self.vae_opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def reconstruction_loss(self, recon: torch.Tensor, images: torch.Tensor, weights: torch.Tensor,
                            band: int | None) -> torch.Tensor:
        """Weighted L1 + MSE (`weights` from `data.vae_batch`: the shape 5x), the shape's weight extended over
        `band` pixels around it, small shapes boosted (`--vae-small-boost`) and the edge loss added
        (`--vae-edge`) when asked: every VAE and decoder phase uses it (v1: the first two off)."""
        a = self.args
        shape_weights = weights
        if band is not None:
            weights = data.band_weights(weights, band)
        if a.vae_small_boost:
            weights = data.small_shape_boost(weights, shape_weights, a.vae_small_boost)
        err = recon - images
        loss = (weights * (err.abs() + err.square())).mean()
        if a.vae_edge:
            loss = loss + a.vae_edge * data.edge_loss(recon, images, weights)
        return loss

    def decoder_step(self) -> float:
        """Decoder only, from the posterior means the UNet was trained to produce (the encoder, and so the
        latent space, stay as they are): removes the sampling noise the joint phase decoded through."""
        a = self.args
        return self._decoder_only_step(self.decoder_opt, a.decoder_steps, a.decoder_lr, phase=2,
                                       band=a.vae_band or None)  # phase 1's loss: v1 the shape alone

    def sharpen_step(self) -> float:
        """Decoder only, as `decoder_step`, with the shape's weight extended over a band around its edge."""
        a = self.args
        return self._decoder_only_step(self.sharpen_opt, a.sharpen_steps, a.sharpen_lr, phase=data.SHARPEN_PHASE,
                                       band=a.sharpen_band)

    def _decoder_only_step(self, opt: torch.optim.Optimizer, steps: int, lr: float, phase: int,
                           band: int | None) -> float:
        for group in opt.param_groups:
            group["lr"] = lr_at(self.step, steps, lr, min(50, steps // 10 + 1))
        images, weights = data.vae_batch(self.args.seed, self.step, self.args.vae_batch, phase=phase,
                                         random_colours=data.DECODER_RANDOM_COLOUR_FRACTION)
        with self.autocast():
            with torch.no_grad():
                mean = self.vae.encode(images)
            recon = self.vae.decode(mean).float()
        loss = self.reconstruction_loss(recon, images, weights, band)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    @torch.no_grad()
    def round_to_file_precision(self) -> None:
        """The VAE as a checkpoint of phases 1-4 stores it (fp16), so that phase 5 starts from the same numbers
        whether it follows phase 4 directly or starts from that file (`--from-checkpoint`)."""
        for t in self.vae.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())

    def training_metadata(self, phases_1_to_4: bool = False) -> str:
        a = self.args
        text = (f"train.train_model seed={a.seed} vae_steps={a.vae_steps} unet_steps={a.unet_steps} "
                f"decoder_steps={a.decoder_steps}")
        text += "".join(f" {k}={getattr(a, k)}" for k, v1 in V1_VALUES.items() if getattr(a, k) != v1)
        if phases_1_to_4 or not a.sharpen_steps:
            return text
        return f"{text} sharpen_steps={a.sharpen_steps} sharpen_band={a.sharpen_band} sharpen_lr={a.sharpen_lr:g}"

    @torch.no_grad()
    def load_checkpoint_file(self, path: str) -> None:
        """Start phase 5 from a file phases 1-4 wrote with this seed and these phase arguments: its EMA UNet and
        VAE are loaded; its metadata and every other tensor must be what this run would have written."""
        metadata = read_metadata(path).get("latentloom.training", "")
        if metadata != self.training_metadata(phases_1_to_4=True):
            raise SystemExit(f"--from-checkpoint {path}: its training metadata {metadata!r} is not what phases 1-4 "
                             f"of this run write ({self.training_metadata(phases_1_to_4=True)!r})")
        sd = read_state_dict(path)
        self.ema.load_state_dict(strip_prefix(sd, UNET_PREFIX))
        self.vae.load_state_dict(strip_prefix(sd, VAE_PREFIX))
        expected = checkpoint_tensors(self.ema, self.vae, self.text)
        differ = sorted(k for k, v in expected.items()
                        if k not in sd or sd[k].shape != v.shape or not torch.equal(sd[k], v.to(sd[k].dtype)))
        if differ or set(sd) != set(expected):
            raise SystemExit(f"--from-checkpoint {path}: not written by this recipe with --seed {self.args.seed} "
                             f"and --spec {self.args.spec} ({len(differ)} tensors differ, e.g. {differ[:3]})")
        self.phase, self.step = "sharpen", 0
        log.info("phases 1-4 loaded from %s; continuing with phase 5 (decoder sharpening)", path)

    @torch.no_grad()
    def load_vae_init(self, path: str) -> None:
        """Start phase 1 from the VAE of a checkpoint or training state (`--vae-init`), e.g. the v1 model's, not random
        weights: v2 continues the v1 VAE with its own loss rather than paying for the slow first thousands of
        steps again."""
        if not Path(path).is_file():
            raise SystemExit(f"--vae-init: no file at {path}")
        if path.endswith(".pt"):  # a training state (e.g. a v2 run stopped at the end of phase 1)
            vae = torch.load(path, weights_only=True)["vae"]
        else:
            vae = strip_prefix(read_state_dict(path), VAE_PREFIX)
        try:
            self.vae.load_state_dict({k: v.float() for k, v in vae.items()})
        except RuntimeError as e:
            raise SystemExit(f"--vae-init {path}: its VAE is not the one these flags build (--vae-ch, --vae-mult, "
                             f"--vae-blocks): {str(e).splitlines()[1].strip()}") from None
        log.info("phase 1 starts from the VAE of %s", path)

    # ---- phase 2: latents ------------------------------------------------------------------------
    @torch.no_grad()
    def encode_dataset(self, limit: int | None = None) -> tuple[torch.Tensor, list[shapes.Sample]]:
        """Scaled latents [N, 4, 8, 8] of the UNet's training images, and their ground truth."""
        a = self.args
        count = min(a.latents, limit or a.latents)
        latents, samples = [], []
        for start in range(0, count, 256):
            images, batch_samples = shapes.batch(a.seed, "train", range(start, min(start + 256, count)))
            with self.autocast():
                latents.append(self.vae.encode(data.to_tensor(images)).float())
            samples += batch_samples
        return torch.cat(latents) * SCALING_FACTOR, samples

    def fit_latent_scale(self) -> None:
        """Rescale the VAE so that latents * 0.18215 have unit std (done once, at the phase change)."""
        latents, _ = self.encode_dataset(limit=2048)
        factor = 1.0 / float(latents.std())
        rescale_latents(self.vae, factor)
        log.info("latent std before rescaling %.4f; VAE latents scaled by %.3f", 1.0 / factor, factor)

    # ---- phase 3: UNet ---------------------------------------------------------------------------
    def unet_step(self, latents: torch.Tensor, samples: list[shapes.Sample], captions: data.CaptionEncoder) -> float:
        a = self.args
        for group in self.unet_opt.param_groups:
            group["lr"] = lr_at(self.step, a.unet_steps, a.unet_lr, min(200, a.unet_steps // 10 + 1))
        indices, rng = data.unet_batch(a.seed, self.step, a.unet_batch, len(samples))
        context = captions.batch([data.training_caption(rng, samples[i]) for i in indices])
        gen = torch.Generator().manual_seed(a.seed * 1_000_003 + 7 + self.step)
        with self.autocast():
            loss = denoising_loss(self.unet, latents[torch.from_numpy(indices)], context, self.alphas_cumprod, gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.unet_opt.step()
        self.unet_opt.zero_grad(set_to_none=True)
        decay = min(EMA_DECAY, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.unet.parameters(), strict=True):
                e.lerp_(p, 1.0 - decay)
        return float(loss.detach())

    # ---- driver ----------------------------------------------------------------------------------
    def run_phase(self, total: int, step_fn) -> bool:
        """Steps until `total`; False when the time budget ran out first (state saved for --resume)."""
        a, losses, tick = self.args, [], time.monotonic()
        while self.step < total:
            losses.append(step_fn())
            self.step += 1
            self.steps_this_run += 1
            if self.step % a.log_every == 0 or self.step == total:
                rate = (time.monotonic() - tick) / len(losses)
                log.info("%s step %d/%d loss %.4f (%.2f s/step)", self.phase, self.step, total,
                         sum(losses) / len(losses), rate)
                losses, tick = [], time.monotonic()
            if self.step % a.save_every == 0:
                self.save_state()
            if self.out_of_time() and self.step < total:
                self.save_state()
                log.warning("budget (%s minutes, %s steps) spent at %s step %d; rerun with --resume", a.minutes,
                            a.stop_after or "any", self.phase, self.step)
                return False
        return True

    def train(self) -> bool:
        a = self.args
        if self.phase == "vae":
            self.vae.train()
            if not self.run_phase(a.vae_steps, self.vae_step):
                return False
            self.vae.eval()
            self.fit_latent_scale()
            self.phase, self.step = "unet", 0
            self.save_state()
            if self.out_of_time():  # a VAE-only run (--stop-after = --vae-steps) ends here, before any UNet step
                log.warning("budget spent at the end of phase 1; rerun with --resume")
                return False
        self.vae.eval().requires_grad_(False)
        if self.phase == "unet":
            latents, samples = self.encode_dataset()
            captions = data.CaptionEncoder(self.text, self.spec.text.num_heads)
            self.unet.train()
            if not self.run_phase(a.unet_steps, lambda: self.unet_step(latents, samples, captions)):
                return False
            self.phase, self.step = "decoder", 0
            self.save_state()
        if self.phase == "decoder":
            self.vae.decoder.train().requires_grad_(True)
            self.vae.post_quant_conv.requires_grad_(True)
            if not self.run_phase(a.decoder_steps, self.decoder_step):
                return False
            self.vae.eval().requires_grad_(False)
            self.round_to_file_precision()
            self.phase, self.step = "sharpen", 0
            self.save_state()
        if self.phase == "sharpen":
            self.vae.decoder.train().requires_grad_(True)
            self.vae.post_quant_conv.requires_grad_(True)
            if not self.run_phase(a.sharpen_steps, self.sharpen_step):
                return False
            self.vae.eval().requires_grad_(False)
            self.phase = "done"
            self.save_state()
        write_checkpoint(a.out, self.spec, self.ema, self.vae, self.text,
                         extra_metadata={"latentloom.training": self.training_metadata()})
        log.info("wrote %s (%.1f MB)", a.out, os.path.getsize(a.out) / 2**20)
        return True


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    trainer = Trainer(args, SPECS[args.spec]())
    if args.resume:
        if not Path(args.state).exists():
            raise SystemExit(f"--resume: no training state at {args.state}")
        trainer.load_state()
    elif args.recipe == "v2" and not args.vae_init:
        raise SystemExit("--recipe v2 continues a v1 model's VAE: pass --vae-init FILE (train/README.md, Recipe v2)")
    elif args.vae_init:
        trainer.load_vae_init(args.vae_init)
    elif args.from_checkpoint:
        if not Path(args.from_checkpoint).is_file():
            raise SystemExit(f"--from-checkpoint: no file at {args.from_checkpoint}")
        trainer.load_checkpoint_file(args.from_checkpoint)
    return 0 if trainer.train() else 3


if __name__ == "__main__":
    raise SystemExit(main())
