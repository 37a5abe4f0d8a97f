"""Writing models back to single files in the original Stable Diffusion layout, with their patches applied.

What a MODEL, CLIP or VAE handle carries (a shared module plus LoRA and merge patches) is written as the
weights those patches make, computed one tensor at a time from the modules' originals
(`ModelPatcher.patched_weight`): the modules are never patched for it, so other prompts can keep using them,
and the UNet and VAE stream through `write_safetensors` with one tensor in memory at a time. Text encoders
are converted as a whole (OpenCLIP fuses q/k/v into one tensor), which costs one encoder's weights.

Layouts, as the released checkpoints have them and as the loader reads them back:
`model.diffusion_model.*`, `first_stage_model.*`, and per family the text encoders of
`text_encoders.FAMILIES` under their first prefix, HF layout under `….transformer.`, OpenCLIP under `….model.`.
Standalone files: a UNet under `model.diffusion_model.` (ComfyUI's ModelSave), a VAE with bare keys, a text
encoder in the bare HF layout (`text_model.*`, `text_projection.weight`), one file per encoder.
The hyper-parameters shapes cannot tell (heads, GroupNorm groups) go into the `latentloom.config` metadata
(families.py), so a saved tiny model loads back as itself; real-size values are the defaults anyway.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from ..models.text_encoders import FAMILIES as TEXT_FAMILIES
from ..patches.patcher import ModelPatcher
from .clip_keys import from_transformers, to_hf_checkpoint, to_open_clip
from .families import CONFIG_METADATA_KEY, UNET_PREFIX, VAE_PREFIX
from .files import write_safetensors

Tensor = torch.Tensor

# ComfyUI writes a model-spec architecture for the SDXL models (modelspec.* keys: the SAI model spec 1.0).
MODELSPEC_ARCHITECTURES = {"sdxl": "stable-diffusion-xl-v1-base", "sdxl_refiner": "stable-diffusion-xl-v1-refiner"}


@dataclass
class TensorPlan:
    """Keys of a file to write → (dtype, shape), and how to make each tensor when its turn comes."""

    shapes: dict[str, tuple[torch.dtype, tuple[int, ...]]] = field(default_factory=dict)
    makers: dict[str, Callable[[], Tensor]] = field(default_factory=dict)

    def add(self, key: str, dtype: torch.dtype, shape: tuple[int, ...], make: Callable[[], Tensor]) -> None:
        if key in self.shapes:
            raise ValueError(f"two tensors for the key {key!r}")
        self.shapes[key] = (dtype, tuple(shape))
        self.makers[key] = make

    def add_tensor(self, key: str, value: Tensor) -> None:
        self.add(key, value.dtype, tuple(value.shape), lambda: value)

    def write(self, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
        write_safetensors(path, self.shapes, lambda key: self.makers[key]().detach().cpu(), metadata)


def _param_maker(patcher: ModelPatcher, key: str, dtype: torch.dtype) -> Callable[[], Tensor]:
    return lambda: patcher.patched_weight(key, "cpu").to(dtype).contiguous()


def add_module(plan: TensorPlan, patcher: ModelPatcher, prefix: str) -> None:
    """Every parameter (patched) and buffer of the patcher's module, under `prefix`, lazily."""
    params = dict(patcher.model.named_parameters())
    for key, value in patcher.model.state_dict().items():
        if key in params:
            plan.add(prefix + key, value.dtype, tuple(value.shape), _param_maker(patcher, key, value.dtype))
        else:
            plan.add_tensor(prefix + key, value.detach().cpu())


def patched_state_dict(patcher: ModelPatcher) -> dict[str, Tensor]:
    """The module's state dict with the patcher's patches applied, on the CPU, in the stored dtypes."""
    params = dict(patcher.model.named_parameters())
    return {
        key: patcher.patched_weight(key, "cpu").to(value.dtype) if key in params else value.detach().cpu()
        for key, value in patcher.model.state_dict().items()
    }


def text_encoder_tensors(family: str, patchers: Mapping[str, ModelPatcher]) -> dict[str, Tensor]:
    """The family's text encoders in the checkpoint layout of the released files (see module docstring)."""
    out: dict[str, Tensor] = {}
    for spec in TEXT_FAMILIES[family]:
        if spec.name not in patchers:
            raise ValueError(f"{family} text encoders need clip_{spec.name}, have {sorted(patchers)}")
        ours = from_transformers(patched_state_dict(patchers[spec.name]))
        prefix = spec.prefixes[0]
        if ".transformer." in prefix:
            out.update(to_hf_checkpoint(ours, prefix, with_position_ids=True))
        else:
            out.update(to_open_clip(ours, prefix))
    return out


def bare_text_encoder(patcher: ModelPatcher) -> dict[str, Tensor]:
    """One text encoder in the bare HF layout (`text_model.*`, `text_projection.weight`), as CLIPSave writes."""
    return to_hf_checkpoint(from_transformers(patched_state_dict(patcher)), "")


def clip_heads(patchers: Mapping[str, ModelPatcher]) -> int | None:
    """The attention head count of the encoders (transformers' config), the same for all of a family's."""
    heads = {p.model.config.num_attention_heads for p in patchers.values()}
    return heads.pop() if len(heads) == 1 else None


def config_metadata(
    family: str | None = None,
    prediction: str | None = None,
    unet: object | None = None,
    vae_norm_groups: int | None = None,
    text_heads: int | None = None,
    text_kind: str | None = None,
) -> dict[str, str]:
    """The `latentloom.config` entry for what a file holds (unet: a UNetConfig; text_kind: l, h or g for a
    file holding one text encoder)."""
    config: dict[str, object] = {}
    if family is not None:
        config["family"] = family
    if prediction is not None:
        config["prediction"] = prediction
    if unet is not None:
        heads = ({"num_heads": unet.num_heads} if unet.num_heads > 0
                 else {"num_head_channels": unet.num_head_channels})
        config["unet"] = {**heads, "norm_groups": unet.norm_groups}
    if vae_norm_groups is not None:
        config["vae"] = {"norm_groups": vae_norm_groups}
    if text_heads is not None:
        config["clip"] = {"num_heads": text_heads}
    if text_kind is not None:
        config.setdefault("clip", {})["kind"] = text_kind
    return {CONFIG_METADATA_KEY: json.dumps(config, sort_keys=True)} if config else {}


def modelspec_metadata(family: str, prediction: str, title: str) -> dict[str, str]:
    """The model-spec keys ComfyUI's checkpoint saver writes: the architecture for SDXL base and refiner (with
    spec version, implementation and title), and the prediction for every model."""
    metadata = {}
    if family in MODELSPEC_ARCHITECTURES:
        metadata = {"modelspec.architecture": MODELSPEC_ARCHITECTURES[family], "modelspec.sai_model_spec": "1.0.0",
                    "modelspec.implementation": "sgm", "modelspec.title": title}
    metadata["modelspec.predict_key"] = "v" if prediction == "v" else "epsilon"
    return metadata


def checkpoint_plan(
    unet: ModelPatcher | None,
    text_family: str | None = None,
    text: Mapping[str, ModelPatcher] | None = None,
    vae: ModelPatcher | None = None,
    *,
    v_prediction: bool = False,
) -> TensorPlan:
    """A checkpoint's tensors in the original layout: whichever of UNet, text encoders and VAE are given, plus
    the empty `v_pred` marker key real v-prediction files carry (ComfyUI writes it too)."""
    plan = TensorPlan()
    if unet is not None:
        add_module(plan, unet, UNET_PREFIX)
    if text is not None:
        if text_family is None:
            raise ValueError("text encoders need their family to be laid out")
        for key, value in text_encoder_tensors(text_family, text).items():
            plan.add_tensor(key, value)
    if vae is not None:
        add_module(plan, vae, VAE_PREFIX)
    if v_prediction:
        plan.add_tensor("v_pred", torch.empty(0))
    return plan


def vae_plan(vae: ModelPatcher) -> TensorPlan:
    plan = TensorPlan()
    add_module(plan, vae, "")
    return plan
