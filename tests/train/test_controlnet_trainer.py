"""The ControlNet recipe on the tiny spec (starts as the base model, deterministic, resumable, writes a file our
ControlNet loader reads), its silhouettes, and the shipped ControlNet against the shipped demo model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion.checkpoints.controlnet_files import build_controlnet, read_controlnet
from diffusion.checkpoints.files import read_state_dict
from diffusion.checkpoints.loader import load_checkpoint
from diffusion.patches.control import residual_patches
from train import data, shapes
from train.recipe import denoising_loss
from train.train_controlnet import (
    EXAMPLE_HINT,
    EXAMPLE_HINT_FILE,
    ControlNetTrainer,
    controlnet_from_unet,
    controlnet_loss,
    hint_images,
    main,
    parse_args,
    shape_weights,
    silhouette,
    write_example_hint,
)

from .conftest import check_resume, run_recipe, weights

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "models" / "controlnet" / "latentloom-shapes-silhouette.safetensors"
DEMO = ROOT / "models" / "checkpoints" / "latentloom-shapes.safetensors"
# The shipped workflow at 10 steps (seed 42), IoU of the yellow shape with the hint, measured with the shipped files
# (third stage, 2026-12-02): 0.661 with the ControlNet, 0.370 at strength 0 (a triangle-like blob at the top left);
# 20 steps: 0.660 / 0.330 (the second stage: 0.625 / 0.378 at 10 steps).
IOU_WITH, IOU_WITHOUT = 0.55, 0.45
TINY = ["--images", "8", "--steps", "4", "--batch", "2", "--log-every", "2", "--save-every", "3", "--seed", "3"]


def train(base: Path, folder: Path, name: str, *extra: str) -> tuple[Path, int]:
    """The recipe at TINY against conftest's tiny `base`."""
    return run_recipe(main, TINY, base, folder, name, *extra)


@pytest.fixture(scope="module")
def uninterrupted(base, tmp_path_factory) -> Path:
    out, code = train(base, tmp_path_factory.mktemp("full"), "full")
    assert code == 0
    return out


def test_silhouette_is_the_rendered_shape_white_on_black():
    for index in range(8):
        sample = shapes.draw_sample(0, "train", index)
        hint = silhouette(sample)
        assert hint.shape == (64, 64) and hint.dtype == np.uint8 and hint.min() == 0 and hint.max() == 255
        image = shapes.render(sample).astype(np.int32)
        shape = np.abs(image - np.array(shapes.BACKGROUNDS[sample.background])).sum(-1) > 0
        assert np.array_equal(hint > 0, shape)  # the same anti-aliased pixels as the picture's shape
    assert hint_images(hint[None]).shape == (1, 3, 64, 64) and float(hint_images(hint[None]).max()) == 1.0


def test_the_shipped_hint_is_the_example_silhouette(tmp_path):
    from PIL import Image

    with Image.open(EXAMPLE_HINT_FILE) as shipped:
        assert shipped.mode == "L" and np.array_equal(np.asarray(shipped), silhouette(EXAMPLE_HINT))
    with Image.open(write_example_hint(tmp_path / "hint.png")) as written:
        assert np.array_equal(np.asarray(written), silhouette(EXAMPLE_HINT))
    cols = np.nonzero(silhouette(EXAMPLE_HINT).max(0))[0]
    assert cols.max() < 40  # in the left part of the picture, as the workflow's description says


def test_starts_as_the_base_model(base):
    unet = load_checkpoint(base, dtype=torch.float32).unet
    net = controlnet_from_unet(unet, 0)
    ours = net.state_dict()
    for key, value in unet.state_dict().items():
        if key.startswith(("time_embed.", "input_blocks.", "middle_block.")):
            assert torch.equal(ours[key], value), key
    assert float(net.input_hint_block[0].weight.detach().abs().sum()) > 0  # the hint encoder is not all zero
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 77, unet.config.context_dim, generator=gen)
    hint = hint_images(np.stack([silhouette(shapes.draw_sample(0, "train", i)) for i in range(2)]))
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        residuals = net(x, hint, t, context)
        plain = unet(x, t, context)
        controlled = unet(x, t, context, patches=residual_patches(residuals))
    assert all(float(r.abs().max()) == 0 for r in residuals)
    torch.testing.assert_close(controlled, plain, rtol=0, atol=1e-6)


def test_writes_an_sd1_controlnet_for_the_base_model(base, uninterrupted):
    sd, info = read_controlnet(uninterrupted)
    assert info.family == "sd1" and info.layout == "original" and not info.diff
    assert info.config.unet == load_checkpoint(base).family.unet
    assert all(v.dtype == torch.float16 for v in read_state_dict(uninterrupted).values())
    net = build_controlnet(sd, info, dtype=torch.float32)
    # training moved the zero convs off zero: the ControlNet now changes the base model's prediction
    assert float(net.middle_block_out[0].weight.abs().sum()) > 0
    assert all(float(z[0].weight.abs().sum()) > 0 for z in net.zero_convs)


def test_same_seed_gives_the_same_file(base, uninterrupted, tmp_path):
    out, code = train(base, tmp_path, "again")
    assert code == 0
    first, second = weights(uninterrupted), weights(out)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("first_run_steps", [1, 3])  # before and at the periodic save (every 3 steps)
def test_resume_gives_the_same_weights(base, uninterrupted, tmp_path, first_run_steps):
    check_resume(train, base, tmp_path, uninterrupted, first_run_steps)


def test_resume_refuses_another_seed_and_a_missing_state(base, tmp_path):
    _, code = train(base, tmp_path, "cut", "--stop-after", "1")
    assert code == 3
    with pytest.raises(SystemExit, match="--seed 3, not 5"):
        train(base, tmp_path, "cut", "--resume", "--seed", "5")
    with pytest.raises(SystemExit, match="no training state"):
        train(base, tmp_path, "nothing", "--resume")


def test_shape_weights_cover_the_silhouettes_cells_and_their_neighbours():
    hint = np.zeros((1, 64, 64), dtype=np.uint8)
    hint[0, 20:27, 33:40] = 255  # latent cells (2..3, 4) : rows 16-31 and columns 32-39
    weights = shape_weights(hint, 3.0, 8)
    assert weights.shape == (1, 1, 8, 8)
    heavy = {(int(y), int(x)) for y, x in zip(*np.nonzero(weights[0, 0].numpy() == 3.0), strict=True)}
    assert heavy == {(y, x) for y in range(1, 5) for x in range(3, 6)}
    assert set(np.unique(weights.numpy())) == {1.0, 3.0}
    assert torch.equal(shape_weights(hint, 1.0, 8), torch.ones(1, 1, 8, 8))


def test_pixel_weights_of_one_are_the_plain_loss_and_others_change_it():
    alphas = torch.linspace(0.99, 0.01, 1000)
    latents, context = torch.randn(2, 4, 8, 8), torch.zeros(2, 77, 16)

    def model(x, t, ctx):
        return x * 0.5

    def loss(weights):
        return denoising_loss(model, latents, context, alphas, torch.Generator().manual_seed(0), pixel_weights=weights)

    plain = loss(None)
    torch.testing.assert_close(loss(torch.full((2, 1, 8, 8), 2.0)), plain, rtol=1e-6, atol=0)
    uneven = torch.ones(2, 1, 8, 8)
    uneven[:, :, :4] = 5.0
    assert abs(float(loss(uneven)) - float(plain)) > 1e-4


def test_the_controlnet_loss_is_the_plain_loss_without_empty_rows_and_distils_the_base_model_on_them():
    alphas = torch.linspace(0.99, 0.01, 1000)
    latents, context = torch.randn(3, 4, 8, 8), torch.zeros(3, 77, 16)
    weights = torch.ones(3, 1, 8, 8)
    weights[:, :, 2:5] = 3.0

    def controlled(x, t, ctx):
        return x * 0.5

    def base(x, t, ctx):
        return x * 0.3

    def loss(model, empty, base=base):
        gen = torch.Generator().manual_seed(0)
        return controlnet_loss(model, base, latents, context, torch.tensor(empty), alphas, gen, pixel_weights=weights)

    plain = denoising_loss(controlled, latents, context, alphas, torch.Generator().manual_seed(0),
                           pixel_weights=weights)
    torch.testing.assert_close(loss(controlled, [False] * 3), plain, rtol=1e-6, atol=0)
    assert float(loss(base, [True] * 3)) == 0.0  # the model that changes nothing is exact on empty rows
    assert float(loss(controlled, [True] * 3)) > 0.0
    # one empty row: the other two rows still learn the noise, that one row the base model's prediction
    mixed = loss(controlled, [False, True, False])
    assert abs(float(mixed) - float(plain)) > 1e-5
    # with the model itself as the base, the empty row costs nothing: the loss is the plain one less that row's share
    row = _row_loss(controlled, latents, context, alphas, weights, 1)
    torch.testing.assert_close(loss(controlled, [False, True, False], base=controlled), plain - row / 3,
                               rtol=1e-5, atol=1e-8)


def _row_loss(model, latents, context, alphas, weights, row):
    """Row `row`'s share (times the batch size) of `denoising_loss` with the generator of seed 0."""
    gen = torch.Generator().manual_seed(0)
    t = torch.randint(0, alphas.shape[0], (latents.shape[0],), generator=gen)
    noise = torch.randn(latents.shape, generator=gen)
    abar = alphas[t][:, None, None, None]
    noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    snr = abar / (1 - abar)
    w = (snr.clamp(max=5.0) / snr).flatten()
    err = (model(noisy, t.float(), context) - noise) ** 2
    per = (weights * err).mean(dim=(1, 2, 3)) / weights.mean(dim=(1, 2, 3))
    return w[row] * per[row]


def _captions(base: Path, *extra: str) -> list[str]:
    """The captions of the first 60 steps' batches (batch 8) of a trainer with these arguments."""
    args = parse_args(["--base", str(base), "--images", "16", "--batch", "8", *extra])
    trainer = ControlNetTrainer.__new__(ControlNetTrainer)
    trainer.args = args
    trainer.samples = [shapes.draw_sample(0, "train", i) for i in range(16)]
    out = []
    for step in range(60):
        rng = data.step_rng(args.seed, 3, step)
        indices = rng.integers(0, 16, size=8)
        out += [trainer.caption(rng, trainer.samples[i]) for i in indices]
    return out


def test_empty_fraction_raises_the_share_of_empty_captions_and_keeps_the_default_draws(base):
    default = _captions(base)
    plain = []
    for step in range(60):  # the earlier stages' draws: data.training_caption alone
        rng = data.step_rng(0, 3, step)
        plain += [data.training_caption(rng, shapes.draw_sample(0, "train", int(i)))
                  for i in rng.integers(0, 16, size=8)]
    assert default == plain
    share = sum(c == "" for c in _captions(base, "--empty-fraction", "0.5")) / len(default)
    assert 0.4 < share < 0.6 and sum(c == "" for c in default) / len(default) < 0.2
    with pytest.raises(SystemExit, match=r"--empty-fraction 0\.05"):
        main(["--base", str(base), "--empty-fraction", "0.05"])


def test_empty_target_base_leaves_a_silent_controlnet_silent(base, tmp_path):
    """A fresh ControlNet changes nothing (zero convs at zero): on all-empty batches its distillation loss and
    gradient are zero, so training keeps it exactly as it started; on the plain loss the same batches move it."""
    fresh = controlnet_from_unet(load_checkpoint(base, dtype=torch.float32).unet, 3)
    start = fresh.half().float().state_dict()
    silent, code = train(base, tmp_path, "silent", "--steps", "2", "--empty-target", "base", "--empty-fraction", "1")
    assert code == 0
    trained = weights(silent)
    assert all(torch.equal(trained[k].float(), start[k]) for k in start)
    moved, code = train(base, tmp_path, "moved", "--steps", "2", "--empty-fraction", "1")
    assert code == 0
    assert any(not torch.equal(weights(moved)[k].float(), start[k]) for k in start)


def test_init_continues_from_a_file(base, uninterrupted, tmp_path):
    out, code = train(base, tmp_path, "continued", "--init", str(uninterrupted), "--steps", "2", "--shape-weight", "3")
    assert code == 0
    start, continued = weights(uninterrupted), weights(out)
    changed = [k for k in start if not torch.equal(start[k], continued[k])]
    assert changed
    # from the file, not from the base UNet: the zero convs are not all where a fresh start would move them
    fresh, _ = train(base, tmp_path, "fresh", "--steps", "2", "--shape-weight", "3")
    assert any(not torch.equal(weights(fresh)[k], continued[k]) for k in continued)
    with pytest.raises(SystemExit, match="no such ControlNet"):
        train(base, tmp_path, "x", "--init", str(tmp_path / "none.safetensors"))


def test_init_refuses_a_controlnet_of_another_model(base, tmp_path):
    from diffusion.checkpoints.controlnet_files import write_random_controlnet

    other = tmp_path / "other.safetensors"
    write_random_controlnet(other, "sd2")
    with pytest.raises(SystemExit, match="another UNet"):
        train(base, tmp_path, "x", "--init", str(other))


def test_refuses_a_missing_base(tmp_path):
    with pytest.raises(SystemExit, match="missing"):
        main(["--base", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "x.safetensors")])


@pytest.mark.skipif(not SHIPPED.is_file(), reason="the shipped ControlNet is trained by train/train_controlnet.py")
def test_shipped_controlnet_fits_the_shipped_model():
    assert SHIPPED.stat().st_size <= 10 << 20
    sd, info = read_controlnet(SHIPPED)
    model = load_checkpoint(DEMO).family.unet
    assert info.family == "sd1" and info.layout == "original" and not info.diff
    mine = info.config.unet
    for field in ("in_channels", "model_channels", "channel_mult", "num_res_blocks", "transformer_depth",
                  "context_dim", "num_heads", "norm_groups", "adm_in_channels"):
        assert getattr(mine, field) == getattr(model, field), field
    assert info.config.hint_channels == 3 and info.config.hint_downscale == 8
    build_controlnet(sd, info, dtype=torch.float32)  # every tensor present with the right shape


@pytest.mark.skipif(not SHIPPED.is_file(), reason="the shipped ControlNet is trained by train/train_controlnet.py")
def test_shipped_controlnet_is_nearly_silent_on_the_empty_prompt():
    """The third stage (`--empty-target base`): on CFG's unconditional half (the empty negative) the ControlNet
    changes the base model's prediction far less than on a caption, so the two halves do not both draw the shape
    in different colours. Relative change of the prediction, 8 held-out hints at t from 999 to 20: stage 2 changed
    it 1.6x more on the empty prompt than on the caption; the shipped third stage 0.28x."""
    model = load_checkpoint(DEMO, dtype=torch.float32)
    sd, info = read_controlnet(SHIPPED)
    net = build_controlnet(sd, info, dtype=torch.float32)
    samples = [shapes.draw_sample(5, "test", i) for i in range(8)]
    hint = hint_images(np.stack([silhouette(s) for s in samples]))
    x = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999.0, 800, 600, 400, 300, 200, 100, 20])
    change = {}
    for name, captions in (("empty", [""] * 8), ("caption", [s.caption for s in samples])):
        context = torch.stack([model.text.encode(c)[0][0].float() for c in captions])
        with torch.no_grad():
            plain = model.unet(x, t, context)
            controlled = model.unet(x, t, context, patches=residual_patches(net(x, hint, t, context)))
        change[name] = float(((controlled - plain).flatten(1).norm(dim=1) / plain.flatten(1).norm(dim=1)).mean())
    assert change["caption"] > 0.05  # it does steer the captioned half
    assert change["empty"] < 0.5 * change["caption"]


def run_workflow(tmp_path: Path, *overrides: str) -> np.ndarray:
    """workflows/controlnet.json through the CLI (in this process) with an empty data directory: the shipped model,
    ControlNet and hint are all it has."""
    import contextlib
    import io

    from PIL import Image

    from server import cli

    data = tmp_path / "data"
    args = ["--data-dir", str(data), "run", str(ROOT / "workflows" / "controlnet.json"), "--set", "3.steps=10"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert cli.main([*args, *[a for o in overrides for a in ("--set", o)]]) == 0
    with Image.open(out.getvalue().splitlines()[-1].split(": ", 1)[1]) as image:
        return np.asarray(image.convert("RGB"))


@pytest.mark.skipif(not SHIPPED.is_file(), reason="the shipped ControlNet is trained by train/train_controlnet.py")
def test_shipped_workflow_puts_the_shape_where_the_hint_says(tmp_path):
    from train.checker import classify_colour, foreground

    hint = silhouette(EXAMPLE_HINT) >= 128

    def iou(image: np.ndarray) -> float:
        found = foreground(image) >= 0.5
        return float((found & hint).sum() / (found | hint).sum())

    with_hint = run_workflow(tmp_path / "with")
    without = run_workflow(tmp_path / "without", "12.strength=0")
    assert classify_colour(with_hint) == "yellow"
    assert iou(with_hint) > IOU_WITH and iou(without) < IOU_WITHOUT
