"""UNet: parity with diffusers on identical random weights, config inference, real-size key sets."""

from __future__ import annotations

import os
import re

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from diffusers.models.embeddings import get_timestep_embedding

from diffusion.checkpoints.unet_keys import diffusers_to_original_unet_keys
from diffusion.models.unet import UNetConfig, UNetModel, sdxl_adm, sdxl_refiner_adm
from diffusion.models.unet_blocks import timestep_embedding
from tests.diffusion.random_weights import randomize_, relative_error

PREFIX = "model.diffusion_model."
POOLED = 16  # pooled text width of the tiny SDXL-like models
TOLERANCE = 1e-4

TINY = {
    "sd1": UNetConfig(
        model_channels=32, channel_mult=(1, 2, 2), transformer_depth=(1, 1, 0), context_dim=32,
        num_heads=2, norm_groups=8,
    ),
    "sd2": UNetConfig(
        model_channels=32, channel_mult=(1, 2, 2), transformer_depth=(1, 1, 0), context_dim=24,
        num_heads=-1, num_head_channels=16, use_linear_in_transformer=True, norm_groups=8,
    ),
    "sdxl": UNetConfig(
        model_channels=32, channel_mult=(1, 2, 2), transformer_depth=(0, 1, 2), transformer_depth_middle=2,
        context_dim=32, num_heads=-1, num_head_channels=16, use_linear_in_transformer=True,
        adm_in_channels=POOLED + 6 * 8, norm_groups=8,
    ),
    "refiner": UNetConfig(
        model_channels=24, channel_mult=(1, 2, 2, 2), transformer_depth=(0, 2, 2, 0), transformer_depth_middle=2,
        context_dim=40, num_heads=-1, num_head_channels=12, use_linear_in_transformer=True,
        adm_in_channels=POOLED + 5 * 8, norm_groups=8, num_res_blocks=1,
    ),
    "inpaint": UNetConfig(
        in_channels=9, model_channels=32, channel_mult=(1, 2, 2), transformer_depth=(1, 1, 0), context_dim=32,
        num_heads=2, norm_groups=8,
    ),
}

REAL = {
    "sd1": UNetConfig.sd1(),
    "sd2": UNetConfig.sd2(),
    "sdxl": UNetConfig.sdxl(),
    "refiner": UNetConfig.sdxl_refiner(),
    "inpaint": UNetConfig.sd1(in_channels=9),
}


def diffusers_config(c: UNetConfig) -> dict:
    """The UNet2DConditionModel arguments describing the same network as `c`."""
    widths = [c.model_channels * m for m in c.channel_mult]
    # diffusers' mid block takes the last entry; levels without attention ignore theirs.
    layers = [d if d > 0 else c.transformer_depth_middle for d in c.transformer_depth]
    assert layers[-1] == c.transformer_depth_middle, "not expressible in diffusers"
    config = {
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "block_out_channels": widths,
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in c.transformer_depth],
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(c.transformer_depth)],
        "layers_per_block": c.num_res_blocks,
        "cross_attention_dim": c.context_dim,
        # diffusers' historical naming: attention_head_dim holds the number of heads.
        "attention_head_dim": [c.head_layout(w)[0] for w in widths],
        "use_linear_projection": c.use_linear_in_transformer,
        "transformer_layers_per_block": layers,
        "norm_num_groups": c.norm_groups,
    }
    if c.adm_in_channels is not None:
        real = c.adm_in_channels in (2816, 2560)
        config.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=256 if real else 8,
            projection_class_embeddings_input_dim=c.adm_in_channels,
        )
    return config


def tiny_pair(name: str, seed: int = 0) -> tuple[UNetModel, UNet2DConditionModel]:
    """Our tiny model with random weights and diffusers' model loaded from the converted checkpoint."""
    cfg = TINY[name]
    ours = randomize_(UNetModel(cfg), seed).eval()
    checkpoint = {PREFIX + k: v for k, v in ours.state_dict().items()}
    dcfg = diffusers_config(cfg)
    theirs = UNet2DConditionModel(**dcfg).eval()
    theirs.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, dcfg), strict=True)
    return ours, theirs


def adm_inputs(name: str, batch: int) -> tuple[torch.Tensor | None, dict | None]:
    """Our ADM vector from the builders and diffusers' added_cond_kwargs for the same conditions."""
    gen = torch.Generator().manual_seed(7)
    pooled = torch.randn(batch, POOLED, generator=gen)
    cfg = TINY[name]
    if name == "sdxl":
        # Distinct values everywhere so that any mix-up of the order changes the result.
        y = sdxl_adm(pooled, 768, 1024, 32, 16, 640, 896, adm_in_channels=cfg.adm_in_channels)
        time_ids = torch.tensor([[1024.0, 768.0, 16.0, 32.0, 896.0, 640.0]]).expand(batch, -1)
    elif name == "refiner":
        y = sdxl_refiner_adm(pooled, 768, 1024, 2.5, adm_in_channels=cfg.adm_in_channels)
        time_ids = torch.tensor([[1024.0, 768.0, 0.0, 0.0, 2.5]]).expand(batch, -1)
    else:
        return None, None
    return y, {"text_embeds": pooled, "time_ids": time_ids}


@pytest.mark.parametrize("name", list(TINY))
@torch.no_grad()
def test_parity_with_diffusers(name: str) -> None:
    ours, theirs = tiny_pair(name)
    cfg = TINY[name]
    gen = torch.Generator().manual_seed(1)
    # 13x10 is not a multiple of 4 (2 downsamples) or 8: exercises upsampling to the skip's size.
    x = torch.randn(2, cfg.in_channels, 13, 10, generator=gen)
    t = torch.tensor([17.0, 801.5])
    context = torch.randn(2, 5, cfg.context_dim, generator=gen)
    y, added = adm_inputs(name, 2)
    reference = theirs(x, t, context, added_cond_kwargs=added).sample
    out = ours(x, t, context, y)
    assert out.shape == reference.shape == (2, cfg.out_channels, 13, 10)
    assert relative_error(out, reference) < TOLERANCE


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
@torch.no_grad()
def test_diffusers_names_map_back_to_ours(name: str) -> None:
    """A diffusers state dict renamed with unet_keys loads strictly into ours and gives the same output."""
    _, theirs = tiny_pair(name, seed=3)
    cfg = TINY[name]
    mapping = diffusers_to_original_unet_keys(cfg)
    ours = UNetModel(cfg).eval()
    ours.load_state_dict({mapping[k]: v for k, v in theirs.state_dict().items()}, strict=True)
    x = torch.randn(1, cfg.in_channels, 8, 8)
    t = torch.tensor([400.0])
    context = torch.randn(1, 4, cfg.context_dim)
    y, added = adm_inputs(name, 1)
    assert relative_error(ours(x, t, context, y), theirs(x, t, context, added_cond_kwargs=added).sample) < TOLERANCE


def test_unet_keys_rejects_unknown_adm_embedding() -> None:
    with pytest.raises(ValueError, match="adm_embedding"):
        diffusers_to_original_unet_keys(TINY["sdxl"], adm_embedding="label_emb")


def test_unet_keys_class_embedding_for_unclip_style_adm() -> None:
    cfg = UNetConfig(**{**TINY["sd2"].__dict__, "adm_in_channels": 48})
    mapping = diffusers_to_original_unet_keys(cfg, adm_embedding="class_embedding")
    dcfg = {**diffusers_config(TINY["sd2"]), "class_embed_type": "projection",
            "projection_class_embeddings_input_dim": 48}
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**dcfg)
    assert set(mapping) == set(theirs.state_dict())
    assert mapping["class_embedding.linear_1.weight"] == "label_emb.0.0.weight"


@pytest.mark.parametrize("name", list(TINY))
def test_from_state_dict_recovers_tiny_configs(name: str) -> None:
    cfg = TINY[name]
    with torch.device("meta"):
        sd = UNetModel(cfg).state_dict()
    heads = {"num_heads": cfg.num_heads} if cfg.num_heads > 0 else {"num_head_channels": cfg.num_head_channels}
    assert UNetConfig.from_state_dict(sd, norm_groups=cfg.norm_groups, **heads) == cfg


@pytest.mark.parametrize("name", list(REAL))
def test_real_configs_key_sets_and_inference(name: str) -> None:
    """At real size (on meta): our keys are exactly what diffusers' converter reads for the diffusers model,
    shapes agree, the unet_keys table covers that model, and from_state_dict with family defaults
    recovers the config."""
    cfg = REAL[name]
    dcfg = diffusers_config(cfg)
    with torch.device("meta"):
        ours = UNetModel(cfg).state_dict()
        theirs = UNet2DConditionModel(**dcfg).state_dict()
    converted = convert_ldm_unet_checkpoint({PREFIX + k: v for k, v in ours.items()}, dcfg)
    assert set(converted) == set(theirs)
    assert all(converted[k].shape == theirs[k].shape for k in theirs)
    assert len(ours) == len(theirs)
    mapping = diffusers_to_original_unet_keys(cfg)
    assert set(mapping) == set(theirs)
    assert all(ours[mapping[k]].shape == theirs[k].shape for k in theirs)
    assert UNetConfig.from_state_dict(ours) == cfg


def test_known_real_parameter_counts() -> None:
    """Published UNet sizes: SD1.5 859,520,964, SD2.x 865,910,724, SDXL base 2,567,463,684 parameters."""
    with torch.device("meta"):
        counts = {n: sum(p.numel() for p in UNetModel(REAL[n]).parameters()) for n in ("sd1", "sd2", "sdxl")}
    assert counts == {"sd1": 859_520_964, "sd2": 865_910_724, "sdxl": 2_567_463_684}


def test_meta_construction_then_assign_load() -> None:
    cfg = TINY["sdxl"]
    source = randomize_(UNetModel(cfg), 5).eval()
    with torch.device("meta"):
        model = UNetModel(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert not list(model.buffers())
    model.load_state_dict(source.state_dict(), strict=True, assign=True)
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([3.0]), torch.randn(1, 3, 32)
    y = sdxl_adm(torch.randn(1, POOLED), 64, 64, adm_in_channels=cfg.adm_in_channels)
    with torch.no_grad():
        assert torch.equal(model.eval()(x, t, ctx, y), source(x, t, ctx, y))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_half_precision_forward(dtype: torch.dtype) -> None:
    """Weights and inputs in half precision run (GroupNorm in float32 inside) and stay near fp32."""
    cfg = TINY["sdxl"]
    model = randomize_(UNetModel(cfg), 8).eval()
    x, t, ctx = torch.randn(2, 4, 12, 12), torch.tensor([10.0, 900.0]), torch.randn(2, 5, 32)
    y = sdxl_adm(torch.randn(2, POOLED), 512, 512, adm_in_channels=cfg.adm_in_channels)
    reference = model(x, t, ctx, y)
    out = model.to(dtype)(x.to(dtype), t, ctx.to(dtype), y.to(dtype))
    assert out.dtype == dtype
    assert relative_error(out.float(), reference) < 0.05


def test_timestep_embedding_matches_diffusers() -> None:
    t = torch.tensor([0.0, 1.0, 250.5, 999.0])
    for dim in (320, 256, 7):
        ref = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        assert torch.allclose(timestep_embedding(t, dim), ref, atol=1e-6)
    assert torch.equal(timestep_embedding(torch.tensor([0.0]), 4), torch.tensor([[1.0, 1.0, 0.0, 0.0]]))


def test_adm_builders_shapes_and_errors() -> None:
    pooled = torch.randn(3, 1280)
    assert sdxl_adm(pooled, 1024, 1024, 0, 0, 1024, 1024).shape == (3, 2816)
    assert sdxl_refiner_adm(pooled, 1024, 1024, 6.0).shape == (3, 2560)
    # Targets default to the image size; per-sample values are accepted as tensors.
    assert torch.equal(sdxl_adm(pooled, 768, 512), sdxl_adm(pooled, 768, 512, 0, 0, 768, 512))
    per_sample = sdxl_refiner_adm(pooled, 1024, 1024, torch.tensor([6.0, 2.5, 6.0]))
    # one sample of a batch against a batch of one: sin/cos over other tensor layouts, float32 rounding apart
    torch.testing.assert_close(per_sample[1], sdxl_refiner_adm(pooled[1:2], 1024, 1024, 2.5)[0])
    with pytest.raises(ValueError, match="does not split"):
        sdxl_adm(pooled, 1024, 1024, adm_in_channels=2817)


def test_from_state_dict_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match=re.escape("input_blocks.0.0.weight")):
        UNetConfig.from_state_dict({"encoder.conv_in.weight": torch.zeros(1)})
    with torch.device("meta"):
        sd = UNetModel(TINY["sd1"]).state_dict()
    with pytest.raises(ValueError, match=re.escape("strip the 'model.diffusion_model.' prefix")):
        UNetConfig.from_state_dict({PREFIX + k: v for k, v in sd.items()})
    del sd["out.2.weight"]
    with pytest.raises(ValueError, match=re.escape("out.2.weight")):
        UNetConfig.from_state_dict(sd)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="exactly one of num_heads"):
        UNetConfig(num_heads=8, num_head_channels=64)
    with pytest.raises(ValueError, match="one entry per level"):
        UNetConfig(transformer_depth=(1, 1))


def test_forward_rejects_wrong_inputs() -> None:
    model = UNetModel(TINY["sdxl"])
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([1.0]), torch.randn(1, 3, 32)
    with pytest.raises(ValueError, match=r"\[B, 4, H, W\]"):
        model(torch.randn(1, 9, 8, 8), t, ctx, torch.randn(1, 64))
    with pytest.raises(ValueError, match="context"):
        model(x, t, torch.randn(1, 3, 16), torch.randn(1, 64))
    with pytest.raises(ValueError, match="ADM vector"):
        model(x, t, ctx)
    with pytest.raises(ValueError, match="takes no ADM"):
        UNetModel(TINY["sd1"])(x, t, ctx, torch.randn(1, 64))


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LATENTLOOM_SLOW") != "1", reason="full-size model; set LATENTLOOM_SLOW=1")
@torch.no_grad()
def test_full_size_sd15_parity() -> None:
    cfg = REAL["sd1"]
    ours = randomize_(UNetModel(cfg), 11).eval()
    checkpoint = {PREFIX + k: v for k, v in ours.state_dict().items()}
    dcfg = diffusers_config(cfg)
    theirs = UNet2DConditionModel(**dcfg).eval()
    theirs.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, dcfg), strict=True)
    del checkpoint
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 32, 24, generator=gen)
    t = torch.tensor([500.0])
    context = torch.randn(1, 77, 768, generator=gen)
    assert relative_error(ours(x, t, context), theirs(x, t, context).sample) < TOLERANCE
