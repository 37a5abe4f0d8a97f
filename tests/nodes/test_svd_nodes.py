"""ImageOnlyCheckpointLoader, SVD_img2vid_Conditioning, VideoLinearCFGGuidance and VideoTriangleCFGGuidance end to end
on a tiny random SVD file (16x16 pixels, 4 frames), and their errors for the wrong kind of checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.checkpoints.files import read_state_dict
from diffusion.checkpoints.random_svd import write_random_svd_checkpoint
from diffusion.svd_handle import SVDModel
from nodes.tensor_ops import resize, to_bchw, to_bhwc

FRAMES = 4


def setup_files(engine) -> None:
    write_random_svd_checkpoint(engine.env.models_dir / "checkpoints" / "svd.safetensors", seed=7)
    for name, colour in (("start.png", (200, 40, 40)), ("other.png", (20, 90, 220))):
        pixels = np.zeros((24, 32, 3), np.uint8)
        pixels[:] = colour
        pixels[6:18, 8:20] = 255 - np.array(colour, np.uint8)  # a square, off centre
        Image.fromarray(pixels).save(engine.env.input_dir / name)


def video_prompt(image="start.png", motion=127, fps=6, augmentation=0.0, guidance=None, min_cfg=1.0,
                 cfg=2.5) -> dict:
    prompt = {
        "1": {"class_type": "ImageOnlyCheckpointLoader", "inputs": {"ckpt_name": "svd.safetensors"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": image}},
        "3": {"class_type": "SVD_img2vid_Conditioning", "inputs": {
            "clip_vision": ["1", 1], "init_image": ["2", 0], "vae": ["1", 2], "width": 16, "height": 16,
            "video_frames": FRAMES, "motion_bucket_id": motion, "fps": fps, "augmentation_level": augmentation}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0] if guidance else ["1", 0], "seed": 3, "steps": 2, "cfg": cfg, "sampler_name": "euler",
            "scheduler": "karras", "positive": ["3", 0], "negative": ["3", 1], "latent_image": ["3", 2],
            "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "svd"}},
    }
    if guidance:
        prompt["4"] = {"class_type": guidance, "inputs": {"model": ["1", 0], "min_cfg": min_cfg}}
    return prompt


def sampled(engine, **kwargs) -> torch.Tensor:
    return engine.outputs(video_prompt(**kwargs), "5")[0][0]["samples"]


def test_image_to_video_runs_end_to_end(engine):
    setup_files(engine)
    engine.run(video_prompt(guidance="VideoLinearCFGGuidance"))
    frames = engine.outputs(video_prompt(guidance="VideoLinearCFGGuidance"), "6")[0][0]
    assert frames.shape == (FRAMES, 16, 16, 3) and torch.isfinite(frames).all()
    assert float(frames.min()) >= 0.0 and float(frames.max()) <= 1.0
    assert len(list((engine.env.output_dir).glob("svd_*.png"))) == FRAMES
    model, _, vae = (out[0] for out in engine.outputs(video_prompt(), "1"))
    assert isinstance(model, SVDModel)
    # VAEDecode decodes the frames as one clip through the temporal decoder
    samples = sampled(engine, guidance="VideoLinearCFGGuidance")
    with torch.no_grad():
        clip = vae.vae.decode(samples.to(vae.dtype)).float()
        alone = torch.cat([vae.vae.decode(samples[i:i + 1].to(vae.dtype)).float() for i in range(FRAMES)])
    torch.testing.assert_close(frames, ((clip + 1) / 2).clamp(0, 1).movedim(1, -1), rtol=1e-3, atol=1e-3)
    assert not torch.allclose(clip, alone, atol=1e-3)


def test_conditioning_carries_the_image_embedding_latent_and_options(engine):
    setup_files(engine)
    _, vision, vae = (out[0] for out in engine.outputs(video_prompt(), "1"))
    image = engine.outputs(video_prompt(), "2")[0][0]
    positive, negative, latent = (out[0] for out in engine.outputs(video_prompt(motion=40, fps=12), "3"))
    (embed, options), = positive
    (negative_embed, negative_options), = negative
    torch.testing.assert_close(embed, vision.encode(image).image_embeds.unsqueeze(0))
    assert embed.shape == (1, 1, 16) and torch.equal(negative_embed, torch.zeros_like(embed))
    assert options["fps"] == 12 and options["motion_bucket_id"] == 40 and options["augmentation_level"] == 0.0
    pixels = to_bhwc(resize(to_bchw(image[..., :3]), 16, 16, "bilinear", "center"))
    torch.testing.assert_close(options["concat_latent_image"], vae.encode(pixels))
    assert torch.equal(negative_options["concat_latent_image"], torch.zeros_like(options["concat_latent_image"]))
    assert latent["samples"].shape == (FRAMES, 4, 2, 2) and not latent["samples"].any()
    noisy = engine.outputs(video_prompt(augmentation=0.5), "3")[0][0][0][1]["concat_latent_image"]
    assert not torch.allclose(noisy, options["concat_latent_image"])  # augmentation noise reaches the latent
    again = engine.outputs(video_prompt(augmentation=0.5, fps=7), "3")[0][0][0][1]["concat_latent_image"]
    torch.testing.assert_close(again, noisy)  # seeded: the node is deterministic


def test_start_image_and_motion_reach_the_model(engine):
    setup_files(engine)
    base = sampled(engine)
    assert base.shape == (FRAMES, 4, 2, 2)
    torch.testing.assert_close(sampled(engine), base)
    assert not torch.allclose(sampled(engine, image="other.png"), base, atol=1e-3)
    assert not torch.allclose(sampled(engine, motion=20), base, atol=1e-3)
    assert not torch.allclose(sampled(engine, fps=20), base, atol=1e-3)


@pytest.mark.parametrize("guidance", ["VideoLinearCFGGuidance", "VideoTriangleCFGGuidance"])
def test_frame_guidance_nodes(engine, guidance):
    setup_files(engine)
    plain = sampled(engine)
    ramped = sampled(engine, guidance=guidance, min_cfg=1.0)
    assert not torch.allclose(ramped, plain, atol=1e-3)
    # min_cfg equal to cfg: every frame at cfg, the same as without the node
    torch.testing.assert_close(sampled(engine, guidance=guidance, min_cfg=2.5), plain, rtol=1e-3, atol=1e-3)
    other = "VideoTriangleCFGGuidance" if guidance == "VideoLinearCFGGuidance" else "VideoLinearCFGGuidance"
    assert not torch.allclose(sampled(engine, guidance=other, min_cfg=1.0), ramped, atol=1e-3)


def test_image_checkpoint_is_refused_naming_its_family(engine):
    setup_files(engine)
    prompt = video_prompt()
    prompt["1"]["inputs"]["ckpt_name"] = "sd1.safetensors"
    message = engine.error(prompt)
    assert "ImageOnlyCheckpointLoader" in message and "sd1.safetensors" in message
    assert "SD1.x" in message and "not a Stable Video Diffusion" in message


def test_svd_file_in_the_image_checkpoint_loader_says_which_loader(engine):
    setup_files(engine)
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "svd.safetensors"}},
              "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["1", 1]}},
              "3": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["2", 0]}},
              "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 16, "height": 16, "batch_size": 1}},
              "5": {"class_type": "KSampler", "inputs": {
                  "model": ["1", 0], "seed": 0, "steps": 1, "cfg": 1.0, "sampler_name": "euler",
                  "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
                  "denoise": 1.0}},
              "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
              "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "x"}}}
    message = engine.error(prompt)
    assert "Stable Video Diffusion" in message and "ImageOnlyCheckpointLoader" in message


def test_image_only_checkpoint_save_round_trips(engine):
    setup_files(engine)
    prompt = {"1": {"class_type": "ImageOnlyCheckpointLoader", "inputs": {"ckpt_name": "svd.safetensors"}},
              "2": {"class_type": "ImageOnlyCheckpointSave", "inputs": {
                  "model": ["1", 0], "clip_vision": ["1", 1], "vae": ["1", 2], "filename_prefix": "checkpoints/svd"}}}
    engine.run(prompt)
    saved = engine.env.output_dir / "checkpoints" / "svd_00001_.safetensors"
    original = read_state_dict(engine.env.models_dir / "checkpoints" / "svd.safetensors")
    written = read_state_dict(saved)
    assert written.keys() <= original.keys()  # OpenCLIP's unused text-side tensors are not written back
    assert {k for k in original if not k.startswith("conditioner.")} <= written.keys()
    first = [out[0] for out in engine.outputs(prompt, "1")]
    saved.rename(engine.env.models_dir / "checkpoints" / "svd_saved.safetensors")
    prompt["1"]["inputs"]["ckpt_name"] = "svd_saved.safetensors"
    again = [out[0] for out in engine.outputs(prompt, "1")]
    for before, after in ((first[0].patcher.model, again[0].patcher.model), (first[1].patcher.model,
                                                                            again[1].patcher.model),
                          (first[2].vae, again[2].vae)):
        theirs = after.state_dict()
        for key, value in before.state_dict().items():
            assert torch.equal(value, theirs[key]), key
    sd1 = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
           "3": {"class_type": "ImageOnlyCheckpointLoader", "inputs": {"ckpt_name": "svd.safetensors"}},
           "2": {"class_type": "ImageOnlyCheckpointSave", "inputs": {
               "model": ["1", 0], "clip_vision": ["3", 1], "vae": ["1", 2], "filename_prefix": "checkpoints/x"}}}
    assert "not an image-to-video model" in engine.error(sd1)
