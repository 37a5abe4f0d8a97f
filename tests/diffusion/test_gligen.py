"""GLIGEN: position net and fusers against diffusers (same random weights, fp32), the UNet with its fusers
against diffusers' gated UNet, the identity at alpha = 0, boxes on conditioning, file loading and errors."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from diffusers.models.attention import GatedSelfAttentionDense as TheirFuser
from diffusers.models.embeddings import GLIGENTextBoundingboxProjection

from diffusion.checkpoints.files import CheckpointError
from diffusion.checkpoints.unet_keys import diffusers_to_original_unet_keys
from diffusion.models.gligen import (
    GatedSelfAttentionDense,
    GLIGENModel,
    PositionNet,
    gligen_from_state_dict,
    load_gligen,
    random_gligen,
    write_random_gligen,
)
from diffusion.models.unet import UNetConfig, UNetModel
from diffusion.patches.gligen_patch import GLIGENHandle, append_box, box_tensors, grounding_patches
from diffusion.patches.unet_patches import UNetPatches
from diffusion.sampling.guidance import CFGGuider
from diffusion.sampling.model_sampling import ModelSampling
from diffusion.sampling.schedules import DiscreteSchedule
from tests.diffusion.random_weights import randomize_, relative_error
from tests.diffusion.test_unet import PREFIX, diffusers_config

TOLERANCE = 1e-4
# SD1 layout (conv projections, fixed head count), two levels with attention: 5 transformer blocks with fusers
SD1 = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), transformer_depth=(1, 1, 0), context_dim=24,
                 num_heads=2, norm_groups=8, num_res_blocks=1)
SDXL_LIKE = UNetConfig(model_channels=32, channel_mult=(1, 2), transformer_depth=(0, 2), transformer_depth_middle=2,
                       context_dim=24, num_heads=-1, num_head_channels=16, use_linear_in_transformer=True,
                       norm_groups=8, num_res_blocks=1)


def randomize_all_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """`randomize_` for tensors, and distinct nonzero gates (scalars) so the fusers matter."""
    scalars = {n: p for n, p in module.named_parameters() if p.ndim == 0}
    for p in scalars.values():
        p.requires_grad_(False)
        p.unsqueeze_(0)  # randomize_ needs a first dimension; restored below
    randomize_(module, seed)
    with torch.no_grad():
        for k, p in enumerate(scalars.values()):
            p.squeeze_(0)
            p.fill_(0.3 + 0.1 * (k % 5))
    return module


def objects(batch: int, count: int, dim: int, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    corner = torch.rand(batch, 30, 2, generator=gen) * 0.6
    boxes = torch.cat([corner, corner + 0.1 + torch.rand(batch, 30, 2, generator=gen) * 0.3], -1)
    masks = torch.zeros(batch, 30)
    masks[:, :count] = 1
    return boxes, masks, torch.randn(batch, 30, dim, generator=gen)


@torch.no_grad()
def test_position_net_matches_diffusers() -> None:
    theirs = randomize_(GLIGENTextBoundingboxProjection(positive_len=24, out_dim=32), 0).eval()
    ours = PositionNet(24, 32)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    boxes, masks, phrases = objects(2, 3, 24)
    reference = theirs(boxes, masks, positive_embeddings=phrases)
    out = ours(boxes, masks, phrases)
    assert out.shape == (2, 30, 32)
    assert relative_error(out, reference) < TOLERANCE
    # masked slots are the null token, whatever their box and phrase say
    assert torch.allclose(out[:, 5], out[:, 29], atol=1e-6)
    assert not torch.allclose(out[:, 0], out[:, 29], atol=1e-3)


@torch.no_grad()
def test_fuser_matches_diffusers() -> None:
    theirs = randomize_all_(TheirFuser(32, 24, 2, 16), 1).eval()
    ours = GatedSelfAttentionDense(32, 24, heads=2)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    gen = torch.Generator().manual_seed(4)
    x, objs = torch.randn(2, 20, 32, generator=gen), torch.randn(2, 30, 24, generator=gen)
    reference = theirs(x, objs)
    assert relative_error(ours(x, objs), reference) < TOLERANCE
    assert relative_error(ours(x, objs) - x, reference - x) < TOLERANCE  # the fuser's own contribution
    # the head count comes from the block the fuser runs in, not from how it was built
    eight = GatedSelfAttentionDense(32, 24, heads=8).eval()
    eight.load_state_dict(theirs.state_dict(), strict=True)
    assert relative_error(eight(x, objs, heads=2), reference) < TOLERANCE
    assert relative_error(eight(x, objs), reference) > 1e-3


@torch.no_grad()
def test_fuser_with_zero_gates_is_the_identity_bit_for_bit() -> None:
    unet = randomize_(UNetModel(SD1), 0).eval()
    gligen = random_gligen(unet, phrase_dim=24, seed=2, alpha=0.0)
    gen = torch.Generator().manual_seed(5)
    x, context = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 7, 24, generator=gen)
    t = torch.tensor([10.0, 700.0])
    handle = GLIGENHandle(gligen, "zero.safetensors")
    options = [{"gligen": ("position", handle, [(torch.randn(1, 24, generator=gen), 8, 8, 2, 4)])}, {}]
    patches = grounding_patches(options, 1, (16, 16))
    assert patches is not None and patches.after_self_attention
    assert torch.equal(unet(x, t, context, patches=patches), unet(x, t, context))
    # nonzero gates do change it (so the equality above is not vacuous)
    handle.model = random_gligen(unet, phrase_dim=24, seed=2, alpha=0.5)
    patches = grounding_patches(options, 1, (16, 16))
    assert not torch.allclose(unet(x, t, context, patches=patches), unet(x, t, context), atol=1e-4)


def to_diffusers(gligen: GLIGENModel, config: UNetConfig) -> dict[str, torch.Tensor]:
    """Our GLIGEN weights under diffusers' gated UNet names (the block prefix found through attn1's key)."""
    prefixes = {ours[: -len(".attn1.to_q.weight")]: theirs[: -len(".attn1.to_q.weight")]
                for theirs, ours in diffusers_to_original_unet_keys(config).items()
                if ours.endswith(".attn1.to_q.weight")}
    out = {}
    for key, value in gligen.state_dict().items():
        if key.startswith("position_net."):
            out[key] = value
        else:
            block, rest = key.split(".fuser.")
            out[f"{prefixes[block]}.fuser.{rest}"] = value
    return out


@torch.no_grad()
def test_unet_with_fusers_matches_diffusers_gated_unet() -> None:
    ours = randomize_(UNetModel(SD1), 0).eval()
    gligen = random_gligen(ours, phrase_dim=24, seed=1)
    randomize_all_(gligen, 6)
    dcfg = diffusers_config(SD1)
    theirs = UNet2DConditionModel(**dcfg, attention_type="gated").eval()
    weights = convert_ldm_unet_checkpoint({PREFIX + k: v for k, v in ours.state_dict().items()}, dcfg)
    weights.update(to_diffusers(gligen, SD1))
    theirs.load_state_dict(weights, strict=True)

    gen = torch.Generator().manual_seed(8)
    x, context = torch.randn(2, 4, 12, 16, generator=gen), torch.randn(2, 7, 24, generator=gen)
    t = torch.tensor([50.0, 650.0])
    phrases = [torch.randn(1, 24, generator=gen) for _ in range(2)]
    boxes = [(phrases[0], 4.0, 6.0, 1.0, 2.0), (phrases[1], 8.0, 8.0, 4.0, 7.0)]  # (h, w, y, x) latent units
    handle = GLIGENHandle(gligen, "random.safetensors")
    # row 0 grounded on two boxes, row 1 (a negative without boxes) on null tokens, in one call
    patches = grounding_patches([{"gligen": ("position", handle, boxes)}, {}], 1, (12, 16))
    out = ours(x, t, context, patches=patches)

    xyxy, masks, embeds = (torch.stack(p) for p in zip(box_tensors(boxes, 12, 16, 24), box_tensors([], 12, 16, 24),
                                                         strict=True))
    reference = theirs(x, t, context, cross_attention_kwargs={
        "gligen": {"boxes": xyxy, "masks": masks, "positive_embeddings": embeds}}).sample
    assert relative_error(out, reference) < TOLERANCE
    assert not torch.allclose(out, ours(x, t, context), atol=1e-3)


def test_box_tensors_normalise_to_the_latent() -> None:
    phrase = torch.arange(4.0).reshape(1, 4)
    xyxy, masks, phrases = box_tensors([(phrase, 4.0, 6.0, 1.0, 2.0)], 8, 16, 4)
    assert torch.allclose(xyxy[0], torch.tensor([2 / 16, 1 / 8, 8 / 16, 5 / 8]))
    assert masks.tolist() == [1.0] + [0.0] * 29 and torch.equal(phrases[0], phrase[0])
    assert xyxy[1:].abs().sum() == 0 and phrases[1:].abs().sum() == 0


def test_boxes_append_across_applies_and_inputs_stay_unchanged() -> None:
    handle = GLIGENHandle(GLIGENModel(PositionNet(4, 6), {}), "g.safetensors")
    cond = [(torch.zeros(1, 77, 6), {"strength": 0.5})]
    a, b = torch.ones(1, 4), torch.full((1, 4), 2.0)
    once = append_box(cond, handle, a, width=64, height=32, x=8, y=16)
    twice = append_box(once, handle, b, width=128, height=64, x=0, y=0)
    assert "gligen" not in cond[0][1] and len(once[0][1]["gligen"][2]) == 1
    kind, model, boxes = twice[0][1]["gligen"]
    assert kind == "position" and model is handle and twice[0][1]["strength"] == 0.5
    assert [box[1:] for box in boxes] == [(4.0, 8.0, 2.0, 1.0), (8.0, 16.0, 0.0, 0.0)]
    assert boxes[0][0] is a and boxes[1][0] is b


def test_append_box_limits_and_family_errors() -> None:
    handle = GLIGENHandle(GLIGENModel(PositionNet(4, 6), {}), "gligen_sd14.safetensors")
    cond = [(torch.zeros(1, 77, 6), {})]
    for _ in range(30):
        cond = append_box(cond, handle, torch.ones(1, 4), 8, 8, 0, 0)
    with pytest.raises(ValueError, match="at most 30 boxes"):
        append_box(cond, handle, torch.ones(1, 4), 8, 8, 0, 0)
    with pytest.raises(ValueError, match=r"gligen_sd14\.safetensors.*SDXL checkpoint"):
        append_box([(torch.zeros(1, 77, 6), {})], handle, torch.ones(1, 4), 8, 8, 0, 0, clip_family="sdxl")
    with pytest.raises(ValueError, match="pooled output is 5 wide"):
        append_box([(torch.zeros(1, 77, 6), {})], handle, torch.ones(1, 5), 8, 8, 0, 0)
    real = GLIGENHandle(GLIGENModel(PositionNet(768, 768), {}), "gligen_sd14.safetensors")
    with pytest.raises(ValueError, match=r"gligen_sd14\.safetensors.*SD1\.x.*1024 wide \(SD2\.x\)"):
        append_box([(torch.zeros(1, 77, 1024), {})], real, torch.ones(1, 768), 8, 8, 0, 0)


@torch.no_grad()
def test_gligen_on_a_model_without_matching_blocks_names_both() -> None:
    sd1 = randomize_(UNetModel(SD1), 0).eval()
    other = randomize_(UNetModel(SDXL_LIKE), 0).eval()
    handle = GLIGENHandle(random_gligen(sd1, 24), "gligen_sd14_textbox_pruned.safetensors")
    patches = grounding_patches([{"gligen": ("position", handle, [(torch.ones(1, 24), 4, 4, 0, 0)])}], 1, (8, 8))
    with pytest.raises(ValueError, match=r"gligen_sd14_textbox_pruned.*no fuser.*input_blocks\.\d\.1\.transformer"
                                         r"_blocks\.\d.*not the SD1\.x UNet"):
        other(torch.randn(1, 4, 8, 8), torch.tensor([5.0]), torch.randn(1, 3, 24), patches=patches)


def test_file_round_trip_prefixes_and_errors(tmp_path) -> None:
    unet = UNetModel(SD1)
    path = tmp_path / "gligen.safetensors"
    written = write_random_gligen(path, unet, phrase_dim=24, seed=4)
    loaded = load_gligen(path)
    assert written.state_dict().keys() == loaded.state_dict().keys()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in written.state_dict().items())
    assert sorted(loaded.sites) == sorted([("input", 1, 0), ("input", 3, 0), ("middle", 0, 0), ("output", 2, 0),
                                           ("output", 3, 0), ("output", 4, 0), ("output", 5, 0)])
    assert "input_blocks.1.1.transformer_blocks.0.fuser.attn.to_q.weight" in loaded.state_dict()
    # a .pth with the original checkpoint's prefix loads too (read without executing pickled code)
    prefixed = {f"model.diffusion_model.{k}": v for k, v in written.state_dict().items()}
    torch.save(prefixed, tmp_path / "gligen.pth")
    assert math.isclose(float(load_gligen(tmp_path / "gligen.pth").position_net.null_positive_feature.sum()),
                        float(written.position_net.null_positive_feature.sum()), rel_tol=1e-6)
    sd = written.state_dict()
    with pytest.raises(CheckpointError, match=r"broken\.safetensors: not a GLIGEN"):
        gligen_from_state_dict({k: v for k, v in sd.items() if "fuser" in k}, "broken.safetensors")
    bad = dict(sd)
    bad["input_blocks.1.1.transformer_blocks.0.fuser.norm1.weight"] = torch.ones(5)
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: GLIGEN weights do not fit"):
        gligen_from_state_dict(bad, "bad.safetensors")


class _Recorder:
    """A denoiser that records its calls and returns x (the guider only needs a tensor back)."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, x, sigma, context, **kwargs):
        self.calls.append({"x": x, "context": context, **kwargs})
        return torch.zeros_like(x)


def test_guider_batches_grounded_and_plain_entries_in_one_call() -> None:
    gligen = GLIGENModel(randomize_(PositionNet(4, 6), 3), {})
    handle = GLIGENHandle(gligen, "g.safetensors")
    plain = [(torch.zeros(1, 77, 6), {})]
    positive = append_box(plain, handle, torch.ones(1, 4), 32, 16, 8, 0)
    recorder = _Recorder()
    guider = CFGGuider(recorder, ModelSampling(DiscreteSchedule.from_config(), "eps"), positive, plain, 7.0)
    guider(torch.zeros(2, 4, 8, 8), torch.tensor(1.0))
    assert len(recorder.calls) == 1 and recorder.calls[0]["x"].shape[0] == 4
    patches = recorder.calls[0]["unet_patches"]
    assert isinstance(patches, UNetPatches)
    _, tokens = patches.after_self_attention[0]._model_and_tokens(torch.zeros(1, dtype=torch.float32))
    assert tokens.shape == (4, 30, 6)
    expected = gligen.position_net(*(t[None] for t in box_tensors(positive[0][1]["gligen"][2], 8, 8, 4)))
    null = gligen.position_net(*(t[None] for t in box_tensors([], 8, 8, 4)))
    assert torch.allclose(tokens[:2], expected.expand(2, -1, -1), atol=1e-6)
    assert torch.allclose(tokens[2:], null.expand(2, -1, -1), atol=1e-6)
    # no boxes anywhere: no patches passed
    CFGGuider(recorder, guider.model_sampling, plain, plain, 7.0)(torch.zeros(1, 4, 8, 8), torch.tensor(1.0))
    assert "unet_patches" not in recorder.calls[-1]


@torch.no_grad()
def test_half_precision_unet_with_a_float32_gligen() -> None:
    """The UNet may run in bf16/fp16 while the GLIGEN file loaded in fp32: the fusers run in the UNet's dtype."""
    unet = randomize_(UNetModel(SD1), 0).eval()
    handle = GLIGENHandle(random_gligen(unet, phrase_dim=24, seed=3), "g.safetensors")
    gen = torch.Generator().manual_seed(9)
    x, context = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 5, 24, generator=gen)
    t = torch.tensor([100.0, 500.0])
    options = [{"gligen": ("position", handle, [(torch.randn(1, 24, generator=gen), 4, 4, 0, 2)])}, {}]
    full = unet(x, t, context, patches=grounding_patches(options, 1, (8, 8)))
    half = unet.to(torch.bfloat16)(x.bfloat16(), t, context.bfloat16(), patches=grounding_patches(options, 1, (8, 8)))
    assert half.dtype == torch.bfloat16 and next(handle.model.parameters()).dtype == torch.float32
    assert relative_error(half.float(), full) < 0.05
