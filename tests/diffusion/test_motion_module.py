"""AnimateDiff motion modules: parity with diffusers' UNetMotionModel, file layouts and versions, the patch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from torch import nn

from diffusion.checkpoints.files import CheckpointError
from diffusion.checkpoints.motion_files import (
    build_motion_modules,
    detect_motion_config,
    load_motion_file,
    motion_lora_deltas,
    original_to_diffusers,
    random_motion_lora,
    random_motion_state_dict,
    read_motion_lora,
    tiny_motion_config,
    write_motion_file,
)
from diffusion.models.motion_module import MotionModuleSet
from diffusion.models.unet import UNetConfig, UNetModel, sdxl_adm
from diffusion.models.unet_blocks import clip_group_norm, norm_first
from diffusion.patches.motion_patch import check_fits, motion_patches, placed, video_frames
from tests.diffusion.random_weights import randomize_, relative_error
from tests.diffusion.test_unet import diffusers_config

# widths 32/64/64: the motion modules' GroupNorm has 32 groups and 8 heads, as in every release
UNET = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), transformer_depth=(1, 1, 0), context_dim=32,
                  num_heads=2, norm_groups=32)  # diffusers builds the motion norms with the UNet's groups
WIDTHS = (32, 64, 64)
FRAMES = 16


class _PerFrameNorm(nn.Module):
    """diffusers' AnimateDiffTransformer3D normalises a clip's frames together ([B, C, F, H, W]); the original
    AnimateDiff code, which trained the released files, normalises each frame alone. This aligns the reference
    with the original so that everything else is compared exactly."""

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.inner = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, f, h, w = x.shape
        flat = x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        out = F.group_norm(flat, self.inner.num_groups, self.inner.weight, self.inner.bias, self.inner.eps)
        return out.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)


def _pair(version: str, seed: int = 0):
    ours = randomize_(UNetModel(UNET), seed).eval().requires_grad_(False)
    dcfg = diffusers_config(UNET)
    unet2d = UNet2DConditionModel(**dcfg).eval()
    checkpoint = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    unet2d.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, dcfg), strict=True)
    config = tiny_motion_config(version, WIDTHS)
    sd = random_motion_state_dict(config, seed=seed + 1)
    adapter = MotionAdapter(block_out_channels=WIDTHS, motion_layers_per_block=UNET.num_res_blocks,
                            motion_norm_num_groups=32, motion_num_attention_heads=8,
                            motion_max_seq_length=config.max_len, use_motion_mid_block=config.mid)
    adapter.load_state_dict(original_to_diffusers(sd), strict=True)
    theirs = UNetMotionModel.from_unet2d(unet2d, adapter).eval()
    return ours, theirs, build_motion_modules(sd), sd


def _inputs(seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(FRAMES, 4, 8, 8, generator=gen)
    context = torch.randn(1, 5, 32, generator=gen)
    return x, context


@pytest.mark.parametrize("version", ["v2", "v3"])
@torch.no_grad()
def test_unet_step_over_16_frames_matches_diffusers(version: str) -> None:
    ours, theirs, motion, _ = _pair(version)
    for module in theirs.modules():
        if type(module).__name__ == "AnimateDiffTransformer3D":
            module.norm = _PerFrameNorm(module.norm)
    x, context = _inputs()
    t = torch.tensor(501.0)
    # diffusers' pipeline repeats the text context per frame before the UNet call
    reference = theirs(x.permute(1, 0, 2, 3)[None], t, context.expand(FRAMES, -1, -1)).sample[0]
    reference = reference.permute(1, 0, 2, 3)
    out = ours(x, t.expand(FRAMES), context.expand(FRAMES, -1, -1),
               patches=motion_patches(motion, UNET.num_res_blocks))
    plain = ours(x, t.expand(FRAMES), context.expand(FRAMES, -1, -1))
    assert relative_error(out, reference) < 1e-4
    assert relative_error(plain, reference) > 1e-2  # the motion modules really changed the step


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_versions_detected_from_keys_and_shapes(tmp_path, version: str) -> None:
    sd = random_motion_state_dict(tiny_motion_config(version, WIDTHS))
    path = tmp_path / "mm.safetensors"
    write_motion_file(path, sd)
    motion = load_motion_file(path)
    assert motion.config.version == version
    assert motion.config.mid == (version == "v2")
    assert motion.config.max_len == (24 if version == "v1" else 32)
    # a pickled .ckpt (weights under "state_dict") reads through the safe unpickler, to the same weights
    ckpt = tmp_path / "mm.ckpt"
    torch.save({"state_dict": sd}, ckpt)
    again = load_motion_file(ckpt)
    for key, value in motion.state_dict().items():
        assert torch.equal(value, again.state_dict()[key])


def test_sdxl_beta_detected_and_refused_on_sd1(tmp_path) -> None:
    sd = random_motion_state_dict(tiny_motion_config("sdxl_beta", (32, 64, 96)))
    motion = build_motion_modules(sd, "mm_sdxl.safetensors")
    assert motion.config.version == "sdxl_beta"
    with pytest.raises(ValueError, match=r"mm_sdxl\.safetensors.*SD1\.x"):
        check_fits(motion, UNET.model_channels, UNET.channel_mult, UNET.num_res_blocks, "SD1.x",
                   "mm_sdxl.safetensors")


def test_diffusers_layout_file_loads_to_the_same_weights(tmp_path) -> None:
    config = tiny_motion_config("v2", WIDTHS)
    sd = random_motion_state_dict(config, seed=5)
    adapter = MotionAdapter(block_out_channels=WIDTHS, motion_layers_per_block=2, motion_max_seq_length=32)
    assert set(original_to_diffusers(sd)) == set(adapter.state_dict())  # our key map names diffusers' keys
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    write_motion_file(path, sd, layout="diffusers")
    loaded = load_motion_file(path).state_dict()
    assert set(loaded) == set(sd)
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_not_a_motion_module_is_refused_by_name(tmp_path) -> None:
    path = tmp_path / "lora.safetensors"
    write_motion_file(path, {"lora_unet_x.lora_up.weight": torch.zeros(2, 2)})
    with pytest.raises(CheckpointError, match=r"lora\.safetensors is not an AnimateDiff motion module"):
        load_motion_file(path)
    sd = random_motion_state_dict(tiny_motion_config("v3", WIDTHS))
    sd.pop(next(k for k in sd if k.endswith("proj_out.bias")))
    with pytest.raises(CheckpointError, match="1 missing keys"):
        build_motion_modules(sd, "broken.safetensors")


@torch.no_grad()
def test_patch_is_reversible_mixes_frames_and_scales() -> None:
    ours, _, motion, _ = _pair("v3")
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    x, context = _inputs()
    t = torch.full((FRAMES,), 301.0)
    ctx = context.expand(FRAMES, -1, -1)
    plain = ours(x, t, ctx)
    patches = motion_patches(motion, UNET.num_res_blocks)
    moved = ours(x, t, ctx, patches=patches)
    x2 = x.clone()
    x2[5] += 1.0
    moved2 = ours(x2, t, ctx, patches=patches)
    assert not torch.allclose(moved[0], moved2[0], atol=1e-4)  # frame 5 reaches frame 0 through the modules
    assert torch.allclose(ours(x2, t, ctx)[0], plain[0], atol=1e-6)  # the plain UNet keeps frames apart
    assert torch.allclose(ours(x, t, ctx), plain)  # unpatched call afterwards: unchanged
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())
    zero = ours(x, t, ctx, patches=motion_patches(motion, UNET.num_res_blocks, scale=0.0))
    assert torch.allclose(zero, plain, atol=1e-5)


@torch.no_grad()
def test_two_clips_in_one_batch_equal_separate_calls() -> None:
    ours, _, motion, _ = _pair("v2")
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(8, 4, 8, 8, generator=gen)
    ctx = torch.randn(1, 5, 32, generator=gen).expand(8, -1, -1)
    t = torch.full((8,), 700.0)
    patches = motion_patches(motion, UNET.num_res_blocks)
    with video_frames(4):
        both = ours(x, t, ctx, patches=patches)
    first = ours(x[:4], t[:4], ctx[:4], patches=patches)
    second = ours(x[4:], t[4:], ctx[4:], patches=patches)
    assert torch.allclose(both, torch.cat([first, second]), atol=1e-5)
    with video_frames(3), pytest.raises(ValueError, match="not a whole number of 3-frame clips"):
        ours(x, t, ctx, patches=patches)


@torch.no_grad()
def test_more_frames_than_the_encoding_is_a_clear_error() -> None:
    ours, _, motion, _ = _pair("v1")  # 24 positions
    x = torch.zeros(25, 4, 8, 8)
    with pytest.raises(ValueError, match=r"25 frames at once.*context_length <= 24"):
        ours(x, torch.full((25,), 1.0), torch.zeros(25, 5, 32), patches=motion_patches(motion, UNET.num_res_blocks))


XL = UNetConfig(model_channels=32, channel_mult=(1, 2, 3), transformer_depth=(0, 1, 1), transformer_depth_middle=1,
                context_dim=32, num_heads=-1, num_head_channels=16, use_linear_in_transformer=True,
                adm_in_channels=16 + 6 * 8, norm_groups=32)


@torch.no_grad()
def test_sdxl_beta_layout_matches_diffusers() -> None:
    ours = randomize_(UNetModel(XL), 4).eval().requires_grad_(False)
    dcfg = diffusers_config(XL)
    unet2d = UNet2DConditionModel(**dcfg).eval()
    checkpoint = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    unet2d.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, dcfg), strict=True)
    config = tiny_motion_config("sdxl_beta", (32, 64, 96))
    sd = random_motion_state_dict(config, seed=6)
    adapter = MotionAdapter(block_out_channels=(32, 64, 96), motion_layers_per_block=2, motion_max_seq_length=32,
                            use_motion_mid_block=False)
    adapter.load_state_dict(original_to_diffusers(sd), strict=True)
    theirs = UNetMotionModel.from_unet2d(unet2d, adapter).eval()
    theirs.add_embedding.load_state_dict(unet2d.add_embedding.state_dict())  # from_unet2d leaves SDXL's out
    for module in theirs.modules():
        if type(module).__name__ == "AnimateDiffTransformer3D":
            module.norm = _PerFrameNorm(module.norm)
    motion = build_motion_modules(sd)
    assert motion.config.version == "sdxl_beta"
    frames = 8
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(frames, 4, 8, 8, generator=gen)
    context = torch.randn(1, 5, 32, generator=gen).expand(frames, -1, -1)
    pooled = torch.randn(1, 16, generator=gen)
    y = sdxl_adm(pooled, 768, 1024, 32, 16, 640, 896, adm_in_channels=XL.adm_in_channels)
    added = {"text_embeds": pooled, "time_ids": torch.tensor([[1024.0, 768.0, 16.0, 32.0, 896.0, 640.0]])}
    t = torch.tensor(333.0)
    reference = theirs(x.permute(1, 0, 2, 3)[None], t, context, added_cond_kwargs=added).sample[0]
    out = ours(x, t.expand(frames), context, y.expand(frames, -1), patches=motion_patches(motion, XL.num_res_blocks))
    assert relative_error(out, reference.permute(1, 0, 2, 3)) < 1e-4


@torch.no_grad()
def test_v1_clip_group_norm_spans_the_frames_as_v1s_unet_did() -> None:
    gen = torch.Generator().manual_seed(11)
    norm = nn.GroupNorm(8, 32)
    norm.weight.copy_(1 + 0.2 * torch.randn(32, generator=gen))
    norm.bias.copy_(0.1 * torch.randn(32, generator=gen))
    layers = nn.Sequential(norm, nn.SiLU())
    x = torch.randn(2 * 4, 32, 5, 5, generator=gen)  # two clips of 4 frames
    with clip_group_norm(4):
        out = norm_first(layers, x)
    # v1's ResBlocks applied nn.GroupNorm to [B, C, F, H, W]
    clips = x.reshape(2, 4, 32, 5, 5).transpose(1, 2)
    reference = F.silu(norm(clips)).transpose(1, 2).reshape(x.shape)
    assert torch.allclose(out, reference, atol=1e-5)
    assert torch.allclose(norm_first(layers, x), layers(x))  # outside the block: per frame

    ours, _, motion, _ = _pair("v1")
    t = torch.full((4,), 301.0)
    ctx = torch.zeros(4, 5, 32)
    frames = torch.randn(4, 4, 8, 8, generator=gen)
    moved = frames.clone()
    moved[3] += 1.0
    still = motion_patches(motion, UNET.num_res_blocks, scale=0.0)  # no temporal attention: only the norms couple
    with clip_group_norm(4):
        a, b = ours(frames, t, ctx, patches=still), ours(moved, t, ctx, patches=still)
    assert not torch.allclose(a[0], b[0], atol=1e-4)
    assert torch.allclose(ours(frames, t, ctx, patches=still)[0], ours(moved, t, ctx, patches=still)[0], atol=1e-5)


@torch.no_grad()
def test_motion_lora_equals_merged_weights_and_leaves_the_module_unchanged(tmp_path) -> None:
    ours, _, motion, sd = _pair("v3")
    lora = random_motion_lora(tiny_motion_config("v2", WIDTHS), seed=3)  # a v2 LoRA: its mid-block pairs are skipped
    path = tmp_path / "v2_lora_PanLeft.ckpt"
    torch.save(lora, path)
    deltas = motion_lora_deltas(read_motion_lora(path), motion.config, path.name, strength=0.7)
    assert not any(k.startswith("mid_block") for k in deltas) and len(deltas) == 4 * 2 * (3 * 2 + 3 * 3)
    merged = build_motion_modules({k: v + deltas.get(k, 0) for k, v in sd.items()})
    x, context = _inputs()
    t = torch.full((FRAMES,), 401.0)
    ctx = context.expand(FRAMES, -1, -1)
    before = {k: v.clone() for k, v in motion.state_dict().items()}
    out = ours(x, t, ctx, patches=motion_patches(motion, UNET.num_res_blocks, deltas=deltas))
    reference = ours(x, t, ctx, patches=motion_patches(merged, UNET.num_res_blocks))
    plain = ours(x, t, ctx, patches=motion_patches(motion, UNET.num_res_blocks))
    assert relative_error(out, reference) < 1e-5
    assert relative_error(out, plain) > 1e-3
    assert all(torch.equal(v, before[k]) for k, v in motion.state_dict().items())
    with pytest.raises(CheckpointError, match=r"mm\.safetensors is not a motion LoRA"):
        motion_lora_deltas(sd, motion.config, "mm.safetensors")


@pytest.mark.parametrize("version", ["v1", "v2", "v3", "sdxl_beta"])
def test_real_size_layouts_name_diffusers_keys_and_detect(version: str) -> None:
    channels = (320, 640, 1280) if version == "sdxl_beta" else (320, 640, 1280, 1280)
    config = tiny_motion_config(version, channels)
    with torch.device("meta"):
        ours = MotionModuleSet(config).state_dict()
        adapter = MotionAdapter(block_out_channels=channels, motion_layers_per_block=2,
                                motion_max_seq_length=config.max_len, use_motion_mid_block=config.mid).state_dict()
    mapped = original_to_diffusers(ours)
    assert set(mapped) == set(adapter)
    assert all(tuple(mapped[k].shape) == tuple(adapter[k].shape) for k in adapter)
    detected = detect_motion_config(ours, "real")
    assert detected == config
    # attention heads of 40, 80, 160 channels: 8 heads as in every release
    assert ours["down_blocks.0.motion_modules.0.temporal_transformer.proj_in.weight"].shape == (320, 320)


@torch.no_grad()
def test_other_dtypes_run_on_a_placed_copy_and_the_loaded_set_stays() -> None:
    ours, _, motion, _ = _pair("v3")
    cpu = torch.device("cpu")
    half = placed(motion, cpu, torch.bfloat16)
    assert half is not motion and placed(motion, cpu, torch.bfloat16) is half
    assert placed(motion, cpu, torch.float32) is motion
    assert next(motion.parameters()).dtype == torch.float32 and next(half.parameters()).dtype == torch.bfloat16
    x, context = _inputs()
    t = torch.full((FRAMES,), 301.0)
    ctx = context.expand(FRAMES, -1, -1)
    patches = motion_patches(motion, UNET.num_res_blocks)
    full = ours(x, t, ctx, patches=patches)
    low = ours.to(torch.bfloat16)(x.bfloat16(), t, ctx.bfloat16(), patches=patches).float()
    assert relative_error(low, full) < 0.05
    assert next(motion.parameters()).dtype == torch.float32
