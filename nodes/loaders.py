"""Loader nodes: checkpoints, standalone VAEs, LoRAs, and the clip skip.

Loaded checkpoints are kept in the environment's model cache (keyed by file, size and modification time),
so every workflow and every branch that names the same file shares one copy of the weights, loaded once
even when worker threads ask for it at the same moment (`ModelCache.load`); LoRA nodes return clones that
share the modules and carry their own weight patches, which the model manager applies for each node that
runs them while other prompts with other patch sets wait (diffusion/sharing.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from diffusion.checkpoints.loader import LoadedCheckpoint, load_checkpoint, load_vae
from diffusion.handles import ClipModel, DiffusionModel, VAEModel, wrap_checkpoint
from diffusion.models.unet_blocks import clip_group_norm_active
from diffusion.patches.compile import compile_forward, set_cache_dir
from diffusion.patches.lora import load_lora, lora_patches
from diffusion.patches.patcher import ModelPatcher
from diffusion.preview import PreviewCache
from graph.node import Combo, Float, Int, Node, Output, Socket
from graph.types import CLIP, MODEL, VAE
from nodes.environment import Environment
from nodes.missing_files import ModelFiles

log = logging.getLogger(__name__)


def _file_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path), stat.st_size, stat.st_mtime_ns


def _models(kind: str) -> ModelFiles:
    """A model-file combo's options: the files of `kind`, read afresh; a missing file's validation error says
    where it was looked for and what is there (nodes/missing_files.py)."""
    return ModelFiles(kind)


class _ModelFileNode(Node):
    """A node reading a model file named by its first input; the file's size and time are its fingerprint."""

    model_kind = ""
    name_input = ""

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any], env: Any) -> Any:
        return _file_key(env.find_model(cls.model_kind, inputs[cls.name_input]))[1:]

    @classmethod
    def validate_inputs(cls, inputs: dict[str, Any], env: Any) -> str | None:
        try:
            env.find_model(cls.model_kind, inputs[cls.name_input])
        except ValueError as exc:
            return str(exc)
        return None


def set_up_checkpoint(env: Environment, loaded: LoadedCheckpoint, model: DiffusionModel, name: str) -> None:
    """What the environment adds to a loaded checkpoint's MODEL (every checkpoint loader calls this): the preview
    decoder, the cache of the fitted preview map (DATA_DIR/cache/previews), and with --compile the compiled UNet
    and VAE decoder (Inductor's cache in DATA_DIR/cache/torchinductor)."""
    model.preview_decoder = env.preview_decoder(loaded.family.name, Path(name).stem)
    model.preview_cache = PreviewCache(env.data_dir / "cache" / "previews", loaded.vae)
    if env.compile_models:
        set_cache_dir(env.data_dir / "cache" / "torchinductor")
        compile_forward(loaded.unet, f"{name}: the diffusion model", eager_when=clip_group_norm_active)
        compile_forward(loaded.vae.decoder, f"{name}: the VAE decoder")


def load_checkpoint_handles(env: Environment, name: str) -> tuple[DiffusionModel, ClipModel, VAEModel]:
    path = env.find_model("checkpoints", name)

    def load() -> tuple[DiffusionModel, ClipModel, VAEModel]:
        manager = env.model_manager()
        with env.naming_files():  # diffusion's errors name the file by its absolute path
            loaded = load_checkpoint(path, dtype=env.model_dtype("unet"), text_dtype=env.model_dtype("text"),
                                     autoencoder_dtype=env.model_dtype("vae"),
                                     **env.cast_cache_options())
        loaded.text.embedding_dirs = [str(d) for d in env.model_dirs("embeddings")]
        model, clip, vae = wrap_checkpoint(loaded, manager, name=Path(name).stem)
        set_up_checkpoint(env, loaded, model, name)
        return model, clip, vae

    return env.model_cache.load(("checkpoint", *_file_key(path)), load)


class CheckpointLoaderSimple(_ModelFileNode):
    display_name = "Load Checkpoint"
    category = "loaders"
    description = "Loads a Stable Diffusion checkpoint (SD1.x, SD2.x, SDXL base or refiner, inpainting)."
    hidden = ("context",)
    model_kind, name_input = "checkpoints", "ckpt_name"
    inputs = [Combo("ckpt_name", _models("checkpoints"), tooltip="The checkpoint file to load.")]
    outputs = [Output(MODEL, tooltip="The denoising model."), Output(CLIP, tooltip="The text encoders."),
               Output(VAE, tooltip="The autoencoder between pixels and latents.")]

    def execute(self, ckpt_name, context):
        return load_checkpoint_handles(context.env, ckpt_name)


class VAELoader(_ModelFileNode):
    display_name = "Load VAE"
    category = "loaders"
    hidden = ("context",)
    model_kind, name_input = "vae", "vae_name"
    inputs = [Combo("vae_name", _models("vae"))]
    outputs = [Output(VAE)]

    def execute(self, vae_name, context):
        env = context.env
        path = env.find_model("vae", vae_name)

        def load() -> VAEModel:
            manager = env.model_manager()
            with env.naming_files():
                vae = load_vae(path, dtype=env.model_dtype("vae"))
            dtype = next(vae.parameters()).dtype
            patcher = ModelPatcher(vae, manager.device, "cpu", name=Path(vae_name).stem)
            return VAEModel(patcher, manager, dtype, vae.config.downscale)

        return (env.model_cache.load(("vae", *_file_key(path)), load),)


def _lora(env: Environment, name: str) -> tuple[str, dict[str, torch.Tensor]]:
    path = env.find_model("loras", name)

    def load() -> dict[str, torch.Tensor]:
        with env.naming_files():
            return load_lora(path)

    return Path(name).stem, env.model_cache.load(("lora", *_file_key(path)), load)


def apply_lora(model: DiffusionModel | None, clip: ClipModel | None, name: str, tensors: dict[str, torch.Tensor],
               strength_model: float, strength_clip: float) -> tuple[DiffusionModel | None, ClipModel | None]:
    """Clones of model and clip carrying the LoRA's patches at their strengths (0 leaves one untouched).

    Keys are matched against every module given, used or not, so that a key for the text encoder at clip
    strength 0 is not reported as matching nothing; at strength 0 for both nothing is read or reported."""
    use_model = model is not None and strength_model != 0
    use_clip = clip is not None and strength_clip != 0
    if not (use_model or use_clip):
        return model, clip
    patches = lora_patches(tensors, name=f"LoRA {name}",
                           unet_config=model.family.unet if model is not None else None,
                           unet_param_names=[n for n, _ in model.patcher.model.named_parameters()]
                           if model is not None else (),
                           text_encoders=clip.text if clip is not None else None)
    if use_model:
        model = model.clone()
        model.patcher.add_patches(patches.unet, strength_model)
    if use_clip:
        clip = clip.clone()
        for encoder, encoder_patches in patches.text.items():
            clip.patchers[encoder].add_patches(encoder_patches, strength_clip)
    matched = (use_model and patches.unet) or (use_clip and any(patches.text.values()))
    if (use_model or use_clip) and not matched:
        raise ValueError(f"LoRA {name}: none of its {len(tensors)} keys matches this model")
    return model, clip


def _strength(name: str) -> Float:
    return Float(name, default=1.0, min=-100.0, max=100.0, step=0.01)


class LoraLoader(_ModelFileNode):
    display_name = "Load LoRA"
    category = "loaders"
    description = "Applies a LoRA to the model and the text encoders, with a strength for each."
    hidden = ("context",)
    model_kind, name_input = "loras", "lora_name"
    inputs = [Socket("model", MODEL), Socket("clip", CLIP), Combo("lora_name", _models("loras")),
              _strength("strength_model"), _strength("strength_clip")]
    outputs = [Output(MODEL), Output(CLIP)]

    def execute(self, model, clip, lora_name, strength_model, strength_clip, context):
        name, tensors = _lora(context.env, lora_name)
        return apply_lora(model, clip, name, tensors, strength_model, strength_clip)


class LoraLoaderModelOnly(_ModelFileNode):
    display_name = "LoraLoaderModelOnly"
    category = "loaders"
    hidden = ("context",)
    model_kind, name_input = "loras", "lora_name"
    inputs = [Socket("model", MODEL), Combo("lora_name", _models("loras")),
              Float("strength_model", default=1.0, min=-100.0, max=100.0, step=0.01)]
    outputs = [Output(MODEL)]

    def execute(self, model, lora_name, strength_model, context):
        name, tensors = _lora(context.env, lora_name)
        return (apply_lora(model, None, name, tensors, strength_model, 0.0)[0],)


class CLIPSetLastLayer(Node):
    display_name = "CLIP Set Last Layer"
    category = "conditioning"
    description = "Clip skip: -1 uses the last layer of the text encoder, -2 the one before, and so on."
    inputs = [Socket("clip", CLIP), Int("stop_at_clip_layer", default=-1, min=-24, max=-1)]
    outputs = [Output(CLIP)]

    def execute(self, clip, stop_at_clip_layer):
        return (clip.with_clip_skip(stop_at_clip_layer),)


NODE_CLASSES = [CheckpointLoaderSimple, VAELoader, LoraLoader, LoraLoaderModelOnly, CLIPSetLastLayer]
