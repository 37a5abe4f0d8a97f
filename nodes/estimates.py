"""Memory estimates for the node families: tensor shapes, and the activation peaks of the UNet and the VAE.

The peaks come from walking each model's forward pass the way it runs under `torch.no_grad()` in
diffusion/: which tensors are alive at once, block by block (the skip connections the UNet keeps until its
output side, a ResBlock's input with its norm and SiLU copies, the feed-forward's 8×-wide projection, a
decoder's 256-channel maps at full resolution). Counts are in elements per pixel of the level they run at,
times the batch and the dtype's size. Attention scores are not counted: every attention here is
`F.scaled_dot_product_attention`, whose CPU (flash) and CUDA (flash / memory-efficient) kernels work in
blocks and never hold the (HW)² score matrix, given q, k and v with each row contiguous, as the UNet and the VAE
pass them. Elsewhere (MPS) the math path's scores are counted, split along the queries as
diffusion/models/attention.py splits them (see _vae_attention).

Models are not known before they load, so the MODEL and VAE shapes default to the released architectures:
every SD VAE has the same one, and for the UNet the smaller of SD1/SD2's and SDXL's peaks is used (an
estimate must not refuse what fits). A loader that declares a `UNetConfig` or `VAEConfig` as its output
shape makes these exact for its model.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

from diffusion.models.attention import FUSED_DEVICES, scores_bytes
from diffusion.models.unet import UNetConfig
from diffusion.models.vae import VAEConfig
from graph.memory_estimate import EstimateContext, MemoryEstimate, TensorSpec
from nodes.image_limits import DEFAULT_MAX_FRAMES, frame_sizes

log = logging.getLogger(__name__)

HOST_ITEMSIZE = 4  # IMAGE, MASK and LATENT tensors are float32 on the host
LATENT_CHANNELS = 4
SD_UNETS = (UNetConfig.sd1(), UNetConfig.sdxl())
SD_VAE = VAEConfig()
VAE_TILE_FALLBACK = 64  # latent units: diffusion.handles.VAEModel.decode's tile when a whole image does not fit
# SDPA's math path, per score: the scores, their softmax and a scaled copy, in float32 whatever the inputs' dtype
# (PyTorch reduces half precision in fp32 there unless allow_fp16_bf16_reduction_math_sdp is set)
ATTENTION_SCORE_BYTES = 9


def image_spec(batch: int, height: int, width: int, channels: int = 3) -> TensorSpec:
    return TensorSpec((batch, height, width, channels), HOST_ITEMSIZE)


def mask_spec(batch: int, height: int, width: int) -> TensorSpec:
    return TensorSpec((batch, height, width), HOST_ITEMSIZE)


def latent_shape(batch: int, height: int, width: int, noise_mask: TensorSpec | None = None) -> dict[str, Any]:
    """A LATENT's shape: `samples` [B, 4, h, w] (latent units) and its noise mask when it has one."""
    shape: dict[str, Any] = {"samples": TensorSpec((batch, LATENT_CHANNELS, height, width), HOST_ITEMSIZE)}
    if noise_mask is not None:
        shape["noise_mask"] = noise_mask
    return shape


def samples_of(latent: Any) -> TensorSpec | None:
    """The `samples` spec of a LATENT shape, or None when it is unknown."""
    if isinstance(latent, dict) and isinstance(latent.get("samples"), TensorSpec):
        spec = latent["samples"]
        return spec if len(spec.shape) == 4 else None
    return None


def tensor_of(value: Any, ndim: int) -> TensorSpec | None:
    """An IMAGE (ndim 4) or MASK (ndim 3) spec, or None when unknown or not that kind."""
    return value if isinstance(value, TensorSpec) and len(value.shape) == ndim else None


@functools.lru_cache(maxsize=64)
def _itemsize(device: str, for_vae: bool, precisions: tuple[str | None, str | None, str | None] = (None,) * 3) -> int:
    from diffusion.devices import model_dtype

    precision, unet_precision, vae_precision = precisions
    try:
        return model_dtype(device, "vae" if for_vae else "unet", precision=precision, unet_precision=unet_precision,
                           vae_precision=vae_precision).itemsize
    except Exception as exc:  # no such device here (a planning host without the GPU): the usual choice
        log.debug("no dtype for %s (%s); assuming the usual one", device, exc)
        return 4 if device.startswith("cpu") or for_vae else 2


def compute_itemsize(context: EstimateContext, for_vae: bool = False) -> int:
    """Bytes per element of model activations on the prompt's device: the precision flags the environment holds
    (--force-fp32, --bf16-unet, ...), else the device's rule (diffusion.devices.model_dtype)."""
    env = context.env
    precisions = tuple(getattr(env, name, None) for name in ("precision", "unet_precision", "vae_precision"))
    return _itemsize(context.device, for_vae, precisions)


def _norm_peak(itemsize: int, device_type: str) -> float:
    """Elements per channel a GroupNorm32 holds at its peak: its output in fp32; below fp32 it normalises a float32
    copy into a float32 result (8 bytes a value) before casting back, except on the CPU, where torch's 16-bit kernel
    normalises the input as it is (diffusion.models.unet_blocks.native_group_norm) but still holds float32
    temporaries: 6 bytes a value fits the measured peaks of tiled and untiled VAE decodes (tests/nodes/
    test_memory_estimates.py) at two threads; at one thread a tiled decode's peak is lower (estimate 1.35x)."""
    return 1.0 if itemsize >= 4 else 6 / itemsize if device_type == "cpu" else 8 / itemsize


class _Walk:
    """Tracks the live elements of a forward pass: `held` (tensors kept across blocks), and the peak of
    held + a block's transient tensors."""

    def __init__(self, conv_copy: float) -> None:
        self.held = 0.0
        self.peak = 0.0
        self.conv_copy = conv_copy  # the CPU's oneDNN convolutions reorder their input into a blocked copy

    def need(self, transient: float) -> None:
        self.peak = max(self.peak, self.held + transient)


def _resblock(walk: _Walk, c_in: int, c_out: int, n: float, norm: float) -> None:
    """A ResBlock on a held input of c_in channels over n positions: its norm and SiLU copies live together
    (2·c_in), the conv reads the SiLU while writing its output, and the output side holds h, the skip and the
    sum."""
    skip = c_out if c_in != c_out else 0
    walk.need(n * max(norm * c_in, 2 * c_in, c_in * (1 + walk.conv_copy) + c_out,
                      c_out * max(1 + norm, 3 + walk.conv_copy) + skip))


def _transformer(walk: _Walk, c: int, n: float) -> None:
    """A SpatialTransformer on a held input: the running x plus its feed-forward (norm, the GEGLU projection
    to 8·c, the GELU of its gate half and their product: 17·c) is its peak; attention needs less."""
    walk.need(n * 19 * c)


def unet_peak_elements(config: UNetConfig, height: int, width: int, conv_copy: float = 0.0,
                       norm: float = 1.0) -> float:
    """Peak live activation elements of one UNet forward for one batch entry on a height × width latent."""
    walk = _Walk(conv_copy)
    mc, levels = config.model_channels, len(config.channel_mult)
    sizes = [(math.ceil(height / 2**i), math.ceil(width / 2**i)) for i in range(levels)]
    n = [h * w for h, w in sizes]
    walk.need(n[0] * (config.in_channels + mc * (1 + conv_copy)))
    skips: list[float] = [n[0] * mc]  # the running h is the last skip on the input side
    walk.held = skips[0]
    channels = [mc]
    c_in = mc
    for i, mult in enumerate(config.channel_mult):
        c = mc * mult
        for _ in range(config.num_res_blocks):
            _resblock(walk, c_in, c, n[i], norm)
            if config.transformer_depth[i]:
                walk.held += n[i] * c
                _transformer(walk, c, n[i])
                walk.held -= n[i] * c
            skips.append(n[i] * c)
            channels.append(c)
            walk.held += skips[-1]
            c_in = c
        if i != levels - 1:
            walk.need(n[i] * c * walk.conv_copy + n[i + 1] * c)
            skips.append(n[i + 1] * c)
            channels.append(c)
            walk.held += skips[-1]
    deepest = n[-1]
    _resblock(walk, c_in, c_in, deepest, norm)
    walk.held += deepest * c_in
    _transformer(walk, c_in, deepest)
    _resblock(walk, c_in, c_in, deepest, norm)
    current = deepest * c_in
    for i in reversed(range(levels)):
        c = mc * config.channel_mult[i]
        for block in range(config.num_res_blocks + 1):
            skip, skip_c = skips.pop(), channels.pop()
            width_in = c_in + skip_c
            concat = n[i] * width_in
            walk.need(current + concat)  # made while both halves live; the caller holds it through the block
            walk.held += concat - current - skip
            _resblock(walk, width_in, c, n[i], norm)
            walk.held += n[i] * c
            if config.transformer_depth[i]:
                _transformer(walk, c, n[i])
            upsample = i and block == config.num_res_blocks
            if upsample:  # nearest-neighbour x2, then a conv
                walk.need(2 * n[i - 1] * c + n[i - 1] * c * walk.conv_copy)
            current = n[i - 1 if upsample else i] * c
            walk.held += current - concat - n[i] * c
            c_in = c
    walk.need(n[0] * max(norm * c_in, (2 + conv_copy) * c_in))
    return walk.peak


def unet_bytes(config: UNetConfig | None, batch: int, height: int, width: int, itemsize: int, device_type: str) -> int:
    """Activation bytes of one UNet call on `batch` entries (cond and uncond together count twice)."""
    conv_copy = 1.0 if device_type == "cpu" else 0.0
    configs = [config] if config is not None else SD_UNETS
    norm = _norm_peak(itemsize, device_type)
    per_entry = min(unet_peak_elements(c, height, width, conv_copy, norm) for c in configs)
    return int(per_entry * batch * itemsize)


def _vae_attention(walk: _Walk, c: int, n: float, itemsize: int, device_type: str, budget: int | None = None) -> None:
    """The VAE's mid-block attention: one head as wide as the block, over every latent position. Its q, k and v
    reach SDPA contiguous (diffusion/models/vae.py), which the fused kernels of CPUs and CUDA take: no (HW)^2
    scores. Elsewhere (MPS) SDPA's math path holds them (ATTENTION_SCORE_BYTES a score), split along the queries
    to fit `budget` bytes when one is given (diffusion/models/attention.py; the model manager gives its free
    memory at run time)."""
    scores = scores_bytes(1, 1, int(n), int(n), budget, device_type in FUSED_DEVICES, ATTENTION_SCORE_BYTES)
    walk.need(n * 8 * c + 3 * n * c + scores / itemsize)  # the contiguous q, k, v copies


def vae_decode_elements(config: VAEConfig, height: int, width: int, itemsize: int, device_type: str,
                        budget: int | None = None) -> float:
    """Peak live elements of decoding one latent of height × width (latent units) to an image (`budget`: the
    attention's, where it takes SDPA's math path; see _vae_attention)."""
    walk = _Walk(1.0 if device_type == "cpu" else 0.0)
    norm = _norm_peak(itemsize, device_type)
    levels = len(config.ch_mult)
    n = float(height * width)
    c = config.ch * config.ch_mult[-1]
    walk.held = n * (config.embed_dim + config.z_channels)
    walk.need(n * c * (1 + walk.conv_copy))
    walk.held += n * c
    _resblock(walk, c, c, n, norm)
    _vae_attention(walk, c, n, itemsize, device_type, budget)
    _resblock(walk, c, c, n, norm)
    for i in reversed(range(levels)):
        c_out = config.ch * config.ch_mult[i]
        for _ in range(config.num_res_blocks + 1):
            _resblock(walk, c, c_out, n, norm)
            walk.held += n * (c_out - c)
            c = c_out
        if i:
            walk.need(2 * 4 * n * c + 4 * n * c * walk.conv_copy)
            walk.held += 3 * n * c
            n *= 4
    walk.need(n * max(norm * c, (2 + walk.conv_copy) * c + config.out_ch))
    return walk.peak


def vae_encode_elements(config: VAEConfig, height: int, width: int, itemsize: int, device_type: str) -> float:
    """Peak live elements of encoding one height × width image (pixels) to a latent (see _vae_attention)."""
    walk = _Walk(1.0 if device_type == "cpu" else 0.0)
    norm = _norm_peak(itemsize, device_type)
    n = float(height * width)
    c = config.ch
    walk.held = n * config.in_channels
    walk.need(n * c * (1 + walk.conv_copy))
    walk.held += n * c
    for i, mult in enumerate(config.ch_mult):
        c_out = config.ch * mult
        for _ in range(config.num_res_blocks):
            _resblock(walk, c, c_out, n, norm)
            walk.held += n * (c_out - c)
            c = c_out
        if i != len(config.ch_mult) - 1:  # the one-pixel pad is a full copy, then a stride-2 conv
            walk.need(n * c * (1 + walk.conv_copy) + n * c / 4)
            walk.held -= 0.75 * n * c
            n /= 4
    _resblock(walk, c, c, n, norm)
    _vae_attention(walk, c, n, itemsize, device_type)
    walk.need(n * max(norm * c, (2 + walk.conv_copy) * c + 2 * config.z_channels))
    return walk.peak


def vae_config(shape: Any) -> VAEConfig:
    return shape if isinstance(shape, VAEConfig) else SD_VAE


def unet_config(shape: Any) -> UNetConfig | None:
    return shape if isinstance(shape, UNetConfig) else None


def resized(height: int, width: int, to_width: int, to_height: int) -> tuple[int, int]:
    """(height, width) after tensor_ops.resize: a side of 0 keeps the aspect ratio from the other one."""
    if to_width == 0 and to_height == 0:
        return height, width
    if to_width == 0:
        return to_height, max(1, round(width * to_height / height))
    if to_height == 0:
        return max(1, round(height * to_width / width)), to_width
    return to_height, to_width


def describe_image(spec: TensorSpec) -> str:
    """`a 1×3×512×512 image` (batch × channels × height × width, as torch shows it to a VAE)."""
    b, h, w, c = spec.shape
    return f"a {b}×{c}×{h}×{w} image"


def describe_latent(spec: TensorSpec) -> str:
    b, c, h, w = spec.shape
    return f"a {b}×{c}×{h}×{w} latent ({w * 8}×{h * 8} pixels)"


def host_op(outputs: tuple[Any, ...], copies: float = 1.0, what: str = "", kept: int | None = None,
            extra: int = 0) -> MemoryEstimate:
    """A tensor op on the host: `copies` temporaries the size of the first output live while it runs (a
    resize's contiguous input, a clamp's result before the old one is dropped), plus `extra` bytes."""
    first = next((o for o in outputs if isinstance(o, TensorSpec)), None)
    if first is None and outputs and isinstance(outputs[0], dict):
        first = samples_of(outputs[0])
    transient = int(copies * first.nbytes) if first is not None else 0
    return MemoryEstimate(outputs=outputs, host_bytes=transient + extra, kept_bytes=kept, what=what)


def _at_once(batch: int, context: EstimateContext) -> int:
    """Images VAEModel runs at once: on the CPU the whole batch (nothing to evict, so no limit is computed);
    on a GPU as many as the free memory takes, at least one (counted as one)."""
    return batch if context.device_type == "cpu" else 1


def _tiled_decode_bytes(config: VAEConfig, batch: int, h: int, w: int, tile: int, itemsize: int,
                        device_type: str) -> int:
    """diffusion.tiling.tiled_apply over a decoder: one tile's activations at a time, plus the float32
    output accumulator, the weight total and the normalised copy at full size."""
    f = config.downscale
    tile_act = vae_decode_elements(config, min(tile, h), min(tile, w), itemsize, device_type) * itemsize
    full = h * f * w * f
    return int(batch * tile_act + (2 * batch * config.out_ch + 1) * full * 4)


def _tiled_encode_bytes(config: VAEConfig, batch: int, h: int, w: int, tile: int, itemsize: int,
                        device_type: str) -> int:
    f = config.downscale
    tile_act = vae_encode_elements(config, min(tile, h), min(tile, w), itemsize, device_type) * itemsize
    return int(batch * tile_act + (2 * batch * config.embed_dim + 1) * (h // f) * (w // f) * 4)


def vae_decode_estimate(latent: Any, vae: Any, context: EstimateContext,
                        tile: int | None = None) -> MemoryEstimate | None:
    """VAEDecode (tile None: the whole image, falling back to 64-latent tiles where a GPU runs out) or
    VAEDecodeTiled (`tile` in latent units)."""
    samples = samples_of(latent)
    if samples is None:
        return None
    config, itemsize, device_type = vae_config(vae), compute_itemsize(context, for_vae=True), context.device_type
    batch, _, h, w = samples.shape
    at_once = _at_once(batch, context)
    if tile is not None:
        device = _tiled_decode_bytes(config, at_once, h, w, tile, itemsize, device_type)
    else:
        device = int(at_once * vae_decode_elements(config, h, w, itemsize, device_type) * itemsize)
        if device_type != "cpu":  # VAEModel retries tile by tile after a GPU out-of-memory error
            fallback = min(VAE_TILE_FALLBACK, max(8, max(h, w) // 2))
            device = min(device, _tiled_decode_bytes(config, 1, h, w, fallback, itemsize, device_type))
    image = image_spec(batch, h * config.downscale, w * config.downscale, config.out_ch)
    return MemoryEstimate(outputs=(image,), device_bytes=device, host_bytes=2 * image.nbytes,
                          what=describe_image(image))


def vae_encode_estimate(pixels: Any, vae: Any, context: EstimateContext, tile: int | None = None,
                        host_copies: float = 2.0, noise_mask: bool = False) -> MemoryEstimate | None:
    """VAEEncode and its variants: the image cropped to the VAE's grid, scaled to -1..1 on the host (two
    copies, `host_copies` with an inpainting node's grey-out), encoded whole or in `tile`-pixel tiles."""
    image = tensor_of(pixels, 4)
    if image is None:
        return None
    config, itemsize, device_type = vae_config(vae), compute_itemsize(context, for_vae=True), context.device_type
    f = config.downscale
    batch, height, width, _ = image.shape
    h, w = height // f * f, width // f * f
    at_once = _at_once(batch, context)
    if tile is not None:
        device = _tiled_encode_bytes(config, at_once, h, w, tile, itemsize, device_type)
    else:
        device = int(at_once * vae_encode_elements(config, h, w, itemsize, device_type) * itemsize)
        if device_type != "cpu":
            fallback = min(512, max(64, max(h, w) // 2))
            device = min(device, _tiled_encode_bytes(config, 1, h, w, fallback, itemsize, device_type))
    mask = TensorSpec((batch, 1, h, w), HOST_ITEMSIZE) if noise_mask else None
    latent = latent_shape(batch, h // f, w // f, mask)
    cropped = image_spec(batch, h, w, config.in_channels)
    return MemoryEstimate(outputs=(latent,), device_bytes=device, host_bytes=int(host_copies * cropped.nbytes),
                          what=describe_image(cropped))


SAMPLER_STATE_LATENTS = 12  # x, noise, denoised, a sampler's history, the guider's batch, sums and weights


def sampler_estimate(latent: Any, model: Any, context: EstimateContext, batch_factor: int,
                     outputs: int = 1) -> MemoryEstimate | None:
    """A sampling node: one UNet call on `batch_factor` × the batch at a time (2 with CFG: cond and uncond run
    together), the sampler's own float32 latents on the device, and `outputs` new LATENTs."""
    samples = samples_of(latent)
    if samples is None:
        return None
    batch, _, h, w = samples.shape
    itemsize = compute_itemsize(context)
    device = unet_bytes(unet_config(model), batch * batch_factor, h, w, itemsize, context.device_type)
    device += SAMPLER_STATE_LATENTS * samples.nbytes
    out = latent_shape(batch, h, w, latent.get("noise_mask"))
    what = describe_latent(samples) + (" with cond and uncond in one UNet batch" if batch_factor > 1 else "")
    return MemoryEstimate(outputs=(out,) * outputs, device_bytes=device, host_bytes=3 * samples.nbytes,
                          kept_bytes=outputs * samples.nbytes, what=what)


EXIF_ORIENTATION = 0x0112


def image_file_estimate(path: Any) -> MemoryEstimate | None:
    """LoadImage's estimate from the file's header alone: PIL's `open` reads size, mode and frame count
    without decoding pixels. Decoding then holds one frame as PIL's pixels and as float32 RGB (and a copy of
    it) while the frames' tensors are stacked into the batch. None when the file cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
            # counted from headers, and never past the cap (PIL's n_frames walks every frame of a GIF)
            frames = len(frame_sizes(image, path, DEFAULT_MAX_FRAMES))
            alpha = "A" in image.getbands() or "transparency" in image.info
            # a PNG keeps EXIF after its pixels, where PIL would decode to find it: read it only when it is known
            exif = image.getexif() if image.format != "PNG" or "exif" in image.info else {}
            if exif.get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # rotated by a quarter turn
                width, height = height, width
    except Exception as exc:
        log.debug("no size from %s: %s", path, exc)
        return None
    out = image_spec(frames, height, width)
    mask = mask_spec(frames, height, width) if alpha else mask_spec(frames, 64, 64)
    decoding = height * width * (4 + 2 * 3 * HOST_ITEMSIZE)
    return MemoryEstimate(outputs=(out, mask), host_bytes=out.nbytes + mask.nbytes + decoding,
                          what=describe_image(out))
