"""IP-Adapter: image projections and a full UNet step against diffusers (same random weights, fp32), weight 0
and the step range leave the UNet bit for bit unchanged, combined images, the attention mask, files and errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from diffusion.checkpoints.files import CheckpointError
from diffusion.models.ip_adapter import (
    IPAdapterError,
    cross_attention_numbers,
    ip_adapter_from_state_dict,
    load_ip_adapter,
    random_ip_adapter,
    write_random_ip_adapter,
)
from diffusion.models.unet import UNetModel
from diffusion.patches.ip_adapter_patch import (
    IPAdapterHandle,
    IPAttentionHook,
    check_fits,
    combine_embeds,
    image_tokens,
    ip_adapter_patches,
)
from diffusion.patches.unet_patches import Site, batch_roles
from tests.diffusion.random_weights import randomize_, relative_error
from tests.diffusion.test_gligen import SD1, SDXL_LIKE
from tests.diffusion.test_unet import PREFIX, diffusers_config

TOLERANCE = 1e-4
CLIP = 32


def nested(model) -> dict[str, dict[str, torch.Tensor]]:
    """Our state dict as the released `.bin` holds it: {"image_proj": {...}, "ip_adapter": {...}}."""
    parts: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in model.state_dict().items():
        part, _, rest = key.partition(".")
        parts[part][rest] = value
    return parts


def diffusers_unet(ours: UNetModel, config) -> UNet2DConditionModel:
    dcfg = diffusers_config(config)
    theirs = UNet2DConditionModel(**dcfg).eval()
    theirs.load_state_dict(convert_ldm_unet_checkpoint({PREFIX + k: v for k, v in ours.state_dict().items()}, dcfg))
    return theirs


def embeds_for(variant: str, batch: int, seed: int = 5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, CLIP, generator=gen) if variant == "plain" else torch.randn(batch, 6, CLIP, generator=gen)


@pytest.mark.parametrize("variant", ["plain", "plus", "full"])
@torch.no_grad()
def test_image_projection_matches_diffusers(variant: str) -> None:
    unet = randomize_(UNetModel(SD1), 0).eval()
    ours = random_ip_adapter(unet, variant, clip_dim=CLIP, tokens=4, width=128, depth=4, seed=1)
    theirs = diffusers_unet(unet, SD1)._convert_ip_adapter_image_proj_to_diffusers(
        nested(ours)["image_proj"], low_cpu_mem_usage=False)
    expected = {"plain": "ImageProjection", "plus": "IPAdapterPlusImageProjection",
                "full": "IPAdapterFullImageProjection"}[variant]
    assert type(theirs).__name__ == expected
    embeds = embeds_for(variant, 3)
    out = ours.project(embeds)
    assert out.shape[-1] == SD1.context_dim
    assert relative_error(out, theirs(embeds)) < TOLERANCE


@pytest.mark.parametrize(("config", "variant"), [(SD1, "plain"), (SDXL_LIKE, "plus"), (SD1, "full")])
@torch.no_grad()
def test_unet_step_matches_diffusers_ip_adapter_attention(config, variant: str) -> None:
    """Row 0 evaluates the positive (the image's tokens), row 1 the negative (zeros' tokens), as diffusers'
    pipeline batches them; weights 0.7 on both sides."""
    unet = randomize_(UNetModel(config), 0).eval()
    adapter = random_ip_adapter(unet, variant, clip_dim=CLIP, tokens=4, width=64, depth=4, seed=2)
    theirs = diffusers_unet(unet, config)
    theirs._load_ip_adapter_weights([nested(adapter)], low_cpu_mem_usage=False)
    for proc in theirs.attn_processors.values():
        if hasattr(proc, "scale"):
            proc.scale = [0.7]

    gen = torch.Generator().manual_seed(8)
    x, context = torch.randn(2, 4, 8, 12, generator=gen), torch.randn(2, 7, config.context_dim, generator=gen)
    t = torch.tensor([400.0, 400.0])
    cond = embeds_for(variant, 1)
    uncond = torch.zeros_like(cond)
    reference = theirs(x, t, context, added_cond_kwargs={"image_embeds": [torch.cat([cond, uncond])[:, None]]}).sample

    handle = IPAdapterHandle(adapter, "random.safetensors")
    numbers = check_fits(handle, unet, "tiny")
    hook = IPAttentionHook(handle, numbers, image_tokens(adapter, cond), image_tokens(adapter, uncond), 0.7,
                           float("inf"), 0.0, lambda t: t)
    with batch_roles((False, True)):
        out = unet(x, t, context, patches=ip_adapter_patches(hook))
    assert relative_error(out, reference) < TOLERANCE
    assert not torch.allclose(out, unet(x, t, context), atol=1e-3)


def test_numbering_follows_diffusers_processor_order() -> None:
    """Cross-attentions are numbered 1, 3, 5, ... over down blocks, up blocks, then the middle block, and the
    widths are the attentions' own."""
    unet = UNetModel(SDXL_LIKE)
    numbers = cross_attention_numbers(unet)
    theirs = [n for n in UNet2DConditionModel(**diffusers_config(SDXL_LIKE)).attn_processors if "attn2" in n]
    assert len(numbers) == len(theirs)
    order = sorted(numbers, key=lambda w: numbers[w][0])
    assert [numbers[w][0] for w in order] == list(range(1, 2 * len(order), 2))
    kinds = [w[0] for w in order]
    assert kinds == sorted(kinds, key=["input", "output", "middle"].index)
    assert [w for w in order if w[0] == "middle"] == [("middle", 0, 0), ("middle", 0, 1)]
    assert all(n.startswith(("down", "up", "mid")) for n in theirs)
    assert [n.split(".")[0] for n in theirs] == [{"input": "down_blocks", "output": "up_blocks",
                                                   "middle": "mid_block"}[k] for k in kinds]


def _hook(adapter, unet, weight=1.0, start=float("inf"), end=0.0, mask=None, cond=None):
    handle = IPAdapterHandle(adapter, "random.safetensors")
    cond = embeds_for(adapter.info.variant, 1) if cond is None else cond
    return IPAttentionHook(handle, check_fits(handle, unet, "tiny"), image_tokens(adapter, cond),
                           image_tokens(adapter, torch.zeros_like(cond)), weight, start, end, lambda t: t, mask)


@torch.no_grad()
def test_weight_zero_and_outside_the_step_range_change_nothing_bit_for_bit() -> None:
    unet = randomize_(UNetModel(SD1), 0).eval()
    adapter = random_ip_adapter(unet, "plain", clip_dim=CLIP, seed=3)
    gen = torch.Generator().manual_seed(1)
    x, context = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 5, SD1.context_dim, generator=gen)
    t, sigma = torch.tensor([500.0]), torch.tensor([3.0])
    plain = unet(x, t, context)
    assert torch.equal(unet(x, t, context, patches=ip_adapter_patches(_hook(adapter, unet, weight=0.0))), plain)
    # active between sigma 2.0 and 1.0 only: sigma 3 is before the range starts, 0.5 after it ends
    ranged = ip_adapter_patches(_hook(adapter, unet, start=2.0, end=1.0))
    assert torch.equal(unet(x, t, context, patches=ranged, sigmas=sigma), plain)
    assert torch.equal(unet(x, t, context, patches=ranged, sigmas=torch.tensor([0.5])), plain)
    inside = unet(x, t, context, patches=ranged, sigmas=torch.tensor([1.5]))
    assert not torch.allclose(inside, plain, atol=1e-4)


def test_combine_embeds() -> None:
    a, b, c = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]]), torch.tensor([[2.0, 2.0]])
    three = torch.cat([a, b, c])
    assert torch.equal(combine_embeds(three, "concat"), three)
    torch.testing.assert_close(combine_embeds(three, "add"), torch.tensor([[3.0, 4.0]]))
    torch.testing.assert_close(combine_embeds(three, "average"), torch.tensor([[1.0, 4 / 3]]))
    torch.testing.assert_close(combine_embeds(three, "subtract"), torch.tensor([[0.0, -2.0]]))
    # unit directions averaged, scaled to the mean length (1, 2, 2.83)
    direction = (torch.tensor([1.0, 0.0]) + torch.tensor([0.0, 1.0]) + torch.tensor([1.0, 1.0]) / 2**0.5) / 3
    torch.testing.assert_close(combine_embeds(three, "norm average")[0], direction * (1 + 2 + 8**0.5) / 3)
    torch.testing.assert_close(combine_embeds(three, "max"), torch.tensor([[2.0, 2.0]]))
    torch.testing.assert_close(combine_embeds(three, "min"), torch.tensor([[0.0, 0.0]]))
    with pytest.raises(ValueError, match="'median'"):
        combine_embeds(three, "median")


@torch.no_grad()
def test_two_images_concatenated_or_averaged() -> None:
    unet = randomize_(UNetModel(SD1), 0).eval()
    adapter = random_ip_adapter(unet, "plain", clip_dim=CLIP, seed=3)
    two = embeds_for("plain", 2)
    concat = image_tokens(adapter, two, "concat")
    assert concat.shape == (1, 8, SD1.context_dim)
    torch.testing.assert_close(concat[:, 4:], image_tokens(adapter, two[1:]))
    averaged = image_tokens(adapter, two, "average")
    torch.testing.assert_close(averaged, image_tokens(adapter, two.mean(0, keepdim=True)))
    # the same image twice, concatenated, attends exactly as the image once (softmax splits between copies)
    gen = torch.Generator().manual_seed(2)
    x, context = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 5, SD1.context_dim, generator=gen)
    t = torch.tensor([500.0])
    once = unet(x, t, context, patches=ip_adapter_patches(_hook(adapter, unet, cond=two[:1])))
    twice = unet(x, t, context, patches=ip_adapter_patches(_hook(adapter, unet, cond=two[:1].repeat(2, 1))))
    torch.testing.assert_close(once, twice, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_mask_restricts_the_image_attention_to_its_region() -> None:
    unet = randomize_(UNetModel(SD1), 0).eval()
    adapter = random_ip_adapter(unet, "plain", clip_dim=CLIP, seed=3)
    block = unet.input_blocks[1][1].transformer_blocks[0]
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 8 * 8, block.attn2.to_q.in_features, generator=gen)
    context = torch.randn(2, 5, SD1.context_dim, generator=gen)
    out = block.attn2(x, context)
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0  # the left half of the image
    site = Site(("input", 1), (2, 4, 8, 8), torch.tensor([500.0, 500.0]), size=(8, 8), transformer=0,
                attention=block.attn2)
    masked = _hook(adapter, unet, mask=mask)(out, x, site)
    unmasked = _hook(adapter, unet)(out, x, site)
    left = torch.zeros(8, 8, dtype=torch.bool)
    left[:, :4] = True
    left = left.flatten()
    assert torch.equal(masked[:, ~left], out[:, ~left])  # zero mask: the text attention's output exactly
    torch.testing.assert_close(masked[:, left], unmasked[:, left])
    assert not torch.allclose(unmasked[:, left], out[:, left], atol=1e-4)


@torch.no_grad()
def test_negative_rows_use_the_negative_tokens() -> None:
    unet = randomize_(UNetModel(SD1), 0).eval()
    adapter = random_ip_adapter(unet, "plain", clip_dim=CLIP, seed=3)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 8, 8, generator=gen).repeat(2, 1, 1, 1)
    context = torch.randn(1, 5, SD1.context_dim, generator=gen).repeat(2, 1, 1)
    t = torch.tensor([500.0, 500.0])
    patches = ip_adapter_patches(_hook(adapter, unet))
    with batch_roles((False, True)):
        both = unet(x, t, context, patches=patches)
    assert not torch.allclose(both[0], both[1], atol=1e-4)
    with batch_roles((True, True)):
        negative = unet(x, t, context, patches=patches)
    torch.testing.assert_close(both[1], negative[1], rtol=1e-5, atol=1e-5)
    positive = unet(x, t, context, patches=patches)  # no guider: every row positive
    torch.testing.assert_close(both[0], positive[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("variant", "suffix"), [("plain", "safetensors"), ("plus", "bin"), ("full", "bin")])
def test_files_load_in_both_formats(tmp_path, variant: str, suffix: str) -> None:
    unet = UNetModel(SD1)
    path = tmp_path / f"ip-adapter.{suffix}"
    written = write_random_ip_adapter(path, unet, variant, clip_dim=CLIP, width=64, seed=4)
    loaded = load_ip_adapter(path)
    assert loaded.info == written.info and loaded.info.family is None  # 24-wide text: a tiny family
    for key, value in written.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_bad_files_are_refused_with_clear_errors(tmp_path) -> None:
    unet = UNetModel(SD1)
    other = tmp_path / "lora.safetensors"
    from diffusion.checkpoints.files import write_safetensors
    write_safetensors(other, {"lora_unet_x.lora_up.weight": (torch.float32, (2, 2))}, lambda k: torch.ones(2, 2))
    with pytest.raises(IPAdapterError, match=r"lora\.safetensors: not an IP-Adapter .*lora_unet_x"):
        load_ip_adapter(other)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.bin"
    torch.save({"image_proj": {"proj.weight": torch.ones(1)}, "x": Evil()}, evil)
    with pytest.raises(CheckpointError, match="refused"):
        load_ip_adapter(evil)

    sd = random_ip_adapter(unet, "plain", clip_dim=CLIP).state_dict()
    del sd["ip_adapter.1.to_v_ip.weight"]
    with pytest.raises(IPAdapterError, match=r"missing keys \['ip_adapter\.1\.to_v_ip\.weight'\]"):
        ip_adapter_from_state_dict(sd, "cut.safetensors")


def test_adapter_for_another_family_names_both() -> None:
    sd1 = UNetModel(SD1)
    xl = random_ip_adapter(UNetModel(dataclasses.replace(SDXL_LIKE, context_dim=2048)), "plain", clip_dim=CLIP)
    with pytest.raises(IPAdapterError, match=r"is for SDXL models \(2048-wide text context\); this model is SD1\.x"):
        check_fits(IPAdapterHandle(xl, "ip-adapter_sdxl.safetensors"), sd1, "SD1.x")
    other_layout = random_ip_adapter(UNetModel(SDXL_LIKE), "plain", clip_dim=CLIP)
    with pytest.raises(IPAdapterError, match=r"does not fit this SD1\.x model"):
        check_fits(IPAdapterHandle(other_layout, "x.safetensors"), sd1, "SD1.x")


def test_the_guider_marks_the_negative_rows() -> None:
    """CFGGuider tells the UNet patches which rows of its batched call evaluate the negative list."""
    from diffusion.patches.unet_patches import uncond_rows
    from diffusion.sampling.guidance import CFGGuider
    from diffusion.sampling.model_sampling import ModelSampling
    from diffusion.sampling.schedules import DiscreteSchedule

    seen = []

    def denoiser(x, sigma, context, **kwargs):
        seen.append(uncond_rows())
        return x

    ms = ModelSampling(DiscreteSchedule.from_config(), "eps")
    positive = [(torch.zeros(1, 3, 8), {})]
    negative = [(torch.ones(1, 3, 8), {})]
    x = torch.zeros(2, 4, 8, 8)
    CFGGuider(denoiser, ms, positive, negative, 5.0)(x, torch.tensor(1.0))
    CFGGuider(denoiser, ms, positive, negative, 1.0)(x, torch.tensor(1.0))  # cfg 1: the negative is not evaluated
    assert seen == [(False, False, True, True), (False, False)]
    assert uncond_rows() is None


def _meta(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def _released(numbers, proj: dict[str, tuple[int, ...]], context: int) -> dict[str, torch.Tensor]:
    """A released file's shapes: the projection's and one key/value pair per cross-attention."""
    shapes = {f"image_proj.{k}": s for k, s in proj.items()}
    for n, width in numbers.values():
        shapes[f"ip_adapter.{n}.to_k_ip.weight"] = shapes[f"ip_adapter.{n}.to_v_ip.weight"] = (width, context)
    return _meta(shapes)


def test_real_sizes_numbering_detection_and_families() -> None:
    """Real-size UNets (built on the meta device) number 16 (SD1.x: 1..31) and 70 (SDXL: 1..139) cross-attentions,
    as the released files do; the released variants' shapes are read as what they are."""
    from diffusion.models.ip_adapter import detect
    from diffusion.models.unet import UNetConfig

    with torch.device("meta"):
        sd1, xl = UNetModel(UNetConfig.sd1()), UNetModel(UNetConfig.sdxl())
    n1, nx = cross_attention_numbers(sd1), cross_attention_numbers(xl)
    assert sorted(n for n, _ in n1.values()) == list(range(1, 32, 2))
    assert sorted(n for n, _ in nx.values()) == list(range(1, 140, 2))
    assert n1[("input", 1, 0)] == (1, 320) and n1[("middle", 0, 0)] == (31, 1280)
    assert nx[("input", 4, 0)] == (1, 640) and nx[("output", 0, 0)][1] == 1280 and nx[("middle", 0, 9)][0] == 139

    plain, _ = detect(_released(n1, {"proj.weight": (3072, 1024), "proj.bias": (3072,), "norm.weight": (768,),
                                     "norm.bias": (768,)}, 768))
    assert (plain.variant, plain.clip_dim, plain.tokens, plain.family, plain.embeds) == (
        "plain", 1024, 4, "sd1", "image_embeds")
    resampler = {"latents": (1, 16, 1280), "proj_in.weight": (1280, 1280), "proj_in.bias": (1280,),
                 "proj_out.weight": (2048, 1280), "proj_out.bias": (2048,), "norm_out.weight": (2048,),
                 "norm_out.bias": (2048,)}
    for i in range(4):
        resampler.update({f"layers.{i}.0.norm1.weight": (1280,), f"layers.{i}.0.norm1.bias": (1280,),
                          f"layers.{i}.0.norm2.weight": (1280,), f"layers.{i}.0.norm2.bias": (1280,),
                          f"layers.{i}.0.to_q.weight": (1280, 1280), f"layers.{i}.0.to_kv.weight": (2560, 1280),
                          f"layers.{i}.0.to_out.weight": (1280, 1280), f"layers.{i}.1.0.weight": (1280,),
                          f"layers.{i}.1.0.bias": (1280,), f"layers.{i}.1.1.weight": (5120, 1280),
                          f"layers.{i}.1.3.weight": (1280, 5120)})
    plus_sd = _released(nx, resampler, 2048)
    plus, _ = detect(plus_sd)
    assert (plus.variant, plus.tokens, plus.heads, plus.depth, plus.family) == ("plus", 16, 20, 4, "sdxl")
    plus_model = ip_adapter_from_state_dict(plus_sd, "ip-adapter-plus_sdxl_vit-h.safetensors")
    assert check_fits(IPAdapterHandle(plus_model, "xl"), xl, "SDXL") == nx
    with pytest.raises(IPAdapterError, match=r"is for SDXL models .* this model is SD1\.x \(768-wide\)"):
        check_fits(IPAdapterHandle(plus_model, "ip-adapter-plus_sdxl_vit-h.safetensors"), sd1, "SD1.x")
    full, _ = detect(_released(n1, {"proj.0.weight": (1280, 1280), "proj.0.bias": (1280,),
                                    "proj.2.weight": (768, 1280), "proj.2.bias": (768,), "proj.3.weight": (768,),
                                    "proj.3.bias": (768,)}, 768))
    assert (full.variant, full.clip_dim, full.embeds) == ("full", 1280, "penultimate_hidden_states")
