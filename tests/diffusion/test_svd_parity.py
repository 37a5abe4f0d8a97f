"""Stable Video Diffusion against diffusers on identical random weights (fp32): the spatio-temporal UNet
(`UNetSpatioTemporalConditionModel`) and the temporal VAE decoder (`TemporalDecoder`).

Our modules use Stability's single-file key layout; the map to diffusers' names lives here, for the test only.
Its key sets must match exactly both ways, so a missing or misnamed temporal layer fails before any number does.
Widths are multiples of 32 because diffusers fixes 32 GroupNorm groups in these blocks."""

from __future__ import annotations

import re

import pytest
import torch
from diffusers import UNetSpatioTemporalConditionModel
from diffusers.models.autoencoders.autoencoder_kl_temporal_decoder import TemporalDecoder

from diffusion.models.svd_unet import SVDUNet, SVDUNetConfig, svd_adm
from diffusion.models.svd_vae import SVDAutoencoder
from diffusion.models.vae import VAEConfig
from tests.diffusion.random_weights import randomize_, relative_error

TINY = SVDUNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=2, transformer_depth=(1, 0),
                     transformer_depth_middle=1, context_dim=32, num_head_channels=32, adm_in_channels=24,
                     norm_groups=32)
TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=2, norm_groups=32)
RES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
       "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def diffusers_unet(c: SVDUNetConfig) -> UNetSpatioTemporalConditionModel:
    levels = len(c.channel_mult)
    down = tuple("CrossAttnDownBlockSpatioTemporal" if d else "DownBlockSpatioTemporal" for d in c.transformer_depth)
    up = tuple("CrossAttnUpBlockSpatioTemporal" if d else "UpBlockSpatioTemporal"
               for d in reversed(c.transformer_depth))
    widths = tuple(m * c.model_channels for m in c.channel_mult)
    return UNetSpatioTemporalConditionModel(
        in_channels=c.in_channels, out_channels=c.out_channels, down_block_types=down, up_block_types=up,
        block_out_channels=widths, addition_time_embed_dim=c.adm_in_channels // 3,
        projection_class_embeddings_input_dim=c.adm_in_channels, layers_per_block=c.num_res_blocks,
        cross_attention_dim=c.context_dim, num_attention_heads=tuple(w // c.num_head_channels for w in widths),
        transformer_layers_per_block=1, num_frames=levels)


def _inner(rest: str, kind: str) -> str:
    """A key inside one of our layers → its name inside the diffusers layer of `kind` ("res" or "attn")."""
    if kind == "res":
        if rest == "time_mixer.mix_factor":
            return rest
        side = "temporal_res_block" if rest.startswith("time_stack.") else "spatial_res_block"
        rest = rest.removeprefix("time_stack.")
        for ours, theirs in RES.items():
            if rest.startswith(ours + "."):
                return f"{side}.{theirs}{rest[len(ours):]}"
        raise KeyError(rest)
    rest = re.sub(r"^time_stack\.", "temporal_transformer_blocks.", rest)
    return rest.replace("time_pos_embed.0.", "time_pos_embed.linear_1.").replace(
        "time_pos_embed.2.", "time_pos_embed.linear_2.")


def unet_key(key: str, c: SVDUNetConfig) -> str:
    """Our (Stability single-file) UNet key → diffusers'."""
    top = {"time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
           "label_emb.0.0.": "add_embedding.linear_1.", "label_emb.0.2.": "add_embedding.linear_2.",
           "input_blocks.0.0.": "conv_in.", "out.0.": "conv_norm_out.", "out.2.": "conv_out."}
    for ours, theirs in top.items():
        if key.startswith(ours):
            return theirs + key[len(ours):]
    per = c.num_res_blocks + 1
    if m := re.match(r"input_blocks\.(\d+)\.(\d)\.(.*)", key):
        index, layer, rest = int(m[1]) - 1, int(m[2]), m[3]
        level, j = divmod(index, per)
        if j == c.num_res_blocks:
            return f"down_blocks.{level}.downsamplers.0.conv.{rest.removeprefix('op.')}"
        kind = "res" if layer == 0 else "attn"
        return f"down_blocks.{level}.{'resnets' if kind == 'res' else 'attentions'}.{j}.{_inner(rest, kind)}"
    if m := re.match(r"middle_block\.(\d)\.(.*)", key):
        layer, rest = int(m[1]), m[2]
        if layer == 1:
            return f"mid_block.attentions.0.{_inner(rest, 'attn')}"
        return f"mid_block.resnets.{layer // 2}.{_inner(rest, 'res')}"
    if m := re.match(r"output_blocks\.(\d+)\.(\d)\.(.*)", key):
        level, j = divmod(int(m[1]), per)
        layer, rest = int(m[2]), m[3]
        if rest.startswith("conv."):
            return f"up_blocks.{level}.upsamplers.0.{rest}"
        kind = "res" if layer == 0 else "attn"
        return f"up_blocks.{level}.{'resnets' if kind == 'res' else 'attentions'}.{j}.{_inner(rest, kind)}"
    raise KeyError(key)


def test_unet_step_matches_diffusers() -> None:
    torch.manual_seed(0)
    ours = randomize_(SVDUNet(TINY), seed=3).eval()
    theirs = diffusers_unet(TINY).eval()
    converted = {unet_key(k, TINY): v for k, v in ours.state_dict().items()}
    assert converted.keys() == theirs.state_dict().keys()
    theirs.load_state_dict(converted, strict=True)

    clips, frames = 2, 5
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(clips, frames, TINY.in_channels, 8, 8, generator=gen)
    context = torch.randn(clips, 1, TINY.context_dim, generator=gen)
    sigma = torch.tensor([3.0, 0.5])
    t = 0.25 * sigma.log()
    time_ids = torch.tensor([[5.0, 127.0, 0.02], [9.0, 30.0, 0.0]])
    with torch.no_grad():
        expected = theirs(x, t, context, time_ids).sample  # [clips, frames, 4, 8, 8]
        y = torch.cat([svd_adm(fps + 1, motion, aug, TINY.adm_in_channels) for fps, motion, aug in time_ids.tolist()])
        got = ours(x.flatten(0, 1), t.repeat_interleave(frames), context.repeat_interleave(frames, 0),
                   y.repeat_interleave(frames, 0), frames)
    assert got.shape == (clips * frames, TINY.out_channels, 8, 8)
    err = relative_error(got, expected.flatten(0, 1))
    assert err < 1e-4, err
    # the temporal layers matter: the same frames as five one-frame clips give another answer
    with torch.no_grad():
        apart = ours(x.flatten(0, 1), t.repeat_interleave(frames), context.repeat_interleave(frames, 0),
                     y.repeat_interleave(frames, 0), 1)
    assert relative_error(apart, expected.flatten(0, 1)) > 1e-2


def test_adm_order_is_fps_minus_one_motion_augmentation() -> None:
    from diffusion.models.unet_blocks import timestep_embedding

    y = svd_adm(6, 127, 0.5, 768)
    parts = y.reshape(3, 256)
    for part, value in zip(parts, (5.0, 127.0, 0.5), strict=True):
        torch.testing.assert_close(part, timestep_embedding(torch.tensor([value]), 256)[0])


def test_config_from_state_dict_recovers_the_tiny_config() -> None:
    with torch.device("meta"):
        sd = SVDUNet(TINY).state_dict()
    assert SVDUNetConfig.from_state_dict(sd, num_head_channels=32, norm_groups=32) == TINY
    real = SVDUNetConfig()
    with torch.device("meta"):
        real_sd = SVDUNet(real).state_dict()
    assert SVDUNetConfig.from_state_dict(real_sd) == real
    with pytest.raises(ValueError, match="not an SVD UNet"):
        SVDUNetConfig.from_state_dict({k: v for k, v in sd.items() if "time_stack" not in k})


def vae_key(key: str, c: VAEConfig) -> str:
    """Our decoder key (under `decoder.`) → diffusers TemporalDecoder's."""
    key = key.removeprefix("decoder.")
    spatial = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}

    def block(rest: str) -> str:
        if rest == "mix_factor":
            return "time_mixer.mix_factor"
        if rest.startswith("time_stack."):
            return "temporal_res_block." + _inner(rest, "res").split(".", 1)[1]
        name, _, param = rest.partition(".")
        return f"spatial_res_block.{spatial[name]}.{param}"

    if key.startswith("conv_out.time_mix_conv."):
        return "time_conv_out." + key.rsplit(".", 1)[1]
    if key.startswith("norm_out."):
        return "conv_norm_out." + key.rsplit(".", 1)[1]
    if m := re.match(r"mid\.block_(\d)\.(.*)", key):
        return f"mid_block.resnets.{int(m[1]) - 1}.{block(m[2])}"
    if m := re.match(r"mid\.attn_1\.(\w+)\.(\w+)", key):
        names = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
        return f"mid_block.attentions.0.{names[m[1]]}.{m[2]}"
    if m := re.match(r"up\.(\d+)\.block\.(\d+)\.(.*)", key):
        return f"up_blocks.{len(c.ch_mult) - 1 - int(m[1])}.resnets.{m[2]}.{block(m[3])}"
    if m := re.match(r"up\.(\d+)\.upsample\.conv\.(\w+)", key):
        return f"up_blocks.{len(c.ch_mult) - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
    return key


def test_temporal_decoder_matches_diffusers() -> None:
    ours = randomize_(SVDAutoencoder(TINY_VAE), seed=5).eval()
    theirs = TemporalDecoder(in_channels=4, out_channels=3, block_out_channels=(32, 64), layers_per_block=2).eval()
    converted = {}
    for key, value in ours.state_dict().items():
        if key.startswith("decoder."):
            name = vae_key(key, TINY_VAE)
            converted[name] = value.reshape(value.shape[:2]) if name.endswith(
                ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")) else value
    assert converted.keys() == theirs.state_dict().keys()
    theirs.load_state_dict(converted, strict=True)
    frames = 6
    z = torch.randn(frames, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = theirs(z, image_only_indicator=torch.zeros(1, frames), num_frames=frames)
        got = ours.decode(z)
        two_clips = ours.decode(torch.cat([z, z]), frames)
    err = relative_error(got, expected)
    assert err < 1e-4, err
    assert relative_error(two_clips[frames:], expected) < 1e-4  # clips decode apart
    with torch.no_grad():
        per_frame = torch.cat([ours.decode(z[i:i + 1]) for i in range(frames)])
    assert relative_error(per_frame, expected) > 1e-2  # the time mixing is in play


def test_real_size_layout_maps_onto_diffusers_svd() -> None:
    """At SVD's real size (diffusers' default config is SVD's) every key maps onto diffusers' with the same shape,
    both ways: the single-file layout of the released files is what we build."""
    real = SVDUNetConfig()
    with torch.device("meta"):
        ours = SVDUNet(real).state_dict()
        theirs = UNetSpatioTemporalConditionModel().state_dict()
    converted = {unet_key(k, real): tuple(v.shape) for k, v in ours.items()}
    assert converted == {k: tuple(v.shape) for k, v in theirs.items()}

    vae = VAEConfig()
    with torch.device("meta"):
        decoder = SVDAutoencoder(vae).state_dict()
        reference = TemporalDecoder(block_out_channels=(128, 256, 512, 512), layers_per_block=2).state_dict()
    mapped = {vae_key(k, vae): v.shape[:2] if k.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight"))
              and ".attn_1." in k else v.shape for k, v in decoder.items() if k.startswith("decoder.")}
    assert {k: tuple(v) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in reference.items()}
