"""Upscale model nodes: UpscaleModelLoader (a file of models/upscale_models → UPSCALE_MODEL) and
ImageUpscaleWithModel (an IMAGE enlarged by the model, tile by tile).

The architectures (ESRGAN/Real-ESRGAN RRDBNet, Real-ESRGAN's compact SRVGGNet, ...) are recognised from the
file's keys in diffusion/checkpoints/upscale_models.py; these nodes only name files and pass tensors.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from diffusion.checkpoints.upscale_models import (
    OVERLAP,
    TILE,
    UpscaleModel,
    activation_bytes,
    load_upscale_model,
    peek_config,
)
from graph.memory_estimate import MemoryEstimate
from graph.node import Combo, Node, Output, Socket
from graph.types import IMAGE
from nodes.estimates import compute_itemsize, describe_image, image_spec, tensor_of
from nodes.loaders import _file_key, _ModelFileNode, _models

log = logging.getLogger(__name__)

UPSCALE_MODEL = "UPSCALE_MODEL"
ASSUMED_SCALE = 4  # estimates when the model's scale is unknown before it loads: the usual "4x" models


class UpscaleModelShape:
    """What UpscaleModelLoader declares to estimates: the architecture and config read from the file's header."""

    def __init__(self, arch: Any, config: Any) -> None:
        self.arch, self.config = arch, config


class UpscaleModelLoader(_ModelFileNode):
    display_name = "Load Upscale Model"
    category = "loaders"
    description = ("Loads an image upscaling model (ESRGAN, Real-ESRGAN, Real-ESRGAN compact, ...) from "
                   "models/upscale_models; the architecture is recognised from the file.")
    hidden = ("context",)
    model_kind, name_input = "upscale_models", "model_name"
    inputs = [Combo("model_name", _models("upscale_models"), tooltip="The upscale model file to load.")]
    outputs = [Output(UPSCALE_MODEL, tooltip="The upscale model, for Upscale Image (using Model).")]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        if context.env is None:
            return None
        try:
            path = context.env.find_model("upscale_models", inputs["model_name"])
        except ValueError:
            return None
        found = peek_config(path)
        return MemoryEstimate(outputs=(UpscaleModelShape(*found) if found else None,), kept_bytes=0)

    def execute(self, model_name, context):
        env = context.env
        path = env.find_model("upscale_models", model_name)

        def load() -> UpscaleModel:
            manager = env.model_manager()
            with env.naming_files():  # errors name the file as the user knows it, not by its absolute path
                return load_upscale_model(path, manager, dtype=env.model_dtype("image"),
                                          name=Path(model_name).stem)

        return (env.model_cache.load(("upscale_model", *_file_key(path)), load),)


class ImageUpscaleWithModel(Node):
    display_name = "Upscale Image (using Model)"
    category = "image/upscaling"
    description = (f"Enlarges images with an upscale model, in {TILE}-pixel tiles overlapping by {OVERLAP} "
                   "(smaller tiles when memory runs out), blended so that no seams show.")
    hidden = ("context",)
    inputs = [Socket("upscale_model", UPSCALE_MODEL, tooltip="The model from Load Upscale Model."),
              Socket("image", IMAGE, tooltip="The images to enlarge (RGB; alpha is resized beside them).")]
    outputs = [Output(IMAGE, tooltip="The images, the model's scale times larger.")]
    memory_advice = "use a smaller image or a smaller batch"

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        image = tensor_of(shapes.get("image"), 4)
        if image is None:
            return None
        model = shapes.get("upscale_model")
        arch, config = (model.arch, model.config) if isinstance(model, UpscaleModelShape) else (None, None)
        scale = int(config.scale) if config is not None else ASSUMED_SCALE
        batch, height, width, channels = image.shape
        out = image_spec(batch, height * scale, width * scale, channels)
        tile_h, tile_w = min(height, TILE), min(width, TILE)
        if config is None:  # unknown model: RRDBNet's usual width, the most common architecture
            device = 3 * 64 * tile_h * tile_w * scale**2 * compute_itemsize(context, for_vae=True)
        else:
            device = activation_bytes(arch, config, tile_h, tile_w, compute_itemsize(context, for_vae=True))
        # blending one image (diffusion.tiling.tiled_apply): its float32 accumulator, a weighted tile and the weight
        # plane, alive while tiles run; then the batch of results before it becomes the output's layout
        per_image = height * width * scale**2 * 4
        blending = 2 * per_image * min(channels, 3) + per_image
        host = blending + out.nbytes
        if context.device_type == "cpu":  # one memory: the activations and the blending buffers coexist
            device += blending
        return MemoryEstimate(outputs=(out,), device_bytes=device, host_bytes=host, what=describe_image(out))

    def execute(self, upscale_model, image, context):
        try:
            return (upscale_model.upscale(image, progress=context.progress),)
        except ValueError as exc:
            raise ValueError(f"input 'image': {exc}") from None


NODE_CLASSES = [UpscaleModelLoader, ImageUpscaleWithModel]
