"""ComfyUI's `comfy.comfy_types.node_typing` for packs: `IO` (the socket type names, members equal to the strings
packs would write), `ComfyNodeABC` (a V1 node base class with nothing to implement beyond V1's attributes) and
`InputTypeDict` (INPUT_TYPES' return type)."""

from __future__ import annotations

import enum
from typing import Any

from comfy_compat.comfy._offered import not_offered


class IO(enum.StrEnum):
    STRING = "STRING"
    IMAGE = "IMAGE"
    MASK = "MASK"
    LATENT = "LATENT"
    BOOLEAN = "BOOLEAN"
    INT = "INT"
    FLOAT = "FLOAT"
    COMBO = "COMBO"
    CONDITIONING = "CONDITIONING"
    SAMPLER = "SAMPLER"
    SIGMAS = "SIGMAS"
    GUIDER = "GUIDER"
    NOISE = "NOISE"
    CLIP = "CLIP"
    CONTROL_NET = "CONTROL_NET"
    VAE = "VAE"
    MODEL = "MODEL"
    CLIP_VISION = "CLIP_VISION"
    CLIP_VISION_OUTPUT = "CLIP_VISION_OUTPUT"
    STYLE_MODEL = "STYLE_MODEL"
    GLIGEN = "GLIGEN"
    UPSCALE_MODEL = "UPSCALE_MODEL"
    AUDIO = "AUDIO"
    ANY = "*"
    NUMBER = "FLOAT,INT"
    PRIMITIVE = "STRING,FLOAT,INT,BOOLEAN"


class ComfyNodeABC:
    """A V1 node's optional base class: the attributes are declared by the subclass as usual."""

    DESCRIPTION: str
    CATEGORY: str
    EXPERIMENTAL: bool = False
    DEPRECATED: bool = False


InputTypeDict = dict[str, Any]


def __getattr__(name: str) -> Any:
    raise not_offered("comfy.comfy_types.node_typing", name)
