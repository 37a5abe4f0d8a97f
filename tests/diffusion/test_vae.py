"""KL VAE: parity with diffusers on identical random weights, config inference, real key set, tiling."""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from diffusion.models.vae import AutoencoderKL, VAEConfig
from diffusion.tiling import tile_spans, tiled_apply
from tests.diffusion.random_weights import randomize_, relative_error

PREFIX = "first_stage_model."
TOLERANCE = 1e-4
TINY = VAEConfig(ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, norm_groups=8)


def diffusers_config(c: VAEConfig) -> dict:
    assert c.z_channels == c.embed_dim, "diffusers has one latent width"
    n = len(c.ch_mult)
    return {
        "in_channels": c.in_channels,
        "out_channels": c.out_ch,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [c.ch * m for m in c.ch_mult],
        "layers_per_block": c.num_res_blocks,
        "latent_channels": c.z_channels,
        "norm_num_groups": c.norm_groups,
    }


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    return randomize_(AutoencoderKL(TINY), seed).eval()


def waves(channels: int, h: int, w: int, period: float, seed: int) -> torch.Tensor:
    """A smooth field [1, C, H, W] with the same statistics everywhere: three plane waves per channel
    of the given period in random directions and phases."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    out = torch.zeros(1, channels, h, w)
    for c in range(channels):
        for _ in range(3):
            angle, phase = (torch.rand(2, generator=gen) * 2 * math.pi).tolist()
            along = xx * math.cos(angle) + yy * math.sin(angle)
            out[0, c] += torch.sin(along * 2 * math.pi / period + phase) / 3
    return out


@torch.no_grad()
def test_parity_with_diffusers() -> None:
    ours = tiny_vae()
    checkpoint = {PREFIX + k: v for k, v in ours.state_dict().items()}
    dcfg = diffusers_config(TINY)
    theirs = DiffusersAutoencoderKL(**dcfg).eval()
    theirs.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, dcfg), strict=True)

    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 22, 30, generator=gen) * 2 - 1  # not a multiple of the downscale 4
    posterior = theirs.encode(x).latent_dist
    mean, logvar = ours.encode_moments(x)
    assert mean.shape == posterior.mean.shape == (2, 4, 5, 7)
    assert relative_error(mean, posterior.mean) < TOLERANCE
    assert relative_error(logvar, posterior.logvar) < TOLERANCE
    assert torch.equal(ours.encode(x), mean)

    z = torch.randn(2, 4, 5, 7, generator=gen)
    reference = theirs.decode(z).sample
    out = ours.decode(z)
    assert out.shape == reference.shape == (2, 3, 20, 28)
    assert relative_error(out, reference) < TOLERANCE


def test_from_state_dict_recovers_configs() -> None:
    with torch.device("meta"):
        tiny, real = AutoencoderKL(TINY).state_dict(), AutoencoderKL(VAEConfig()).state_dict()
    assert VAEConfig.from_state_dict(tiny, norm_groups=8) == TINY
    assert VAEConfig.from_state_dict(real) == VAEConfig()
    with pytest.raises(ValueError, match=re.escape("strip the 'first_stage_model.' prefix")):
        VAEConfig.from_state_dict({PREFIX + k: v for k, v in real.items()})
    del real["quant_conv.weight"]
    with pytest.raises(ValueError, match=re.escape("'quant_conv.weight'")):
        VAEConfig.from_state_dict(real)


def test_real_size_keys_match_diffusers_converter() -> None:
    """At SD size (on meta) our keys are exactly what diffusers' converter reads, with matching shapes
    (the converter turns the 1x1-conv attention weights [C, C, 1, 1] into linear [C, C])."""
    dcfg = diffusers_config(VAEConfig())
    with torch.device("meta"):
        ours = AutoencoderKL(VAEConfig()).state_dict()
        theirs = DiffusersAutoencoderKL(**dcfg).state_dict()
    assert ours["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    converted = convert_ldm_vae_checkpoint({PREFIX + k: v for k, v in ours.items()}, dcfg)
    assert set(converted) == set(theirs)
    assert all(converted[k].shape == theirs[k].shape for k in theirs)
    assert len(ours) == len(theirs) == 248
    assert sum(v.numel() for v in ours.values()) == 83_653_863  # the published SD VAE size


@torch.no_grad()
def test_accepts_linear_attention_weights_and_meta_assign() -> None:
    source = tiny_vae(2)
    sd = {k: (v[:, :, 0, 0] if ".attn_1." in k and v.ndim == 4 else v) for k, v in source.state_dict().items()}
    assert sd["decoder.mid.attn_1.proj_out.weight"].ndim == 2
    with torch.device("meta"):
        model = AutoencoderKL(TINY)
    assert not list(model.buffers())
    model.load_state_dict(sd, strict=True, assign=True)
    z = torch.randn(1, 4, 6, 6)
    assert torch.equal(model.eval().decode(z), source.decode(z))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_half_precision_decode(dtype: torch.dtype) -> None:
    vae = tiny_vae(3)
    z = torch.randn(1, 4, 6, 6)
    reference = vae.decode(z)
    out = vae.to(dtype).decode(z.to(dtype))
    assert out.dtype == dtype
    assert relative_error(out.float(), reference) < 0.05
    assert vae.decode_tiled(z.to(dtype), tile=4, overlap=2).dtype == dtype


def test_rejects_wrong_shapes() -> None:
    vae = AutoencoderKL(TINY)
    with pytest.raises(ValueError, match=re.escape("image must be [B, 3, H, W]")):
        vae.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match=re.escape("latent must be [B, 4, H, W]")):
        vae.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="larger than the overlap"):
        vae.decode_tiled(torch.zeros(1, 4, 8, 8), tile=8, overlap=8)
    with pytest.raises(ValueError, match="at least the alignment"):
        vae.encode_tiled(torch.zeros(1, 3, 64, 64), tile=36, overlap=34)  # stride 2 < downscale 4


@pytest.mark.parametrize(
    ("size", "tile", "overlap", "align"),
    [(100, 32, 8, 1), (203, 64, 16, 8), (30, 64, 8, 8), (1000, 100, 30, 8), (515, 512, 64, 8)],
)
def test_tile_spans_cover_with_overlap(size: int, tile: int, overlap: int, align: int) -> None:
    spans = tile_spans(size, tile, overlap, align)
    assert spans[0][0] == 0 and spans[-1][1] == size
    assert all(s % align == 0 for s, _ in spans)
    assert all(e - s <= tile + align - 1 for s, e in spans)
    assert all(next_s <= e - overlap for (_, e), (next_s, _) in itertools.pairwise(spans))


@torch.no_grad()
def test_tiled_apply_is_exact_for_local_functions() -> None:
    """With a function that has no context beyond a pixel, blending must reproduce the untiled result
    exactly: the ramps are a partition of unity."""
    x = torch.randn(2, 3, 37, 53)
    up = tiled_apply(lambda t: F.interpolate(t, scale_factor=8.0, mode="nearest"), x, 16, 4, up=8)
    assert torch.allclose(up, F.interpolate(x, scale_factor=8.0, mode="nearest"), atol=1e-6)
    big = torch.randn(1, 3, 301, 419)
    down = tiled_apply(lambda t: F.avg_pool2d(t, 8), big, 128, 32, down=8)
    assert down.shape == (1, 3, 37, 52)
    assert torch.allclose(down, F.avg_pool2d(big, 8), atol=1e-5)


def rms_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()).item()


@torch.no_grad()
def test_decode_tiled_close_to_decode_and_blending_beats_hard_seams() -> None:
    """Tiled ≈ untiled: RMS difference under 15 % of the output's RMS (measured 10 %) on a smooth
    stationary latent field. The remaining difference is inherent to tiling a network with GroupNorm:
    each tile normalises with its own statistics (exactness of the blending itself is tested above).
    Hard tile edges (overlap 0) must do worse than the ramps."""
    vae = tiny_vae(4)
    z = waves(4, 70, 78, period=6.0, seed=5)  # sides not multiples of the tile stride
    full = vae.decode(z)
    tiled = vae.decode_tiled(z, tile=48, overlap=24)
    hard = vae.decode_tiled(z, tile=48, overlap=0)
    assert tiled.shape == hard.shape == full.shape == (1, 3, 280, 312)
    assert rms_error(tiled, full) < 0.15
    assert rms_error(tiled, full) < rms_error(hard, full)


@torch.no_grad()
def test_encode_tiled_close_to_encode() -> None:
    """RMS difference under 20 % of the latents' RMS (measured 15 %), for the same reason as the decoder;
    the output shape equals `encode`'s for sides that are not multiples of the downscale."""
    vae = tiny_vae(4)
    x = waves(3, 202, 233, period=24.0, seed=7)
    full = vae.encode(x)
    tiled = vae.encode_tiled(x, tile=128, overlap=64)
    hard = vae.encode_tiled(x, tile=128, overlap=0)
    assert tiled.shape == full.shape == (1, 4, 50, 58)
    assert rms_error(tiled, full) < 0.2
    assert rms_error(tiled, full) < rms_error(hard, full)
