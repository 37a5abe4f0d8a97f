"""Stable Video Diffusion (image to video) nodes, with ComfyUI's interfaces: ImageOnlyCheckpointLoader,
SVD_img2vid_Conditioning, VideoLinearCFGGuidance, VideoTriangleCFGGuidance, ImageOnlyCheckpointSave.

The model code is in diffusion/ (models/svd_unet.py, models/svd_vae.py, checkpoints/svd_files.py, svd_handle.py,
sampling/video_guidance.py); an SVD MODEL samples with the ordinary KSampler, its LATENT batch being the frames.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from diffusion.checkpoints.saving import modelspec_metadata
from diffusion.checkpoints.svd_files import load_svd_checkpoint, svd_checkpoint_plan, svd_config_metadata
from diffusion.preview import PreviewCache
from diffusion.sampling.video_guidance import frame_cfg_hooks
from diffusion.svd_handle import SVDModel, wrap_svd
from graph.node import Combo, Float, Int, Node, NodeOutput, Output, Socket, String
from graph.types import CONDITIONING, IMAGE, LATENT, MODEL, VAE
from nodes.clip_vision import CLIP_VISION
from nodes.loaders import _file_key, _ModelFileNode, _models
from nodes.merging import _Saver, save_path
from nodes.model_io import latent_metadata
from nodes.tensor_ops import resize, to_bchw, to_bhwc

log = logging.getLogger(__name__)

MAX_RESOLUTION = 16384
AUGMENTATION_SEED = 0  # ComfyUI draws the augmentation noise unseeded; a fixed seed keeps the node cacheable


class ImageOnlyCheckpointLoader(_ModelFileNode):
    display_name = "Image Only Checkpoint Loader (img2vid model)"
    category = "loaders/video_models"
    description = ("Loads a Stable Video Diffusion checkpoint (SVD, SVD-XT): its spatio-temporal model, its CLIP "
                   "image encoder and its autoencoder with the temporal decoder.")
    hidden = ("context",)
    model_kind, name_input = "checkpoints", "ckpt_name"
    inputs = [Combo("ckpt_name", _models("checkpoints"))]
    outputs = [Output(MODEL), Output(CLIP_VISION), Output(VAE)]

    def execute(self, ckpt_name, context):
        env = context.env
        path = env.find_model("checkpoints", ckpt_name)

        def load():
            with env.naming_files():
                try:
                    loaded = load_svd_checkpoint(path, dtype=env.model_dtype("unet"),
                                                 autoencoder_dtype=env.model_dtype("vae"))
                except ValueError as e:
                    raise ValueError(f"ImageOnlyCheckpointLoader: ckpt_name {ckpt_name!r}: {e}") from None
            model, vision, vae = wrap_svd(loaded, env.model_manager(), name=Path(ckpt_name).stem)
            model.preview_cache = PreviewCache(env.data_dir / "cache" / "previews", loaded.vae)
            return model, vision, vae

        return env.model_cache.load(("svd_checkpoint", *_file_key(path)), load)


class SVD_img2vid_Conditioning(Node):
    display_name = "SVD_img2vid_Conditioning"
    category = "conditioning/video_models"
    description = ("The conditioning of an image-to-video model: the start image's CLIP embedding and VAE latent, "
                   "the frame rate and the amount of motion, and an empty latent of `video_frames` frames.")
    inputs = [Socket("clip_vision", CLIP_VISION), Socket("init_image", IMAGE), Socket("vae", VAE),
              Int("width", default=1024, min=16, max=MAX_RESOLUTION, step=8),
              Int("height", default=576, min=16, max=MAX_RESOLUTION, step=8),
              Int("video_frames", default=14, min=1, max=4096, step=None),
              Int("motion_bucket_id", default=127, min=1, max=1023, step=None),
              Int("fps", default=6, min=1, max=1024, step=None),
              Float("augmentation_level", default=0.0, min=0.0, max=10.0, step=0.01)]
    outputs = [Output(CONDITIONING, "positive"), Output(CONDITIONING, "negative"), Output(LATENT, "latent")]

    def execute(self, clip_vision, init_image, vae, width, height, video_frames, motion_bucket_id, fps,
                augmentation_level):
        if init_image.ndim != 4 or init_image.shape[-1] < 3:
            raise ValueError(f"SVD_img2vid_Conditioning: init_image must be an IMAGE [B, H, W, 3], got "
                             f"{list(init_image.shape)}")
        pooled = clip_vision.encode(init_image).image_embeds.unsqueeze(0)  # [1, images, D]: one token per image
        pixels = to_bhwc(resize(to_bchw(init_image[..., :3]), width, height, "bilinear", "center"))
        if augmentation_level > 0:
            gen = torch.Generator().manual_seed(AUGMENTATION_SEED)
            pixels = pixels + torch.randn(pixels.shape, generator=gen) * augmentation_level
        image_latent = vae.encode(pixels)
        options = {"motion_bucket_id": motion_bucket_id, "fps": fps, "augmentation_level": augmentation_level}
        positive = [(pooled, {**options, "concat_latent_image": image_latent})]
        negative = [(torch.zeros_like(pooled), {**options, "concat_latent_image": torch.zeros_like(image_latent)})]
        down = vae.downscale
        latent = torch.zeros(video_frames, image_latent.shape[1], height // down, width // down)
        return positive, negative, {"samples": latent}


def _min_cfg() -> Float:
    return Float("min_cfg", default=1.0, min=0.0, max=100.0, step=0.5, round=0.01)


class VideoLinearCFGGuidance(Node):
    display_name = "VideoLinearCFGGuidance"
    category = "sampling/video_models"
    description = "Guidance rising linearly over the frames: min_cfg on the first, the sampler's cfg on the last."
    inputs = [Socket("model", MODEL), _min_cfg()]
    outputs = [Output(MODEL)]

    def execute(self, model, min_cfg):
        return (model.with_guidance_hooks(frame_cfg_hooks("linear", min_cfg)),)


class VideoTriangleCFGGuidance(Node):
    display_name = "VideoTriangleCFGGuidance"
    category = "sampling/video_models"
    description = "Guidance as a triangle over the frames: min_cfg on the first and last, the sampler's cfg midway."
    inputs = [Socket("model", MODEL), _min_cfg()]
    outputs = [Output(MODEL)]

    def execute(self, model, min_cfg):
        return (model.with_guidance_hooks(frame_cfg_hooks("triangle", min_cfg)),)


class ImageOnlyCheckpointSave(_Saver):
    display_name = "ImageOnlyCheckpointSave"
    description = ("Saves an image-to-video model, its CLIP image encoder and its autoencoder as one file in "
                   "Stability's SVD layout, with the model's patches (merges, LoRA) applied.")
    inputs = [Socket("model", MODEL), Socket("clip_vision", CLIP_VISION), Socket("vae", VAE),
              String("filename_prefix", default="checkpoints/ComfyUI")]

    def execute(self, model, clip_vision, vae, filename_prefix, prompt=None, extra_pnginfo=None, context=None):
        if not isinstance(model, SVDModel):
            raise ValueError(f"ImageOnlyCheckpointSave: model is {model.family.title}, not an image-to-video model "
                             f"(Stable Video Diffusion); save image models with CheckpointSave")
        path, _ = save_path(context, filename_prefix)
        config = clip_vision.patcher.model.config
        metadata = {**latent_metadata(prompt, extra_pnginfo),
                    **modelspec_metadata("svd", "v", path.stem),
                    **svd_config_metadata(model.family, vae.vae.config.norm_groups, config.num_attention_heads,
                                          config.hidden_act)}
        plan = svd_checkpoint_plan(model.patcher, clip_vision.patcher, vae.patcher)
        with model.manager.use([model.patcher, clip_vision.patcher, vae.patcher]):
            plan.write(path, metadata)
        log.info("saved SVD checkpoint %s", context.env.public_name(path))
        return NodeOutput()


NODE_CLASSES = [ImageOnlyCheckpointLoader, SVD_img2vid_Conditioning, VideoLinearCFGGuidance, VideoTriangleCFGGuidance,
                ImageOnlyCheckpointSave]
