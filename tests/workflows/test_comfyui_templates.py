"""ComfyUI's own published workflow templates of the SD family (tests/workflows/comfyui/, see its README) run
unchanged on random-weight checkpoints, LoRAs, a VAE, an embedding and ControlNets written under the names they
reference, with synthetic input pictures (a scribble, a depth map, a pose skeleton) under the names they load.

Each template is converted from its UI format as saved, and run in process the way `latentloom run FILE --set ...`
runs it (server.cli.load: conversion, then the --set overrides); the default template also runs through the real
CLI. Every template's size and step counts are forced down with --set (listed in SMALL): at the templates' own
sizes a single one takes about five minutes on the 2-core test machine even with tiny models (the default's
512×512, 20 steps: 295 s measured); the overrides change sizes and step counts only, never a node or a link.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from diffusion.checkpoints.controlnet_files import random_controlnet, write_controlnet_file
from diffusion.checkpoints.random_checkpoints import checkpoint_spec, write_random_checkpoint, write_random_vae
from diffusion.checkpoints.random_svd import write_random_svd_checkpoint
from diffusion.checkpoints.upscale_models import write_random_upscale_model
from diffusion.models.clip_vision import write_random_clip_vision
from diffusion.models.gligen import write_random_gligen
from diffusion.models.unet import UNetModel
from diffusion.patches.lora import kohya_text_names, kohya_unet_names, save_lora
from diffusion.patches.patcher import LoraDelta
from graph.executor import Executor
from graph.ui_format import ui_to_api
from graph.validation import validate_prompt
from nodes import build_registry
from nodes.environment import Environment
from server.cli import load

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "tests" / "workflows" / "comfyui"
PATHS = sorted(TEMPLATES.glob("*.json"))

CHECKPOINTS = {  # file name the templates reference → (family, options)
    "v1-5-pruned-emaonly-fp16.safetensors": ("sd1", {}),
    "DreamShaper_8_pruned.safetensors": ("sd1", {}),
    "dreamshaper_8.safetensors": ("sd1", {}),
    "v2-1_768-ema-pruned.safetensors": ("sd2", {"prediction": "v"}),
    "512-inpainting-ema.safetensors": ("sd2", {"inpaint": True}),
    "sd_xl_base_1.0.safetensors": ("sdxl", {}),
    "sd_xl_refiner_1.0.safetensors": ("sdxl_refiner", {}),
    "sd_xl_turbo_1.0_fp16.safetensors": ("sdxl", {}),
    "architecturerealmix_v11.safetensors": ("sd1", {}),  # the ControlNet templates' SD1.5 fine-tunes
    "awpainting_v14.safetensors": ("sd1", {}),
    "majicmixRealistic_v7.safetensors": ("sd1", {}),
    "japaneseStyleRealistic_v20.safetensors": ("sd1", {}),
}
SVD_CHECKPOINTS = ("svd.safetensors", "svd_xt.safetensors")  # the image-to-video templates' (tiny random SVD files)
LORAS = ("blindbox_v1_mix.safetensors", "MoXinV1.safetensors")  # for the SD1 dreamshaper_8
VAE = "vae-ft-mse-840000-ema-pruned.safetensors"
GLIGEN = "gligen_sd14_textbox_pruned.safetensors"  # text-box GLIGEN for the SD1 checkpoints
EMBEDDING = "SDA768.pt"  # A1111 textual inversion, for SD2's text encoder
UPSCALE_MODELS = {"RealESRGAN_x4plus.safetensors": ("rrdbnet", 4)}  # a tiny RRDBNet x4 in Real-ESRGAN's layout
CLIP_VISION = "clip_vision_g.safetensors"  # a tiny tower whose image embedding is as wide as tiny SDXL's pooled text
# ControlNet v1.1 SD1.5 files as the templates name them (Comfy's fp16 repack): original layout, fp16; both key
# forms ComfyUI reads (bare and under `control_model.`) are covered, one file each.
CONTROLNETS = {  # file name → (family, under control_model.)
    "control_v11p_sd15_scribble_fp16.safetensors": ("sd1", False),
    "control_v11p_sd15_openpose_fp16.safetensors": ("sd1", True),
    "control_v11f1p_sd15_depth_fp16.safetensors": ("sd1", False),
}
IMAGES = ("image2image_input_image.jpg", "inpaint_example_input_image.png",
          "inpaint_model_outpainting_input_image.png", "sdxl_revision_text_prompts_ref_image1.png",
          "sdxl_revision_text_prompts_ref_image2.png", "controlnet_example_input_image.png",
          "image_to_video_input_image.png")
HINTS = {  # hint pictures the ControlNet templates load directly → kind of synthetic picture
    "depth_controlnet_input_image.png": "depth", "mixing_controlnets_scribble_input.png": "scribble",
    "mixing_controlnets_pose_input.png": "pose", "2_pass_pose_worship_input.png": "pose",
}

FEW = 2  # sampler steps when a template's own count is forced down
SMALL: dict[str, list[str]] = {  # template → --set overrides: sizes and step counts only
    "default": ["5.width=64", "5.height=64", f"3.steps={FEW}"],
    "area_composition": ["5.width=64", "5.height=128", "15.width=64", "15.height=64", "18.width=64",
                         "18.height=64", "18.y=64", "34.width=64", "34.height=64", "34.y=48", "11.width=64",
                         "11.height=64", "11.y=32", "22.width=96", "22.height=192", f"3.steps={FEW}",
                         f"24.steps={FEW}"],
    "area_composition_square_area_for_subject": ["5.width=96", "5.height=96", "46.width=64", "46.height=64",
                                                 "46.y=16", "22.width=128", "22.height=128", f"3.steps={FEW}",
                                                 f"24.steps={FEW}"],
    "embedding_example": ["5.width=64", "5.height=64", f"3.steps={FEW}"],
    "hiresfix_latent_workflow": ["5.width=64", "5.height=64", "10.width=96", "10.height=96", f"3.steps={FEW}",
                                 f"11.steps={FEW}"],
    "image2image": ["18.megapixels=0.01", f"3.steps={FEW}"],
    "inpaint_example": ["33.megapixels=0.01", f"3.steps={FEW}"],
    "inpaint_model_outpainting": ["38.megapixels=0.01", "30.left=8", "30.top=8", "30.right=8", "30.bottom=16",
                                  f"3.steps={FEW}"],
    "latent_upscale_different_prompt_model": ["5.width=64", "5.height=64", f"3.steps={FEW}", f"32.steps={FEW}"],
    "lora": ["5.width=64", "5.height=64", f"3.steps={FEW}"],
    "lora_multiple": ["5.width=64", "5.height=64", f"3.steps={FEW}"],
    "sdxl_refiner_prompt_example": ["5.width=64", "5.height=64", "10.steps=3", "10.end_at_step=2", "11.steps=3",
                                    "11.start_at_step=2"],
    "sdxl_simple_example": ["5.width=64", "5.height=64", "10.steps=3", "10.end_at_step=2", "11.steps=3",
                            "11.start_at_step=2"],
    "sdxlturbo_example": ["5.width=64", "5.height=64"],  # one step already
    "esrgan_example": ["5.width=64", "5.height=64", f"3.steps={FEW}"],
    "hiresfix_esrgan_workflow": ["5.width=64", "5.height=64", "24.width=96", "24.height=96", f"3.steps={FEW}",
                                 f"11.steps={FEW}"],
    "sdxl_revision_text_prompts": ["5.width=64", "5.height=64", f"3.steps={FEW}"],
    "controlnet_example": ["5.width=64", "5.height=64", f"3.steps={FEW}"],
    "depth_controlnet": ["5.width=64", "5.height=64", f"3.steps={FEW}"],
    "mixing_controlnets": ["5.width=64", "5.height=64", f"3.steps={FEW}"],
    # 1024 -> 64, the second pass's upscale 1536 -> 96 (the same 1.5x)
    "2_pass_pose_worship": ["5.width=64", "5.height=64", "14.width=96", "14.height=96", f"50.steps={FEW}",
                            f"58.steps={FEW}"],
    # 768 -> 96 pixels, the two boxes scaled with it (about 1/8, on the 8-pixel grid)
    # SVD: 1024x576 -> 32x32 pixels, 14 (25) frames -> 4; the SDXL first stage of txt_to_image_to_video -> 64x64
    "image_to_video": ["12.width=32", "12.height=32", "12.video_frames=4", f"3.steps={FEW}"],
    "txt_to_image_to_video": ["22.width=64", "22.height=64", f"17.steps={FEW}", "12.width=32", "12.height=32",
                              "12.video_frames=4", f"3.steps={FEW}"],
    "gligen_textbox_example": ["5.width=96", "5.height=96", "21.width=24", "21.height=40", "21.x=24", "21.y=32",
                               "27.width=16", "27.height=16", "27.x=56", "27.y=0", f"3.steps={FEW}"],
}


# Over ~20 s each here even when small (two sampling passes, area conditioning): run with LATENTLOOM_SLOW=1.
SLOW = {"area_composition": 24, "area_composition_square_area_for_subject": 21, "hiresfix_latent_workflow": 21}
RUN_SLOW = os.environ.get("LATENTLOOM_SLOW") == "1"
CASES = [pytest.param(p, id=p.stem, marks=[pytest.mark.slow, pytest.mark.skipif(
    not RUN_SLOW, reason=f"{SLOW[p.stem]} s measured; set LATENTLOOM_SLOW=1")]) if p.stem in SLOW
    else pytest.param(p, id=p.stem) for p in PATHS]


def write_lora(path: Path, checkpoint: Path, seed: int) -> None:
    """A random kohya LoRA on a few UNet and text-encoder layers of `checkpoint`."""
    from diffusion.checkpoints.loader import load_checkpoint

    loaded = load_checkpoint(checkpoint)
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    params = dict(loaded.unet.named_parameters())
    for module, kohya in kohya_unet_names(loaded.unet.config, params).items():
        weight = params[module + ".weight"]
        if weight.ndim == 2 and len(layers) < 6:
            layers[kohya] = LoraDelta(torch.randn(weight.shape[0], 2, generator=gen) * 0.1,
                                      torch.randn(2, weight.shape[1], generator=gen) * 0.1)
    text_params = dict(loaded.text.encoders["l"].model.named_parameters())
    for module, kohya in list(kohya_text_names(loaded.text)["l"].items())[:6]:
        weight = text_params[module + ".weight"]
        if weight.ndim == 2:
            layers[kohya] = LoraDelta(torch.randn(weight.shape[0], 2, generator=gen) * 0.1,
                                      torch.randn(2, weight.shape[1], generator=gen) * 0.1)
    save_lora(path, layers)


def hint_picture(kind: str, size: tuple[int, int] = (96, 128)) -> Image.Image:
    """A synthetic ControlNet hint of `kind`: white scribble strokes on black, a depth map (near = bright, a
    bright disc in front of a ramp), or an OpenPose-style skeleton (coloured limbs and joints on black)."""
    height, width = size
    if kind == "depth":
        rows, cols = np.mgrid[0:height, 0:width]
        depth = 40 + 120 * rows / height
        depth[(rows - height / 2) ** 2 + (cols - width / 2) ** 2 < (height / 4) ** 2] = 230
        return Image.fromarray(np.repeat(depth.astype(np.uint8)[..., None], 3, axis=2), "RGB")
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    if kind == "scribble":
        draw.ellipse((30, 15, 90, 75), outline="white", width=3)
        draw.line((20, 85, 110, 60), fill="white", width=3)
        return image
    if kind != "pose":
        raise ValueError(f"unknown hint kind {kind!r}")
    joints = {"head": (64, 15), "neck": (64, 30), "hips": (64, 60), "l_hand": (40, 50), "r_hand": (88, 50),
              "l_foot": (50, 90), "r_foot": (78, 90)}
    limbs = [("head", "neck", "blue"), ("neck", "hips", "red"), ("neck", "l_hand", "orange"),
             ("neck", "r_hand", "green"), ("hips", "l_foot", "cyan"), ("hips", "r_foot", "magenta")]
    for a, b, colour in limbs:
        draw.line(joints[a] + joints[b], fill=colour, width=4)
    for x, y in joints.values():
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill="yellow")
    return image


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("templates") / "data"
    models = data / "models"
    for folder in ("checkpoints", "loras", "vae", "embeddings", "gligen"):
        (models / folder).mkdir(parents=True)
    for seed, (name, (family, options)) in enumerate(CHECKPOINTS.items()):
        write_random_checkpoint(models / "checkpoints" / name, family, seed=seed, **options)
    for seed, name in enumerate(LORAS):
        write_lora(models / "loras" / name, models / "checkpoints" / "dreamshaper_8.safetensors", seed)
    write_random_vae(models / "vae" / VAE, seed=7)
    for seed, name in enumerate(SVD_CHECKPOINTS):
        write_random_svd_checkpoint(models / "checkpoints" / name, seed=30 + seed)
    (models / "controlnet").mkdir()
    for seed, (name, (family, prefix)) in enumerate(CONTROLNETS.items()):
        weights, info = random_controlnet(family, seed=20 + seed)
        write_controlnet_file(models / "controlnet" / name, weights, info, prefix=prefix, dtype=torch.float16)
    (models / "upscale_models").mkdir()
    for seed, (name, (arch, scale)) in enumerate(UPSCALE_MODELS.items()):
        write_random_upscale_model(models / "upscale_models" / name, arch, scale, seed=seed)
    (models / "clip_vision").mkdir()
    write_random_clip_vision(models / "clip_vision" / CLIP_VISION, seed=9,
                             projection_dim=checkpoint_spec("sdxl").text[-1].config.projection_dim)
    sd1 = checkpoint_spec("sd1")
    with torch.device("meta"):  # only the UNet's transformer layout is needed
        sd1_unet = UNetModel(sd1.unet)
    write_random_gligen(models / "gligen" / GLIGEN, sd1_unet, sd1.text[0].config.hidden_size, seed=8)
    width = checkpoint_spec("sd2").text[0].config.hidden_size
    torch.save({"string_to_param": {"*": torch.randn(2, width, generator=torch.Generator().manual_seed(3))}},
               models / "embeddings" / EMBEDDING)
    (data / "input").mkdir()
    rgba = np.full((96, 128, 4), 255, np.uint8)
    rgba[20:70, 30:90, :3] = (200, 40, 40)
    rgba[40:80, 60:110, 3] = 0  # the transparent part is the inpainting mask
    for name in IMAGES:
        image = Image.fromarray(rgba, "RGBA")
        (image.convert("RGB") if name.endswith(".jpg") else image).save(data / "input" / name)
    for name, kind in HINTS.items():
        hint_picture(kind).save(data / "input" / name)
    return data


@pytest.fixture(scope="module")
def engine(data_dir):
    env = Environment(data_dir)
    env.ensure_dirs()
    return env, build_registry(env, plugins=False), Executor(env=env)


def test_every_template_has_overrides_and_a_source_line():
    readme = (TEMPLATES / "README.md").read_text()
    assert {p.stem for p in PATHS} == set(SMALL)
    for path in PATHS:
        assert f"`{path.name}`" in readme, path.name


@pytest.mark.parametrize("path", CASES)
def test_template_runs_unchanged(path, engine):
    env, registry, executor = engine
    raw, prompt = load(str(path), registry, SMALL[path.stem])
    assert prompt == json.loads(json.dumps(prompt))
    plain = ui_to_api(json.loads(path.read_text()), registry, env)
    changed = {(node_id, name) for node_id, node in prompt.items() for name, value in node["inputs"].items()
               if plain[node_id]["inputs"].get(name) != value}
    assert changed == {tuple(item.split("=")[0].split(".", 1)) for item in SMALL[path.stem]}  # sizes/steps only
    validation = validate_prompt(prompt, registry, env)
    assert validation.ok, validation.response()
    result = executor.execute(validation.prompt, path.stem, None, {"extra_pnginfo": {"workflow": raw}})
    assert result.status == "success", result.error and result.error["exception_message"]
    saved = [image for output in result.outputs.values() for image in output.get("images", [])]
    assert saved, f"{path.stem}: no image came out"
    for image in saved:
        folder = env.output_dir if image["type"] == "output" else env.temp_dir
        for pixels in pictures_in(folder / image.get("subfolder", "") / image["filename"]):
            assert pixels.shape[0] >= 32 and pixels.shape[1] >= 32
            assert np.isfinite(pixels).all() and pixels.std() > 0  # a picture, not a constant


def pictures_in(path: Path) -> list[np.ndarray]:
    """The picture of an image file, or every frame of a video file (SaveVideo's MP4), as float RGB."""
    if path.suffix in (".mp4", ".webm"):
        import av

        with av.open(str(path)) as container:
            frames = [frame.to_ndarray(format="rgb24").astype(np.float32) for frame in container.decode(video=0)]
        assert frames, f"{path.name}: no frames"
        return frames
    with Image.open(path) as picture:
        return [np.asarray(picture.convert("RGB"), dtype=np.float32)]


# ControlNet templates → their ControlNetApplyAdvanced nodes (the ControlNets must change what comes out)
CONTROLNET_APPLY = {"controlnet_example": ("32",), "depth_controlnet": ("42",), "mixing_controlnets": ("34", "36"),
                    "2_pass_pose_worship": ("45",)}
HINT_PREVIEWS = {"controlnet_example": ("35",)}  # PreviewImage of the Canny edges


def saved_pictures(engine, path: Path, sets: list[str]) -> dict[str, np.ndarray]:
    """Run the template with `sets` and return each saved or previewed picture, by node id, as float RGB."""
    env, registry, executor = engine
    _, prompt = load(str(path), registry, sets)
    validation = validate_prompt(prompt, registry, env)
    assert validation.ok, validation.response()
    result = executor.execute(validation.prompt, path.stem, None, {})
    assert result.status == "success", result.error and result.error["exception_message"]
    pictures = {}
    for node_id, output in result.outputs.items():
        for image in output.get("images", []):
            folder = env.output_dir if image["type"] == "output" else env.temp_dir
            with Image.open(folder / image.get("subfolder", "") / image["filename"]) as picture:
                pictures[node_id] = np.asarray(picture.convert("RGB"), dtype=np.float32)
    return pictures


@pytest.mark.parametrize("stem", sorted(CONTROLNET_APPLY))
def test_controlnet_templates_are_steered_by_their_controlnets(stem, engine):
    """With every ControlNetApplyAdvanced at strength 0 the ControlNets add nothing; at the template's own
    strength (1.0) the same seed gives another picture, so the hint really reaches the UNet."""
    path = TEMPLATES / f"{stem}.json"
    with_control = saved_pictures(engine, path, SMALL[stem])
    without = saved_pictures(engine, path, SMALL[stem] + [f"{node}.strength=0" for node in CONTROLNET_APPLY[stem]])
    assert with_control.keys() == without.keys() and with_control
    for node_id, picture in with_control.items():
        if node_id in HINT_PREVIEWS.get(stem, ()):  # the preprocessed hint itself: an edge map, not a sample
            assert np.array_equal(picture, without[node_id]) and 0 < picture.mean() < 255
            continue
        assert np.abs(picture - without[node_id]).mean() > 1.0, f"{stem}: node {node_id} unchanged by ControlNet"


def test_default_template_without_save_widgets_runs_from_the_cli(data_dir, tmp_path):
    """The published default as the issue saw it: SaveImage saved with no widgets_values at all."""
    workflow = json.loads((TEMPLATES / "default.json").read_text())
    save = next(n for n in workflow["nodes"] if n["type"] == "SaveImage")
    del save["widgets_values"]
    path = tmp_path / "default.json"
    path.write_text(json.dumps(workflow))
    args = [sys.executable, "-m", "server.cli", "--data-dir", str(data_dir), "run", str(path),
            "--output", str(tmp_path / "out")]
    for item in SMALL["default"]:
        args += ["--set", item]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = tmp_path / "out" / "ComfyUI_00001_.png"  # SaveImage's declared default prefix
    assert f"node 9 (SaveImage): {saved}" in proc.stdout
    with Image.open(saved) as image:
        assert image.size == (64, 64)
        assert json.loads(image.text["workflow"]) == workflow
