"""GLIGEN nodes: load a text-box GLIGEN file, and ground phrases in boxes on a conditioning.

GLIGENTextBoxApply encodes its phrase with the CLIP (the pooled, unprojected output, as GLIGEN was trained on)
and adds the box to every entry of `conditioning_to`; several boxes are several nodes in a chain. The boxes
act at sampling time (diffusion/patches/gligen_patch.py), where the latent's size is known.
"""

from __future__ import annotations

import logging
from pathlib import Path

from diffusion.models.gligen import load_gligen
from diffusion.patches.gligen_patch import GLIGENHandle, append_box
from graph.node import Combo, Int, Node, Output, Socket, String
from graph.types import CLIP, CONDITIONING
from nodes.environment import embedding_file_names
from nodes.loaders import _file_key, _ModelFileNode, _models
from nodes.tensor_ops import MAX_RESOLUTION

log = logging.getLogger(__name__)

GLIGEN = "GLIGEN"


class GLIGENLoader(_ModelFileNode):
    display_name = "GLIGENLoader"
    category = "loaders"
    description = "Loads a text-box GLIGEN model (SD1.x), for GLIGENTextBoxApply."
    hidden = ("context",)
    model_kind, name_input = "gligen", "gligen_name"
    inputs = [Combo("gligen_name", _models("gligen"), tooltip="The GLIGEN file in models/gligen.")]
    outputs = [Output(GLIGEN)]

    def execute(self, gligen_name, context):
        env = context.env
        path = env.find_model("gligen", gligen_name)

        def load() -> GLIGENHandle:
            dtype = env.model_dtype()
            with env.naming_files():
                return GLIGENHandle(load_gligen(path, dtype=dtype), Path(gligen_name).name)

        return (env.model_cache.load(("gligen", *_file_key(path)), load),)


def _box(name: str, default: int, minimum: int) -> Int:
    return Int(name, default=default, min=minimum, max=MAX_RESOLUTION, step=8)


class GLIGENTextBoxApply(Node):
    display_name = "GLIGENTextBoxApply"
    category = "conditioning/gligen"
    description = ("Grounds a phrase in a box (pixels) of the image: the objects it names are placed there. "
                   "Chain several for several boxes (at most 30).")
    inputs = [Socket("conditioning_to", CONDITIONING), Socket("clip", CLIP), Socket("gligen_textbox_model", GLIGEN),
              String("text", default=None, multiline=True, extra={"dynamicPrompts": True}),
              _box("width", 64, 8), _box("height", 64, 8), _box("x", 0, 0), _box("y", 0, 0)]
    outputs = [Output(CONDITIONING)]

    def execute(self, conditioning_to, clip, gligen_textbox_model, text, width, height, x, y):
        node = "GLIGENTextBoxApply"
        if clip is None:
            raise ValueError(f"{node}: the clip input is empty; connect the CLIP of an SD1.x checkpoint loader")
        if not isinstance(gligen_textbox_model, GLIGENHandle):
            raise ValueError(f"{node}: gligen_textbox_model must come from GLIGENLoader, got "
                             f"{type(gligen_textbox_model).__name__}")
        with embedding_file_names(clip):
            _, pooled = clip.encode(text)
        return (append_box(conditioning_to, gligen_textbox_model, pooled, width, height, x, y, node=node,
                           clip_family=getattr(getattr(clip, "text", None), "family", None)),)


NODE_CLASSES = [GLIGENLoader, GLIGENTextBoxApply]
