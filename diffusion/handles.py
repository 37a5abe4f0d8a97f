"""The three objects a workflow passes around: the diffusion model (MODEL), the text encoders (CLIP) and
the autoencoder (VAE), each a thin handle over shared modules plus its own options and weight patches.

Cloning a handle is cheap: clones share the modules and differ in patches (LoRA) or options (clip skip),
which is what lets a graph branch with and without a LoRA while the checkpoint is loaded once. A
`ModelManager` puts the modules on the compute device, with the right patches, while they run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from .checkpoints.families import ModelFamily
from .checkpoints.loader import LoadedCheckpoint
from .memory import ModelManager
from .models.attention import attention_budget
from .models.clip_vision import ClipVisionOutput, encode_image
from .models.text_encoders import TextEncoders
from .models.unclip import NoiseAugmentor, revision_pooled, unclip_adm
from .models.unet import sdxl_adm, sdxl_refiner_adm
from .models.vae import AutoencoderKL
from .patches.comfy_model import ComfyClipMethods, ComfyModelMethods
from .patches.comfy_options import FunctionWrapped, clone_options, guidance_hooks, transformer_patches
from .patches.context_bias import patches_bias
from .patches.control import ControlNetHandle, ControlRows, control_residuals, residual_patches, uncond_control
from .patches.patcher import ModelPatcher
from .patches.unet_patches import UNetPatches
from .preview import (
    PreviewBudget,
    PreviewCache,
    fit_latent_rgb_projection,
    latent_preview_image,
    tiny_decoder_preview_image,
)
from .sampling.guidance import CFGGuider, Conditioning, GuidanceHooks
from .sampling.model_sampling import ContinuousModelSampling, Denoiser, ModelSampling, discrete_model_sampling
from .sampling.schedules import DiscreteSchedule

log = logging.getLogger(__name__)

PREDICTIONS = {"eps": "eps", "v": "v_prediction"}


@dataclasses.dataclass
class DiffusionModel(ComfyModelMethods):
    """MODEL: the UNet with its noise schedule and prediction type. ComfyUI node packs patch it through
    `model_options` and ModelPatcher's method names (patches/comfy_model.py, patches/comfy_options.py)."""

    patcher: ModelPatcher
    family: ModelFamily
    model_sampling: ModelSampling
    manager: ModelManager
    dtype: torch.dtype
    # Encodes images to raw latents; the preview projection is fitted to it once and shared by clones.
    preview_encode: Callable[[Tensor], Tensor] | None = None
    # How guidance combines its predictions (model patches add hooks to a clone: `with_guidance_hooks`); the
    # guider runs these and then those of `model_options` (the property `guidance_hooks`).
    node_hooks: GuidanceHooks = dataclasses.field(default_factory=GuidanceHooks)
    # Hooks in the UNet's forward (FreeU, deep shrink, attention patches); a clone adds to them: `with_unet_patches`.
    unet_patches: UNetPatches = dataclasses.field(default_factory=UNetPatches)
    # Differential Diffusion: (sigma, mask, sigmas, model_sampling) -> the inpainting mask of each step.
    denoise_mask_fn: Callable[[Tensor, Tensor, Tensor, ModelSampling], Tensor] | None = None
    # SD2.1 unCLIP: noises the image embeddings of unCLIPConditioning into the UNet's ADM input.
    noise_augmentor: NoiseAugmentor | None = None
    # Runs the UNet call instead of calling it (`wrapper(unet, x, t, context, y, **patches)`): DeepCache.
    unet_wrapper: Callable[..., Tensor] | None = None
    # Loads the TAESD-style tiny decoder previews use instead of the linear map (diffusion/models/taesd.py); set by
    # the checkpoint loaders when the preview method and a decoder file allow it; None: the linear map.
    preview_decoder: Callable[[], torch.nn.Module] | None = None
    # Where the fitted linear preview map is kept by the VAE encoder's digest (set by the checkpoint loaders); None:
    # fitted again in every process.
    preview_cache: PreviewCache | None = None
    # ComfyUI's model_options as node packs set them (patches/comfy_options.py); read at every call.
    model_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    _preview: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def guidance_hooks(self) -> GuidanceHooks:
        """Our model patches' guidance hooks, then those of the packs' model_options."""
        return self.node_hooks.merged(guidance_hooks(self.model_options, self.model))

    def with_guidance_hooks(self, hooks: GuidanceHooks) -> DiffusionModel:
        """A clone whose guider also runs `hooks` (a `combine` replaces an earlier one; `post` hooks add up)."""
        return dataclasses.replace(self.clone(), node_hooks=self.node_hooks.merged(hooks))

    def with_unet_patches(self, patches: UNetPatches) -> DiffusionModel:
        """A clone whose UNet calls also run `patches` (after the ones it already has); the original is unchanged."""
        return dataclasses.replace(self.clone(), unet_patches=self.unet_patches.merged(patches))

    def with_unet_wrapper(self, wrapper: Callable[..., Tensor]) -> DiffusionModel:
        """A clone whose UNet calls go through `wrapper(unet, x, t, context, y, patches=..., sigmas=...)` (one
        wrapper: a later one replaces an earlier one, as ComfyUI's set_model_unet_function_wrapper)."""
        return dataclasses.replace(self.clone(), unet_wrapper=wrapper)

    def with_model_sampling(self, model_sampling: ModelSampling) -> DiffusionModel:
        """A clone that samples with another schedule or prediction type (ModelSamplingDiscrete)."""
        return dataclasses.replace(self.clone(), model_sampling=model_sampling)

    def clone(self) -> DiffusionModel:
        return dataclasses.replace(self, patcher=self.patcher.clone(), model_options=clone_options(self.model_options))

    @property
    def latent_scale(self) -> float:
        """LATENTs hold the VAE's raw latents (as in ComfyUI, so any VAE fits any model); the model samples
        in its own scaled space: `latent * latent_scale`."""
        return self.family.scaling_factor

    @property
    def device(self) -> torch.device:
        return self.manager.device

    def extra_cond(self, options: dict[str, Any], x: Tensor) -> dict[str, Tensor]:
        """The SDXL `y` vector (pooled text embedding + size/crop/aesthetic embeddings) for one entry; for SD2.1
        unCLIP the noised image embeddings of `unclip_conditioning`; on SDXL those stand in for the pooled text."""
        adm = self.family.unet.adm_in_channels
        unclip = options.get("unclip_conditioning")
        if self.family.unclip and self.noise_augmentor is not None:
            return {"y": unclip_adm(unclip or [], self.noise_augmentor)}
        if adm is None:
            if unclip:
                raise ValueError(f"unCLIPConditioning does not apply to a {self.family.title} model: its UNet has no "
                                 f"image-embedding input (use an SD2.1 unCLIP checkpoint, or SDXL for revision)")
            return {}
        height, width = x.shape[-2] * 8, x.shape[-1] * 8
        refiner = self.family.name == "sdxl_refiner"
        pooled = options.get("pooled_output")
        if unclip:
            pooled = revision_pooled(unclip, None if pooled is None else pooled.shape[-1])
        if pooled is None:
            raise ValueError(f"{self.family.title} conditioning needs a pooled text embedding; encode the prompt "
                             f"with this checkpoint's CLIP")
        common = {"width": options.get("width", width), "height": options.get("height", height)}
        if refiner:
            y = sdxl_refiner_adm(pooled, common["width"], common["height"], options.get("aesthetic_score", 6.0),
                                 crop_w=options.get("crop_w", 0), crop_h=options.get("crop_h", 0),
                                 adm_in_channels=adm)
        else:
            y = sdxl_adm(pooled, common["width"], common["height"], options.get("crop_w", 0),
                         options.get("crop_h", 0), options.get("target_width", common["width"]),
                         options.get("target_height", common["height"]), adm_in_channels=adm)
        return {"y": y}

    def preview_image(self, x0: Tensor) -> Image.Image | None:
        """A fast RGB preview of a denoised estimate in the model's (scaled) latent space."""
        if self.preview_decoder is not None and "decoder" not in self._preview:
            try:  # in the UNet's dtype, channels-last: bf16 where the device computes in it (half the time)
                decoder = self.preview_decoder().to(self.dtype, memory_format=torch.channels_last)
                self._preview.update(decoder=decoder, budget=PreviewBudget())
            except (ValueError, OSError) as exc:  # a bad file costs the preview its decoder, never the run
                log.warning("preview decoder: %s; previews use latent2rgb", exc)
                self._preview["decoder"] = None
        if self.preview_decoder is not None and self._preview["decoder"] is not None:
            budget = self._preview["budget"]
            if not budget.allows():  # the decoder would cost more than its share of the steps: skip this frame
                return None
            started = time.perf_counter()
            image = tiny_decoder_preview_image(x0[:1].detach().cpu(), self._preview["decoder"])
            budget.spend(time.perf_counter() - started)
            return image
        if self.preview_encode is None:
            return None
        if "projection" not in self._preview:
            self._preview["projection"] = (fit_latent_rgb_projection(self.preview_encode) if self.preview_cache is None
                                           else self.preview_cache.projection(self.preview_encode))
        return latent_preview_image(x0[:1].float().cpu() / self.latent_scale, self._preview["projection"])

    @contextlib.contextmanager
    def denoiser(self, concat: Tensor | None = None) -> Iterator[Denoiser]:
        """`D(x, sigma, context=..., y=...)` with the UNet on the compute device while the block runs.
        `concat` ([1|B, C, h, w]) is appended to the input channels (inpainting models)."""
        # attentions that cannot take SDPA's fused kernels split their queries to fit the free memory
        with self.manager.use([self.patcher]) as (unet,), attention_budget(self.manager.working_memory()):
            device, dtype = self.manager.device, self.dtype

            def net(x_in: Tensor, t: Tensor, context: Tensor, y: Tensor | None = None,
                    unet_patches: UNetPatches | None = None, sigma: Tensor | None = None,
                    control: ControlRows | None = None, transformer_options: dict[str, Any] | None = None
                    ) -> Tensor:
                """`unet_patches` adds patches for this call only (e.g. guidance's perturbed prediction); the
                patches see `sigma` (the sampler's, not the quantized timestep's). `control` (from the guider:
                each entry's ControlNet chain and its rows) adds ControlNet residuals, run before other hooks.
                `transformer_options` (a pack's function wrapper passes its own) replaces model_options' for
                this call; its patches run after ours."""
                if transformer_options is None:
                    transformer_options = self.model_options.get("transformer_options")
                patches = self.unet_patches.merged(unet_patches).merged(transformer_patches(transformer_options))
                if control is not None:
                    residuals = control_residuals(control, x_in, t, context, y, sigma, self.model_sampling,
                                                  self._check_control, model=self, bias=patches_bias(unet_patches))
                    if residuals is not None:
                        patches = residual_patches(residuals).merged(patches)
                extra = {"patches": patches, "sigmas": sigma} if patches else {}
                if concat is not None:
                    if concat.shape[-2:] != x_in.shape[-2:]:
                        raise ValueError("area conditioning is not supported with inpainting models")
                    x_in = torch.cat([x_in, concat.to(x_in).repeat(x_in.shape[0] // concat.shape[0], 1, 1, 1)], 1)
                run = unet if self.unet_wrapper is None else functools.partial(self.unet_wrapper, unet)
                out = run(x_in.to(device, dtype), t.to(device), context.to(device, dtype),
                          None if y is None else y.to(device, dtype), **extra)
                return out.float()

            denoiser = Denoiser(net, self.model_sampling, pass_sigma=True)
            wrapper = self.model_options.get("model_function_wrapper")
            if wrapper is not None:
                denoiser = FunctionWrapped(denoiser, wrapper, self.model_options.get("transformer_options") or {})
            yield denoiser

    def _check_control(self, handle: ControlNetHandle) -> None:
        handle.check_fits(self.family.name, self.family.title, self.family.unet)

    def guider(self, denoiser: Denoiser, positive: Conditioning, negative: Conditioning, cfg: float) -> CFGGuider:
        negative = uncond_control(positive, negative)  # old ControlNetApply's chains reach the uncond half too
        return CFGGuider(denoiser, self.model_sampling, positive, negative, cfg, extra_cond=self.extra_cond,
                         hooks=self.guidance_hooks)

    def inpaint_concat(self, latent: Tensor, noise_mask: Tensor | None, positive: Conditioning) -> Tensor | None:
        """The extra input channels of an inpainting UNet: the mask and the masked image's latent (raw
        latents in, scaled like the model's input), from InpaintModelConditioning's options when present,
        else from the latent and its noise mask."""
        if not self.family.inpaint:
            return None
        for _, options in positive:
            if "concat_latent_image" in options:
                image = options["concat_latent_image"]
                mask = options.get("concat_mask", torch.ones_like(image[:, :1]))
                break
        else:
            image = latent
            mask = noise_mask if noise_mask is not None else torch.ones_like(latent[:, :1])
        mask = torch.nn.functional.interpolate(mask.reshape(-1, 1, *mask.shape[-2:]).float(),
                                               size=latent.shape[-2:], mode="bilinear")
        extra = self.family.unet.in_channels - latent.shape[1]
        concat = torch.cat([mask, image.to(mask) * self.latent_scale], dim=1)
        if concat.shape[1] != extra:
            raise ValueError(f"inpainting UNet expects {extra} extra channels, got {concat.shape[1]}")
        return concat


@dataclasses.dataclass
class ClipModel(ComfyClipMethods):
    """CLIP: the family's text encoders, their LoRA patches and the clip skip (ComfyUI's CLIP methods for node
    packs: patches/comfy_model.py)."""

    text: TextEncoders
    patchers: dict[str, ModelPatcher]
    manager: ModelManager

    def clone(self) -> ClipModel:
        return ClipModel(self.text.clone(), {k: p.clone() for k, p in self.patchers.items()}, self.manager)

    def with_clip_skip(self, layer: int) -> ClipModel:
        clone = self.clone()
        clone.text.clip_skip = layer
        return clone

    def encode(self, text: str | dict[str, str]) -> tuple[Tensor, Tensor]:
        """(cond [1, 77·k, dim], pooled [1, dim]) on the CPU, in fp32. `text` may give each encoder its own
        prompt ({"g": ..., "l": ...} for SDXL); their chunk lists are padded to equal length."""
        return self.encode_from_tokens(self.tokenize(text), return_pooled=True)

    def tokenize(self, text: str | dict[str, str], return_word_ids: bool = False) -> dict[str, list]:
        """Weighted token chunks per encoder, `{"l": [[(token, weight), ...], ...], "g": ...}` (ComfyUI's shape)."""
        texts = text if isinstance(text, dict) else dict.fromkeys(self.text.encoders, text)
        return {name: self.text.tokenize(texts[name])[name] for name in self.text.encoders}

    def encode_from_tokens(self, tokens: dict[str, list], return_pooled: bool = False,
                           return_dict: bool = False) -> Any:
        """cond, or (cond, pooled), or ComfyUI's `{"cond", "pooled_output"}`, from `tokenize`'s chunks (padded
        to equal length across encoders)."""
        chunks = dict(tokens)
        longest = max(len(c) for c in chunks.values())
        for name, encoder in self.text.encoders.items():
            chunks[name] = chunks[name] + [encoder.empty_chunk()] * (longest - len(chunks[name]))
        with self.manager.use(list(self.patchers.values())), torch.no_grad():
            cond, pooled = self.text.encode_chunks(chunks)
        cond, pooled = cond.float().cpu(), pooled.float().cpu()
        if return_dict:
            return {"cond": cond, "pooled_output": pooled}
        return (cond, pooled) if return_pooled else cond

    def encode_from_tokens_scheduled(self, tokens: dict[str, list]) -> Conditioning:
        """A CONDITIONING of one entry, as ComfyUI's CLIPTextEncode makes it."""
        cond, pooled = self.encode_from_tokens(tokens, return_pooled=True)
        return [(cond, {"pooled_output": pooled})]


OUT_OF_MEMORY_WORDS = ("out of memory", "can't allocate memory", "not enough memory")  # CUDA, CPU (Linux, Windows)


def _out_of_memory(exc: BaseException) -> bool:
    message = str(exc).lower()
    return isinstance(exc, torch.OutOfMemoryError) or any(words in message for words in OUT_OF_MEMORY_WORDS)


@dataclasses.dataclass
class VAEModel:
    """VAE: the KL autoencoder. Images are [B, H, W, 3] in 0..1; latents are the VAE's raw latents (the
    diffusion model applies its own scaling factor)."""

    patcher: ModelPatcher
    manager: ModelManager
    dtype: torch.dtype
    downscale: int = 8
    memory_per_pixel: int = 2400  # rough bytes of activations per output pixel when decoding, fp32

    @property
    def vae(self) -> AutoencoderKL:
        return self.patcher.model

    def image_bytes(self, pixels: int) -> int:
        """Estimated activation memory to decode or encode one image of `pixels` output pixels."""
        return max(1, pixels * self.memory_per_pixel * torch.finfo(self.dtype).bits // 32)

    def _batches(self, count: int, pixels: int) -> int:
        """How many images to run at once, from the device's free memory."""
        return max(1, min(count, int(self.manager.available() // self.image_bytes(pixels))))

    def _run(self, fn: Callable[[Tensor], Tensor], tiled: Callable[[Tensor], Tensor], x: Tensor,
             out_pixels: int) -> Tensor:
        with self.manager.use([self.patcher]), torch.no_grad(), attention_budget(self.manager.working_memory()):
            device = self.manager.device
            step = self._batches(x.shape[0], out_pixels)
            outputs = []
            try:
                for i in range(0, x.shape[0], step):
                    outputs.append(fn(x[i:i + step].to(device, self.dtype)).float().cpu())
            except (RuntimeError, torch.OutOfMemoryError) as exc:
                if not _out_of_memory(exc):
                    raise
                log.warning("VAE ran out of memory; retrying tile by tile")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                outputs = [tiled(x[i:i + 1].to(device, self.dtype)).float().cpu() for i in range(x.shape[0])]
            return torch.cat(outputs)

    def spacial_compression_decode(self) -> int:
        """Pixels per latent pixel (ComfyUI's name, spelling included: packs size their tiles with it)."""
        return self.downscale

    def spacial_compression_encode(self) -> int:
        return self.downscale

    def decode(self, samples: Tensor) -> Tensor:
        z = samples
        pixels = z.shape[-1] * z.shape[-2] * self.downscale**2
        tile = min(64, max(8, max(z.shape[-2:]) // 2))  # latent units; at most half the image per tile

        def tiled(x: Tensor) -> Tensor:
            return self.vae.decode_tiled(x, tile=tile, overlap=tile // 4)

        images = self._run(self.vae.decode, tiled, z, pixels)
        return ((images + 1) / 2).clamp(0, 1).movedim(1, -1)

    def decode_tiled(self, samples: Tensor, tile: int, overlap: int) -> Tensor:
        """`tile` and `overlap` in pixels (as the ComfyUI node takes them)."""
        z = samples
        t, o = max(1, tile // self.downscale), overlap // self.downscale

        def run(x: Tensor) -> Tensor:
            return self.vae.decode_tiled(x, tile=t, overlap=o)

        images = self._run(run, run, z, t * t * self.downscale**2)
        return ((images + 1) / 2).clamp(0, 1).movedim(1, -1)

    def encode(self, images: Tensor) -> Tensor:
        x = images[..., :3].movedim(-1, 1) * 2 - 1
        tile = min(512, max(64, max(x.shape[-2:]) // 2))  # pixels; at most half the image per tile

        def tiled(batch: Tensor) -> Tensor:
            return self.vae.encode_tiled(batch, tile=tile, overlap=tile // 8)

        return self._run(self.vae.encode, tiled, x, x.shape[-1] * x.shape[-2])

    def encode_tiled(self, images: Tensor, tile: int, overlap: int) -> Tensor:
        x = images[..., :3].movedim(-1, 1) * 2 - 1

        def run(batch: Tensor) -> Tensor:
            return self.vae.encode_tiled(batch, tile=tile, overlap=overlap)

        return self._run(run, run, x, tile * tile)


def model_sampling_for(family: ModelFamily) -> ModelSampling:
    """SD's discrete schedule (scaled-linear betas 0.00085 → 0.012 over 1000 steps) and the prediction type;
    for a checkpoint marked `ztsnr`, that schedule rescaled to zero terminal SNR; for one marked `edm_vpred`
    (CosXL), continuous-time EDM v-prediction between its sigmas (what ModelSamplingContinuousEDM would set)."""
    if family.continuous is not None:
        return ContinuousModelSampling("v_prediction", *family.continuous, sigma_data=1.0)
    if family.zsnr:
        return discrete_model_sampling(PREDICTIONS[family.prediction], zsnr=True)
    return ModelSampling(DiscreteSchedule.from_config(), PREDICTIONS[family.prediction])


def wrap_checkpoint(loaded: LoadedCheckpoint, manager: ModelManager, name: str = "checkpoint",
                    offload_device: torch.device | str = "cpu") -> tuple[DiffusionModel, ClipModel, VAEModel]:
    """The MODEL, CLIP and VAE handles of a loaded checkpoint, managed by `manager`."""
    device = manager.device
    unet_dtype = next(loaded.unet.parameters()).dtype
    vae_dtype = next(loaded.vae.parameters()).dtype
    vae = VAEModel(ModelPatcher(loaded.vae, device, offload_device, name=f"{name} vae"), manager, vae_dtype,
                   loaded.family.vae.downscale)
    model = DiffusionModel(ModelPatcher(loaded.unet, device, offload_device, name=f"{name} unet"), loaded.family,
                           model_sampling_for(loaded.family), manager, unet_dtype, preview_encode=vae.encode)
    clip = ClipModel(loaded.text, {key: ModelPatcher(enc.model, device, offload_device, name=f"{name} clip_{key}")
                                   for key, enc in loaded.text.encoders.items()}, manager)
    model.noise_augmentor = loaded.noise_augmentor
    return model, clip, vae


@dataclasses.dataclass
class ClipVisionModel:
    """CLIP_VISION: a CLIP image encoder (models/clip_vision.py) that the model manager loads and evicts like
    any other model."""

    patcher: ModelPatcher
    manager: ModelManager

    def encode(self, image: Tensor, crop: bool = True, pixel_mask: Tensor | None = None) -> ClipVisionOutput:
        """CLIP_VISION_OUTPUT of IMAGE [B, H, W, C]; `crop` False squeezes instead of cutting the middle;
        `pixel_mask` multiplies the preprocessed pixels (`encode_image`)."""
        with self.manager.use([self.patcher]) as (model,):
            return encode_image(model, image, crop, pixel_mask)
