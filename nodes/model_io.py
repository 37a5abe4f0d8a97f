"""Loading models from their parts, or with a config; latents saved to and loaded from `.latent` files.

CheckpointLoader takes an LDM config as ComfyUI's does, but our loader detects the family from the keys: the
config is checked against what was found (a v1 config for an SD2 file is an error naming both) and supplies
what shapes cannot tell, the prediction type and the clip skip. UNETLoader, CLIPLoader and DualCLIPLoader read
a diffusion model or text encoders kept in files of their own (diffusion/checkpoints/part_files.py). `.latent` files are
ComfyUI's: safetensors with the raw latent as `latent_tensor` and an empty `latent_format_version_0` marker;
files without the marker come from its first format, which stored latents multiplied by SD's 0.18215.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffusion.checkpoints.ldm_config import KNOWN_CONFIGS, ConfigError, read_ldm_config
from diffusion.checkpoints.loader import load_checkpoint
from diffusion.checkpoints.part_files import load_text_encoders, load_unet_file
from diffusion.handles import ClipModel, DiffusionModel, model_sampling_for, wrap_checkpoint
from diffusion.patches.patcher import ModelPatcher
from graph.node import Combo, Node, NodeOutput, Output, Socket, String
from graph.types import CLIP, LATENT, MODEL, VAE
from nodes.environment import Environment, UnsafePathError, list_files, safe_join
from nodes.image_io import file_sha256, next_counter, output_folder
from nodes.loaders import _file_key, _ModelFileNode, _models, set_up_checkpoint

log = logging.getLogger(__name__)

CONFIG_EXTENSIONS = (".yaml",)
LATENT_MARKER = "latent_format_version_0"
OLD_LATENT_SCALE = 0.18215  # ComfyUI's first .latent format stored SD1 latents times the VAE's scaling factor
CLIP_TYPES = ["stable_diffusion", "stable_cascade", "sd3", "stable_audio", "mochi", "ltxv", "pixart", "cosmos",
              "lumina2", "wan", "hidream", "chroma", "ace", "omnigen2", "qwen_image", "hunyuan_image"]
DUAL_CLIP_TYPES = ["sdxl", "sd3", "flux", "hunyuan_video", "hidream", "hunyuan_image"]
WEIGHT_DTYPES = ["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]
# fp8 weights: rounded to the format's precision, kept in the compute dtype (ComfyUI's picture, not its memory saving)
FP8_DTYPES = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e4m3fn_fast": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def _configs(env: Environment | None) -> list[str]:
    """Config files in the config folders, plus the configs ComfyUI ships (known by name here)."""
    names = set(KNOWN_CONFIGS)
    if env is not None:
        for folder in env.model_dirs("configs"):
            names.update(list_files(folder, CONFIG_EXTENSIONS))
    return sorted(names)


def _find_config(env: Environment, name: str) -> Path | None:
    for folder in env.model_dirs("configs"):
        try:
            path = safe_join(folder, name)
        except UnsafePathError as exc:
            raise ValueError(f"config {name!r}: {exc}") from None
        if path.is_file():
            return path
    return None


class CheckpointLoader(_ModelFileNode):
    display_name = "Load Checkpoint With Config (DEPRECATED)"
    category = "advanced/loaders"
    deprecated = True
    description = ("Loads a checkpoint and checks it against an LDM config; the family is read from the file, the "
                   "config adds the prediction type and clip skip.")
    hidden = ("context",)
    model_kind, name_input = "checkpoints", "ckpt_name"
    inputs = [Combo("config_name", _configs), Combo("ckpt_name", _models("checkpoints"))]
    outputs = [Output(MODEL), Output(CLIP), Output(VAE)]

    def execute(self, config_name, ckpt_name, context):
        env = context.env
        config_path = _find_config(env, config_name)
        try:
            config = read_ldm_config(config_path, config_name)
        except (ConfigError, OSError) as exc:
            raise ValueError(f"CheckpointLoader config_name {config_name!r}: {exc}") from None
        path = env.find_model("checkpoints", ckpt_name)

        def load() -> tuple[DiffusionModel, ClipModel, Any]:
            manager = env.model_manager()
            with env.naming_files():
                loaded = load_checkpoint(path, dtype=env.model_dtype("unet"), prediction=config.prediction,
                                         text_dtype=env.model_dtype("text"), autoencoder_dtype=env.model_dtype("vae"),
                                         **env.cast_cache_options())
            if loaded.family.name != config.family or loaded.family.inpaint != config.inpaint:
                wanted = config.family + (" inpainting" if config.inpaint else "")
                raise ValueError(f"CheckpointLoader: config {config_name!r} describes an {wanted} model but "
                                 f"{ckpt_name!r} is {loaded.family.title}")
            loaded.text.embedding_dirs = [str(d) for d in env.model_dirs("embeddings")]
            model, clip, vae = wrap_checkpoint(loaded, manager, name=Path(ckpt_name).stem)
            set_up_checkpoint(env, loaded, model, ckpt_name)
            return model, clip, vae

        config_key = ("config", config_name, _file_key(config_path)[1:] if config_path else None)
        model, clip, vae = env.model_cache.load(("checkpoint", *_file_key(path), config_key), load)
        if config.clip_skip is not None:
            clip = clip.with_clip_skip(config.clip_skip)
        return model, clip, vae


class UNETLoader(_ModelFileNode):
    display_name = "Load Diffusion Model"
    category = "advanced/loaders"
    description = ("Loads a diffusion model (UNet) kept in a file of its own, original or diffusers layout. fp8 "
                   "weight types round the weights to fp8 precision; they are kept in the compute dtype.")
    hidden = ("context",)
    model_kind, name_input = "diffusion_models", "unet_name"
    inputs = [Combo("unet_name", _models("diffusion_models")), Combo("weight_dtype", WEIGHT_DTYPES)]
    outputs = [Output(MODEL)]

    def execute(self, unet_name, weight_dtype, context):
        env = context.env
        path = env.find_model("diffusion_models", unet_name)

        def load() -> DiffusionModel:
            manager = env.model_manager()
            with env.naming_files():
                unet, family = load_unet_file(path, dtype=env.model_dtype("unet"),
                                              round_to=FP8_DTYPES.get(weight_dtype))
            patcher = ModelPatcher(unet, manager.device, "cpu", name=Path(unet_name).stem)
            dtype = next(unet.parameters()).dtype
            return DiffusionModel(patcher, family, model_sampling_for(family), manager, dtype)

        return (env.model_cache.load(("unet", *_file_key(path), weight_dtype), load),)


def _load_clip(env: Environment, names: list[str], clip_type: str) -> ClipModel:
    paths = [env.find_model("text_encoders", name) for name in names]

    def load() -> ClipModel:
        manager = env.model_manager()
        with env.naming_files():
            text = load_text_encoders(paths, clip_type, dtype=env.model_dtype("text"))
        text.embedding_dirs = [str(d) for d in env.model_dirs("embeddings")]
        stem = "+".join(Path(name).stem for name in names)
        patchers = {key: ModelPatcher(enc.model, manager.device, "cpu", name=f"{stem} clip_{key}")
                    for key, enc in text.encoders.items()}
        return ClipModel(text, patchers, manager)

    return env.model_cache.load(("clip", clip_type, *(_file_key(p) for p in paths)), load)


class CLIPLoader(_ModelFileNode):
    display_name = "Load CLIP"
    category = "advanced/loaders"
    description = ("Loads one text encoder file. Type stable_diffusion: CLIP-L (SD1), OpenCLIP ViT-H (SD2) or "
                   "bigG (SDXL refiner), told apart by the file's shapes; other model families are not supported.")
    hidden = ("context",)
    model_kind, name_input = "text_encoders", "clip_name"
    inputs = [Combo("clip_name", _models("text_encoders")), Combo("type", CLIP_TYPES),
              Combo("device", ["default", "cpu"], optional=True, extra={"advanced": True})]
    outputs = [Output(CLIP)]

    def execute(self, clip_name, type, context, device="default"):
        if type != "stable_diffusion":
            raise ValueError(f"CLIPLoader type {type!r} is not supported here: only the Stable Diffusion family "
                             f"(type 'stable_diffusion') is")
        return (_load_clip(context.env, [clip_name], type),)


class DualCLIPLoader(_ModelFileNode):
    display_name = "DualCLIPLoader"
    category = "advanced/loaders"
    description = "Loads SDXL's two text encoders (CLIP-L and OpenCLIP bigG) from two files, in either order."
    hidden = ("context",)
    model_kind, name_input = "text_encoders", "clip_name1"
    inputs = [Combo("clip_name1", _models("text_encoders")), Combo("clip_name2", _models("text_encoders")),
              Combo("type", DUAL_CLIP_TYPES),
              Combo("device", ["default", "cpu"], optional=True, extra={"advanced": True})]
    outputs = [Output(CLIP)]

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any], env: Any) -> Any:
        return tuple(_file_key(env.find_model("text_encoders", inputs[n]))[1:] for n in ("clip_name1", "clip_name2"))

    @classmethod
    def validate_inputs(cls, inputs: dict[str, Any], env: Any) -> str | None:
        for name in ("clip_name1", "clip_name2"):
            try:
                env.find_model("text_encoders", inputs[name])
            except ValueError as exc:
                return str(exc)
        return None

    def execute(self, clip_name1, clip_name2, type, context, device="default"):
        if type != "sdxl":
            raise ValueError(f"DualCLIPLoader type {type!r} is not supported here: only 'sdxl' (CLIP-L + bigG) is")
        return (_load_clip(context.env, [clip_name1, clip_name2], type),)


def latent_metadata(prompt: Any, extra_pnginfo: Any) -> dict[str, str]:
    """The workflow as ComfyUI's savers keep it in a file's metadata: `prompt` and each extra_pnginfo entry, JSON."""
    metadata = {"prompt": json.dumps(prompt) if prompt is not None else ""}
    if isinstance(extra_pnginfo, dict):
        metadata.update({key: json.dumps(value) for key, value in extra_pnginfo.items()})
    return metadata


class SaveLatent(Node):
    display_name = "SaveLatent"
    category = "_for_testing"
    output_node = True
    hidden = ("prompt", "extra_pnginfo", "context")
    inputs = [Socket("samples", LATENT), String("filename_prefix", default="latents/ComfyUI")]
    outputs = []

    def execute(self, samples, filename_prefix, prompt=None, extra_pnginfo=None, context=None):
        folder, name, subfolder = output_folder(context.env.output_dir, filename_prefix, "output")
        file = f"{name}_{next_counter(folder, name, 'latent'):05}_.latent"
        tensors = {"latent_tensor": samples["samples"].contiguous(), LATENT_MARKER: torch.tensor([])}
        save_file(tensors, str(folder / file), metadata=latent_metadata(prompt, extra_pnginfo))
        return NodeOutput(ui={"latents": [{"filename": file, "subfolder": subfolder, "type": "output"}]})


def _latent_files(env: Environment | None) -> list[str]:
    return env.list_input_files((".latent",)) if env is not None else []


def read_latent_file(path: Path, name: str) -> dict[str, torch.Tensor]:
    """A `.latent` file's LATENT; files of the first format (no marker) are divided by 0.18215."""
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"LoadLatent: input/{name} is not a .latent (safetensors) file: {exc}") from None
    if "latent_tensor" not in tensors:
        raise ValueError(f"LoadLatent: input/{name} has no 'latent_tensor' (keys: {sorted(tensors)[:6]})")
    scale = 1.0 if LATENT_MARKER in tensors else 1.0 / OLD_LATENT_SCALE
    return {"samples": tensors["latent_tensor"].float() * scale}


def _latent_path(env: Environment, name: str) -> Path:
    try:
        path = safe_join(env.input_dir, name)
    except UnsafePathError as exc:
        raise ValueError(f"LoadLatent latent {name!r}: {exc}") from None
    if not path.is_file():
        raise ValueError(f"LoadLatent latent {name!r} not found in the input folder")
    return path


class LoadLatent(Node):
    display_name = "LoadLatent"
    category = "_for_testing"
    hidden = ("context",)
    inputs = [Combo("latent", _latent_files)]
    outputs = [Output(LATENT)]

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any], env: Any) -> Any:
        return file_sha256(_latent_path(env, inputs["latent"]))

    @classmethod
    def validate_inputs(cls, inputs: dict[str, Any], env: Any) -> str | None:
        try:
            _latent_path(env, inputs["latent"])
        except ValueError as exc:
            return str(exc)
        return None

    def execute(self, latent, context):
        return (read_latent_file(_latent_path(context.env, latent), latent),)


NODE_CLASSES = [CheckpointLoader, UNETLoader, CLIPLoader, DualCLIPLoader, SaveLatent, LoadLatent]
