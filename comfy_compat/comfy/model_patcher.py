"""ComfyUI's `comfy.model_patcher` for packs: `ModelPatcher`, the type of the MODEL objects packs receive (our
DiffusionModel handles, registered as its virtual subclass so that `isinstance(model, ModelPatcher)` holds), and the
module-level functions that edit a model_options dict (ComfyUI's names and arguments)."""

from __future__ import annotations

import abc
from typing import Any

from comfy_compat.comfy._offered import not_offered
from diffusion.handles import DiffusionModel
from diffusion.patches.comfy_options import copy_options


class ModelPatcher(abc.ABC):  # noqa: B024 (a virtual base: our handles are registered)
    """The MODEL type packs check against. Packs receive MODELs from loaders; building one here is not offered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("comfy.model_patcher.ModelPatcher(...): building a MODEL in a pack is not offered by Latent "
                        "Loom (take a MODEL input and clone() it)")


ModelPatcher.register(DiffusionModel)


def _transformer_options(model_options: dict[str, Any]) -> dict[str, Any]:
    return model_options.setdefault("transformer_options", {})


def set_model_options_patch_replace(model_options: dict[str, Any], patch: Any, name: str, block_name: str,
                                    number: int, transformer_index: int | None = None) -> dict[str, Any]:
    """A copy of `model_options` with an attn replace (as ModelPatcher.set_model_patch_replace)."""
    model_options = copy_options(model_options)
    table = _transformer_options(model_options).setdefault("patches_replace", {}).setdefault(name, {})
    table[(block_name, number) if transformer_index is None else (block_name, number, transformer_index)] = patch
    return model_options


def set_model_options_post_cfg_function(model_options: dict[str, Any], post_cfg_function: Any,
                                        disable_cfg1_optimization: bool = False) -> dict[str, Any]:
    model_options = copy_options(model_options)
    model_options["sampler_post_cfg_function"] = [*model_options.get("sampler_post_cfg_function", []),
                                                  post_cfg_function]
    if disable_cfg1_optimization:
        model_options["disable_cfg1_optimization"] = True
    return model_options


def set_model_options_pre_cfg_function(model_options: dict[str, Any], pre_cfg_function: Any,
                                       disable_cfg1_optimization: bool = False) -> dict[str, Any]:
    model_options = copy_options(model_options)
    model_options["sampler_pre_cfg_function"] = [*model_options.get("sampler_pre_cfg_function", []),
                                                 pre_cfg_function]
    if disable_cfg1_optimization:
        model_options["disable_cfg1_optimization"] = True
    return model_options


def __getattr__(name: str) -> Any:
    raise not_offered("comfy.model_patcher", name)
