"""HypernetworkLoader: an A1111 hypernetwork (`models/hypernetworks/*.pt`) on a clone of the MODEL.

The file is read once per version (the environment's model cache) without running pickled code; the clone
carries the hypernetwork as UNet patches on every attention's key and value inputs
(diffusion/patches/hypernetwork.py), so the input MODEL and its other clones are unchanged.
"""

from __future__ import annotations

from pathlib import Path

from diffusion.handles import DiffusionModel
from diffusion.patches.hypernetwork import (
    Hypernetwork,
    attention_input_widths,
    check_hypernetwork_fits,
    hypernetwork_patches,
    load_hypernetwork,
)
from graph.node import Combo, Float, Output, Socket
from graph.types import MODEL
from nodes.environment import Environment
from nodes.loaders import _file_key, _ModelFileNode, _models


def load_hypernetwork_file(env: Environment, name: str) -> Hypernetwork:
    path = env.find_model("hypernetworks", name)

    def load() -> Hypernetwork:
        with env.naming_files():  # errors name the file relative to its folder
            return load_hypernetwork(path, name=Path(name).stem)

    return env.model_cache.load(("hypernetwork", *_file_key(path)), load)


class HypernetworkLoader(_ModelFileNode):
    category = "loaders"
    python_module = "comfy_extras.nodes_hypernetwork"
    description = ("Applies an A1111 hypernetwork: small MLPs that transform each attention's key and value inputs, "
                   "at the given strength.")
    hidden = ("context",)
    model_kind, name_input = "hypernetworks", "hypernetwork_name"
    inputs = [Socket("model", MODEL), Combo("hypernetwork_name", _models("hypernetworks")),
              Float("strength", default=1.0, min=-10.0, max=10.0, step=0.01)]
    outputs = [Output(MODEL)]

    def execute(self, model: DiffusionModel, hypernetwork_name: str, strength: float, context):
        hypernetwork = load_hypernetwork_file(context.env, hypernetwork_name)
        check_hypernetwork_fits(hypernetwork, attention_input_widths(model.patcher.model), model.family.title)
        return (model.with_unet_patches(hypernetwork_patches(hypernetwork, strength)),)


NODE_CLASSES = [HypernetworkLoader]
