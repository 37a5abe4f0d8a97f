"""The motion module recipe: its clips and their judge, the trainer on the tiny spec (a no-op at step 0,
deterministic, resumable, writes a file the AnimateDiff loader reads as v2), and the shipped module on the
shipped demo model (it loads, fits, and moves the shape the way the caption says)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion.checkpoints.files import read_state_dict
from diffusion.checkpoints.loader import load_checkpoint
from diffusion.checkpoints.motion_files import load_motion_file
from diffusion.patches.motion_patch import check_fits
from train import motion_data, shapes
from train.recipe import build_text_encoder, build_unet, build_vae, tiny_spec, write_checkpoint
from train.train_motion import main, new_motion_set, training_patches

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "models" / "animatediff_models" / "latentloom-shapes-motion.safetensors"
DEMO = ROOT / "models" / "checkpoints" / "latentloom-shapes.safetensors"
TINY = ["--clips", "6", "--frames", "4", "--steps", "4", "--batch", "2", "--log-every", "2", "--save-every", "3",
        "--seed", "3"]


# ---- clips ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("direction", list(motion_data.DIRECTIONS))
def test_a_clip_moves_its_shape_the_named_way_inside_the_image(direction):
    for index in range(6):
        clip = motion_data.draw_clip(0, "train", index, frames=16, direction=direction)
        dx, dy = motion_data.DIRECTIONS[direction][1]
        (x0, y0), (x1, y1) = clip.start, clip.end
        assert (x1 - x0) * dx + (y1 - y0) * dy >= 0.6 * (64 - 2 - 2 * clip.radius) - 1e-6
        assert abs((x1 - x0) * dy) + abs((y1 - y0) * dx) == 0  # nothing moves across the axis
        for f in range(16):
            cx, cy = clip.centre(f)
            assert clip.radius + 1 - 1e-6 <= min(cx, cy) and max(cx, cy) <= 63 - clip.radius + 1e-6
        frames = motion_data.render_clip(clip)
        assert frames.shape == (16, 64, 64, 3) and frames.dtype == np.uint8
        judged, travel = motion_data.motion_of(frames)
        assert judged == direction and travel > motion_data.MIN_TRAVEL


def test_the_judge_sees_no_motion_in_a_still_or_a_jumble():
    still = motion_data.draw_clip(1, "train", 0)
    still = motion_data.Clip(*[getattr(still, f) for f in ("shape", "colour", "background", "size", "direction",
                                                          "radius")], still.start, still.start, 16)
    assert motion_data.motion_of(motion_data.render_clip(still))[0] is None
    jumble = np.stack([shapes.render(shapes.draw_sample(2, "train", i)) for i in range(16)])
    assert motion_data.motion_of(jumble)[0] is None or motion_data.motion_of(jumble)[1] < 40
    empty = np.full((8, 64, 64, 3), 240, dtype=np.uint8)
    assert motion_data.motion_of(empty) == (None, 0.0)


def test_captions_and_reversal():
    clip = motion_data.draw_clip(0, "test", 5, direction="right")
    assert clip.caption == f"a {clip.colour} {clip.shape} on a {clip.background} background moving to the right"
    assert clip.sized_caption == f"a {clip.size} {clip.caption[2:]}"
    back = motion_data.reversed_direction(clip)
    assert back.direction == "left" and back.caption.endswith("moving to the left")
    assert np.array_equal(motion_data.render_clip(back), motion_data.render_clip(clip)[::-1])
    assert motion_data.draw_clip(0, "test", 5, direction="right") == clip  # a function of (seed, split, index)
    with pytest.raises(ValueError, match="direction must be one of"):
        motion_data.draw_clip(0, "test", 5, direction="sideways")


def test_held_out_clips_use_only_held_out_combinations():
    held = set(shapes.held_out_combinations())
    for split, want in (("test", True), ("train", False)):
        for clip in motion_data.clips(0, split, range(40)):
            assert ((clip.shape, clip.colour, clip.background) in held) is want


# ---- the trainer on the tiny spec ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    spec = tiny_spec()
    unet = build_unet(spec, 1)
    torch.nn.init.normal_(unet.out[-1].weight, std=0.05)
    path = tmp_path_factory.mktemp("base") / "tiny.safetensors"
    write_checkpoint(path, spec, unet, build_vae(spec, 2), build_text_encoder(spec, 3))
    return path


def train(base: Path, folder: Path, name: str, *extra: str) -> tuple[Path, int]:
    out = folder / f"{name}.safetensors"
    code = main([*TINY, "--base", str(base), "--out", str(out), "--state", str(folder / f"{name}.pt"), *extra])
    return out, code


@pytest.fixture(scope="module")
def uninterrupted(base, tmp_path_factory) -> Path:
    out, code = train(base, tmp_path_factory.mktemp("full"), "full")
    assert code == 0
    return out


def test_the_untrained_module_changes_nothing_and_training_changes_it(base, uninterrupted):
    unet = load_checkpoint(base, dtype=torch.float32).unet
    x, t, ctx = torch.randn(8, 4, 8, 8), torch.full((8,), 500.0), torch.randn(8, 77, 16)
    plain = unet(x, t, ctx)
    fresh = new_motion_set(unet, 0)
    assert torch.allclose(unet(x, t, ctx, patches=training_patches(fresh, 1, 4)), plain, atol=1e-6)
    trained = load_motion_file(uninterrupted)
    moved = unet(x, t, ctx, patches=training_patches(trained, 1, 4))
    assert (moved - plain).abs().max() > 1e-4


def test_the_trained_file_loads_as_v2_and_fits_its_model(base, uninterrupted):
    motion = load_motion_file(uninterrupted)
    unet = load_checkpoint(base).family.unet
    # v2's layout (a middle-block module, 32 frames); at the tiny spec's two unequal levels the detector's rule
    # names it the SDXL beta (SD1.x's two innermost levels are equally wide): the shipped one is v2 (below)
    assert motion.config.mid and motion.config.max_len == 32 and motion.config.channels == (16, 32)
    check_fits(motion, unet.model_channels, unet.channel_mult, unet.num_res_blocks, "SD1.x", "tiny")
    assert all(v.dtype == torch.float16 for v in read_state_dict(uninterrupted).values())


def test_a_resumed_run_ends_with_the_same_weights(base, uninterrupted, tmp_path):
    out, code = train(base, tmp_path, "resumed", "--stop-after", "3")
    assert code == 3 and not out.exists()
    out, code = train(base, tmp_path, "resumed", "--resume")
    assert code == 0
    a, b = read_state_dict(uninterrupted), read_state_dict(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_state_of_other_settings(base, tmp_path):
    train(base, tmp_path, "other", "--stop-after", "1")
    with pytest.raises(SystemExit, match="--frames"):
        train(base, tmp_path, "other", "--resume", "--frames", "6")


# ---- the shipped module --------------------------------------------------------------------------------------
def test_the_shipped_module_loads_as_v2_and_fits_the_demo_model():
    assert SHIPPED.stat().st_size <= 10 * 2**20
    motion = load_motion_file(SHIPPED)
    assert motion.config.version == "v2" and motion.config.channels == (64, 128, 128)
    unet = load_checkpoint(DEMO).family.unet
    check_fits(motion, unet.model_channels, unet.channel_mult, unet.num_res_blocks, "SD1.x", SHIPPED.name)


@pytest.fixture(scope="module")
def video_runner(tmp_path_factory):
    from bench.motion import VideoRunner

    return VideoRunner(tmp_path_factory.mktemp("video"))


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LATENTLOOM_SLOW") != "1", reason="six 16-frame clips (~20-80 s): LATENTLOOM_SLOW=1")
def test_the_shipped_module_makes_the_shape_travel(video_runner):
    """With the module the shape travels along a line (at least 8 pixels, twice as far as across it) in most of
    three seeds; without it the 16 frames are near copies of one picture (the direction the caption names is not
    followed yet: train/README.md, "The motion module")."""
    clip = motion_data.draw_clip(0, "test", 0, frames=16, direction="right")

    def travels(motion: bool) -> list[bool]:
        return [motion_data.motion_of(video_runner.clip(clip.caption, seed, 16, steps=8, motion=motion))[0] is not None
                for seed in range(3)]

    assert sum(travels(True)) >= 2
    assert sum(travels(False)) <= 1
