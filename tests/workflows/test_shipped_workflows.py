"""Every shipped workflow runs end to end from the CLI on tiny random checkpoints of the right family."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.checkpoints.controlnet_files import write_random_controlnet
from diffusion.checkpoints.motion_files import random_motion_state_dict, tiny_motion_config, write_motion_file
from diffusion.checkpoints.random_checkpoints import write_random_checkpoint
from diffusion.patches.lora import kohya_unet_names, save_lora
from diffusion.patches.patcher import LoraDelta
from graph.ui_format import ui_to_api
from nodes import build_registry
from server import cli

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))

# (expected output size (w, h), frames, --set overrides that keep the run short: fewer steps, smaller SDXL)
FEWER_STEPS = ["3.steps=6"]
EXPECTED = {
    "txt2img": ((64, 64), 1, FEWER_STEPS),
    "txt2img-128": ((128, 128), 1, FEWER_STEPS),
    "txt2img-sdxl": ((64, 64), 1, ["5.width=64", "5.height=64", "10.steps=4", "10.end_at_step=3", "11.steps=4",
                                   "11.start_at_step=3"]),
    "img2img": ((64, 64), 1, FEWER_STEPS),
    "inpaint": ((64, 64), 1, FEWER_STEPS),
    "outpaint": ((128, 64), 1, FEWER_STEPS),
    "hires-fix": ((128, 128), 1, ["3.steps=6", "11.steps=6"]),
    "lora": ((64, 64), 1, FEWER_STEPS),
    "area-composition": ((128, 64), 1, FEWER_STEPS),
    "animation": ((64, 64), 12, ["3.steps=6"]),
    "controlnet": ((64, 64), 1, FEWER_STEPS),
    "video": ((64, 64), 16, ["3.steps=4"]),
}


def played_frames(image: Image.Image, workflow: dict) -> int:
    """Frames as the file plays them. An animated WebP keeps a run of identical frames as one frame shown longer
    (libwebp's encoder merges them; Pillow 13 exposes no switch), and a random model can draw two alike, so its
    frames are counted by duration in units of the workflow's SaveAnimatedWEBP frame time."""
    frames = getattr(image, "n_frames", 1)
    if image.format != "WEBP" or frames == 1:
        return frames
    fps = next(n["widgets_values"][1] for n in workflow["nodes"] if n["type"] == "SaveAnimatedWEBP")
    total = 0
    for index in range(frames):
        image.seek(index)
        image.load()  # a WebP frame's duration is read when it is decoded
        total += image.info["duration"]
    image.seek(0)
    return round(total / round(1000 / fps))


def run_in_process(data: Path, *args: str) -> tuple[int, str, str]:
    """`latentloom --data-dir DATA ARGS...` in this process: the CLI's own main, without a second torch import
    (a process per workflow spent most of its 8-9 s starting up). tests/server/test_cli.py runs the CLI as a
    process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(["--data-dir", str(data), *args])
    return status, out.getvalue(), err.getvalue()


def without_the_mp4(files: list[Path], size: tuple[int, int], frames: int) -> list[Path]:
    """The video workflow writes an MP4 beside its animated WebP: the MP4 is H.264 with `frames` frames of `size`;
    the other files are returned."""
    import av

    videos = [f for f in files if f.suffix == ".mp4"]
    assert len(videos) == 1 and videos[0].is_file(), files
    with av.open(str(videos[0])) as container:
        stream = container.streams.video[0]
        decoded = list(container.decode(stream))
        assert stream.codec_context.name == "h264"
    assert len(decoded) == frames and (decoded[0].width, decoded[0].height) == size
    return [f for f in files if f not in videos]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    data = tmp_path_factory.mktemp("wf") / "data"
    checkpoints = data / "models" / "checkpoints"
    checkpoints.mkdir(parents=True)
    write_random_checkpoint(checkpoints / "latentloom-shapes.safetensors", "sd1", seed=1)
    write_random_checkpoint(checkpoints / "latentloom-shapes_128.safetensors", "sd1", seed=4)
    write_random_checkpoint(checkpoints / "sd_xl_base_1.0.safetensors", "sdxl", seed=2)
    write_random_checkpoint(checkpoints / "sd_xl_refiner_1.0.safetensors", "sdxl_refiner", seed=3)
    (data / "input").mkdir()
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[16:48, 16:48, 0] = 255
    rgba[..., 3] = 255
    rgba[40:, 40:, 3] = 0  # the transparent corner is the inpainting mask
    Image.fromarray(rgba, "RGBA").save(data / "input" / "example.png")
    from diffusion.checkpoints.loader import load_checkpoint

    unet = load_checkpoint(checkpoints / "latentloom-shapes.safetensors").unet
    params = dict(unet.named_parameters())
    gen = torch.Generator().manual_seed(0)
    layers = {}
    for module, kohya in kohya_unet_names(unet.config, params).items():
        weight = params[module + ".weight"]
        if weight.ndim == 2 and len(layers) < 8:
            layers[kohya] = LoraDelta(torch.randn(weight.shape[0], 2, generator=gen),
                                      torch.randn(2, weight.shape[1], generator=gen))
    (data / "models" / "loras").mkdir(parents=True)
    save_lora(data / "models" / "loras" / "latentloom-shapes-new-colour.safetensors", layers)
    # the motion module's cross-attention adapter (video.json): the shipped one fits the demo UNet, not this one
    save_lora(data / "models" / "loras" / "latentloom-shapes-motion-adapter.safetensors", layers)
    (data / "models" / "controlnet").mkdir()  # a user's file of the shipped name wins over the repository's
    write_random_controlnet(data / "models" / "controlnet" / "latentloom-shapes-silhouette.safetensors", "sd1")
    (data / "models" / "animatediff_models").mkdir()  # a v2 module of the random SD1 model's widths
    motion = tiny_motion_config("v2", channels=(16, 32, 32, 32))
    write_motion_file(data / "models" / "animatediff_models" / "latentloom-shapes-motion.safetensors",
                      random_motion_state_dict(motion, seed=4))
    return data


def test_every_workflow_is_covered():
    assert {p.stem for p in WORKFLOWS} == set(EXPECTED)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_describes_itself_and_converts(path):
    workflow = json.loads(path.read_text())
    assert workflow["version"] == 0.4 and workflow["extra"]["description"]
    assert workflow["models"] and all({"name", "directory"} <= set(m) for m in workflow["models"])
    api = ui_to_api(workflow, build_registry(plugins=False))
    named = {entry["inputs"].get("ckpt_name") for entry in api.values()} - {None}
    assert named <= {m["name"] for m in workflow["models"]}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs_through_the_cli(path, data_dir, tmp_path):
    size, frames, overrides = EXPECTED[path.stem]
    output = tmp_path / "out"
    args = ["run", str(path), "--output", str(output)]
    for item in overrides:
        args += ["--set", item]
    status, stdout, stderr = run_in_process(data_dir, *args)
    assert status == 0, stderr[-2000:]
    files = [Path(line.split(": ", 1)[1]) for line in stdout.splitlines() if ": " in line]
    if path.stem == "video":
        files = without_the_mp4(files, size, frames)
    assert len(files) == 1 and files[0].is_file()
    image = Image.open(files[0])
    assert image.size == size and played_frames(image, json.loads(path.read_text())) == frames
    expected_kind = "WEBP" if path.stem in ("animation", "video") else "PNG"
    assert image.format == expected_kind
    if expected_kind == "PNG":  # the saved file carries the workflow that made it
        assert json.loads(image.text["workflow"]) == json.loads(path.read_text())
    shutil.rmtree(output)
