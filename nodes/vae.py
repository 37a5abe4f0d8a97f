"""VAE nodes: decode latents to images and encode images to latents, tiled variants, and the two ways of
preparing an inpainting latent."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from graph.node import Boolean, Int, Node, Output, Socket
from graph.types import CONDITIONING, IMAGE, LATENT, MASK, VAE
from nodes.estimates import vae_decode_estimate, vae_encode_estimate
from nodes.tensor_ops import as_mask_batch

DECODE_ADVICE = "use VAE Decode (Tiled) instead, a smaller batch or a smaller image"
ENCODE_ADVICE = "use VAE Encode (Tiled) instead, a smaller batch or a smaller image"
TILED_ADVICE = "use a smaller tile_size, a smaller batch or a smaller image"


def crop_to_multiple(pixels: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """Centre-crop [B, H, W, C] to sides divisible by the VAE's downscale."""
    h, w = pixels.shape[1:3]
    nh, nw = h // multiple * multiple, w // multiple * multiple
    if nh == 0 or nw == 0:
        raise ValueError(f"image of {w}x{h} is smaller than the VAE's {multiple}-pixel grid")
    top, left = (h - nh) // 2, (w - nw) // 2
    return pixels[:, top:top + nh, left:left + nw, :]


def mask_like(mask: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """The mask resized to the pixels' size, as [B, 1, H, W]."""
    mask = as_mask_batch(mask).reshape(-1, 1, *mask.shape[-2:]).float()
    return F.interpolate(mask, size=pixels.shape[1:3], mode="bilinear", align_corners=False)


def grey_out(pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Pixels under the (rounded) mask set to mid-grey, so the encoder does not see what will be repainted."""
    keep = (1 - mask.round()).movedim(1, -1)
    return (pixels[..., :3] - 0.5) * keep + 0.5


class VAEDecode(Node):
    display_name = "VAE Decode"
    category = "latent"
    inputs = [Socket("samples", LATENT), Socket("vae", VAE)]
    outputs = [Output(IMAGE)]
    memory_advice = DECODE_ADVICE

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        return vae_decode_estimate(shapes.get("samples"), shapes.get("vae"), context)

    def execute(self, samples, vae):
        return (vae.decode(samples["samples"]),)


class VAEEncode(Node):
    display_name = "VAE Encode"
    category = "latent"
    inputs = [Socket("pixels", IMAGE), Socket("vae", VAE)]
    outputs = [Output(LATENT)]
    memory_advice = ENCODE_ADVICE

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        return vae_encode_estimate(shapes.get("pixels"), shapes.get("vae"), context)

    def execute(self, pixels, vae):
        return ({"samples": vae.encode(crop_to_multiple(pixels, vae.downscale))},)


def _tile_inputs(tile_step: int) -> list[Int]:
    """ComfyUI's tiled VAE inputs; the temporal ones apply to video VAEs and are accepted for compatibility."""
    return [Int("tile_size", default=512, min=64, max=4096, step=tile_step),
            Int("overlap", default=64, min=0, max=4096, step=32),
            Int("temporal_size", default=64, min=8, max=4096, step=4, tooltip="Video VAEs only; unused here."),
            Int("temporal_overlap", default=8, min=4, max=4096, step=4, tooltip="Video VAEs only; unused here.")]


class VAEDecodeTiled(Node):
    display_name = "VAE Decode (Tiled)"
    category = "_for_testing"
    inputs = [Socket("samples", LATENT), Socket("vae", VAE), *_tile_inputs(32)]
    outputs = [Output(IMAGE)]
    memory_advice = TILED_ADVICE

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        return vae_decode_estimate(shapes.get("samples"), shapes.get("vae"), context,
                                   tile=max(1, inputs["tile_size"] // 8))

    def execute(self, samples, vae, tile_size, overlap, temporal_size=64, temporal_overlap=8):
        return (vae.decode_tiled(samples["samples"], tile_size, min(overlap, tile_size // 4)),)


class VAEEncodeTiled(Node):
    display_name = "VAE Encode (Tiled)"
    category = "_for_testing"
    inputs = [Socket("pixels", IMAGE), Socket("vae", VAE), *_tile_inputs(64)]
    outputs = [Output(LATENT)]
    memory_advice = TILED_ADVICE

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        return vae_encode_estimate(shapes.get("pixels"), shapes.get("vae"), context, tile=inputs["tile_size"])

    def execute(self, pixels, vae, tile_size, overlap, temporal_size=64, temporal_overlap=8):
        pixels = crop_to_multiple(pixels, vae.downscale)
        return ({"samples": vae.encode_tiled(pixels, tile_size, min(overlap, tile_size // 4))},)


class VAEEncodeForInpaint(Node):
    display_name = "VAE Encode (for Inpainting)"
    category = "latent/inpaint"
    description = "Encodes the image with the masked area greyed out and sets the (grown) mask as noise mask."
    inputs = [Socket("pixels", IMAGE), Socket("vae", VAE), Socket("mask", MASK),
              Int("grow_mask_by", default=6, min=0, max=64)]
    outputs = [Output(LATENT)]
    memory_advice = ENCODE_ADVICE.replace("VAE Encode (Tiled) instead, ", "")

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):  # plus the grey-out's three copies of the image
        return vae_encode_estimate(shapes.get("pixels"), shapes.get("vae"), context, host_copies=5.0,
                                   noise_mask=True)

    def execute(self, pixels, vae, mask, grow_mask_by):
        pixels = crop_to_multiple(pixels, vae.downscale)
        mask = mask_like(mask, pixels)
        grown = mask
        if grow_mask_by > 0:  # dilate with a square kernel so the repaint blends past the mask's edge
            size = grow_mask_by * 2 + 1
            grown = F.max_pool2d(mask, size, stride=1, padding=grow_mask_by).clamp(0, 1)
        latent = vae.encode(grey_out(pixels, mask))
        return ({"samples": latent, "noise_mask": grown},)


class InpaintModelConditioning(Node):
    category = "conditioning/inpaint"
    description = "For inpainting models: the masked image's latent goes into the conditioning."
    inputs = [Socket("positive", CONDITIONING), Socket("negative", CONDITIONING), Socket("vae", VAE),
              Socket("pixels", IMAGE), Socket("mask", MASK), Boolean("noise_mask", default=True)]
    outputs = [Output(CONDITIONING, "positive"), Output(CONDITIONING, "negative"), Output(LATENT, "latent")]
    memory_advice = "use a smaller batch or a smaller image"

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        """Two encodes, one after the other: the peak is one encode's, the result two latents and a mask."""
        one = vae_encode_estimate(shapes.get("pixels"), shapes.get("vae"), context, host_copies=5.0,
                                  noise_mask=inputs.get("noise_mask", True))
        if one is None:
            return None
        latent = one.outputs[0]
        batch, _, h, w = latent["samples"].shape
        mask_bytes = batch * h * w * 64 * 4  # [B, 1, H, W] float32, in the conditioning and the latent alike
        return dataclasses.replace(one, outputs=(None, None, latent),
                                   kept_bytes=2 * latent["samples"].nbytes + mask_bytes)

    def execute(self, positive, negative, vae, pixels, mask, noise_mask):
        pixels = crop_to_multiple(pixels, vae.downscale)
        mask = mask_like(mask, pixels)
        original = vae.encode(pixels)
        concat = vae.encode(grey_out(pixels, mask))
        extra = {"concat_latent_image": concat, "concat_mask": mask}
        latent = {"samples": original}
        if noise_mask:
            latent["noise_mask"] = mask
        return ([(t, {**o, **extra}) for t, o in positive], [(t, {**o, **extra}) for t, o in negative], latent)


NODE_CLASSES = [VAEDecode, VAEEncode, VAEDecodeTiled, VAEEncodeTiled, VAEEncodeForInpaint, InpaintModelConditioning]
