"""What an original LDM/SGM `.yaml` model config says about a checkpoint, for loading with a config.

The loader reads a checkpoint's family from its keys and shapes, so a config is not needed to build the
model; it is checked against what was detected, and supplies the two facts shapes cannot tell: the prediction
type (`parameterization: "v"`) and the text encoder layer (`layer: penultimate`, clip skip -2).

The family follows from the UNet's (`unet_config`, or SGM's `network_config`) parameters: an ADM input of
2560 channels is the SDXL refiner, another ADM input SDXL base; without one, a 1024-wide context (OpenCLIP
ViT-H) is SD2 and 768 SD1; 9 input channels mark an inpainting model. ComfyUI ships configs under well-known
names; those are known here by name, so workflows that name them load without the files being present.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import yaml


@dataclass(frozen=True)
class LDMConfig:
    family: str  # sd1, sd2, sdxl, sdxl_refiner
    prediction: str  # eps or v
    inpaint: bool = False
    clip_skip: int | None = None  # -2 for `layer: penultimate`


# The configs ComfyUI ships in models/configs, by file name.
KNOWN_CONFIGS = {
    "anything_v3.yaml": LDMConfig("sd1", "eps", clip_skip=-2),
    "v1-inference.yaml": LDMConfig("sd1", "eps"),
    "v1-inference_clip_skip_2.yaml": LDMConfig("sd1", "eps", clip_skip=-2),
    "v1-inference_clip_skip_2_fp16.yaml": LDMConfig("sd1", "eps", clip_skip=-2),
    "v1-inference_fp16.yaml": LDMConfig("sd1", "eps"),
    "v1-inpainting-inference.yaml": LDMConfig("sd1", "eps", inpaint=True),
    "v2-inference.yaml": LDMConfig("sd2", "eps"),
    "v2-inference_fp32.yaml": LDMConfig("sd2", "eps"),
    "v2-inference-v.yaml": LDMConfig("sd2", "v"),
    "v2-inference-v_fp32.yaml": LDMConfig("sd2", "v"),
    "v2-inpainting-inference.yaml": LDMConfig("sd2", "eps", inpaint=True),
}


class ConfigError(ValueError):
    """A config file that is not an LDM/SGM model config this loader understands."""


def _section(tree: dict, *path: str) -> dict:
    node: object = tree
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else {}


def parse_ldm_config(text: str, name: str = "config") -> LDMConfig:
    """The family, prediction, inpainting flag and clip layer an LDM/SGM model config describes."""
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{name}: not valid YAML ({e})") from None
    params = _section(tree if isinstance(tree, dict) else {}, "model", "params")
    unet = _section(params, "unet_config", "params") or _section(params, "network_config", "params")
    if not unet:
        raise ConfigError(f"{name}: no model.params.unet_config (or network_config) section: not an LDM model config")
    adm = unet.get("adm_in_channels")
    if adm is not None:
        family = "sdxl_refiner" if int(adm) == 2560 else "sdxl"
    else:
        family = "sd2" if int(unet.get("context_dim", 768)) == 1024 else "sd1"
    clip = _section(params, "cond_stage_config", "params")
    return LDMConfig(
        family=family,
        prediction="v" if params.get("parameterization") == "v" else "eps",
        inpaint=int(unet.get("in_channels", 4)) == 9,
        clip_skip=-2 if clip.get("layer") == "penultimate" else None,
    )


def read_ldm_config(path: str | os.PathLike | None, name: str) -> LDMConfig:
    """The config file at `path`, or when there is none a config ComfyUI ships, known by its name."""
    if path is not None:
        with open(path, encoding="utf-8") as handle:
            return parse_ldm_config(handle.read(), name)
    if name in KNOWN_CONFIGS:
        return KNOWN_CONFIGS[name]
    raise ConfigError(f"config {name!r} not found, and not one of the configs ComfyUI ships "
                      f"({', '.join(sorted(KNOWN_CONFIGS))})")
