"""ComfyUI's `comfy_extras.nodes_model_merging` for packs: the merge node classes in ComfyUI's V1 shape, which packs
subclass (ComfyUI_experiments' per-block merges declare their own ratio inputs and inherit `merge`). Each `merge`
runs our own merge patches (diffusion/patches/merge.py through nodes.merging): clones, nothing copied.

`ModelMergeBlocks.merge(model1, model2, **ratios)` takes any ratio names: each UNet weight gets the ratio of the
longest name its key starts with, keys no name covers the first ratio given (ComfyUI's rule)."""

from __future__ import annotations

from typing import Any

from comfy_compat.comfy._offered import not_offered
from diffusion.patches.merge import addition, block_interpolation, difference, interpolation
from nodes.merging import merge_clips, merge_models

CATEGORY = "advanced/model_merging"
RATIO = ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01})
MULTIPLIER = ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01})


class ModelMergeSimple:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "merge"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"model1": ("MODEL",), "model2": ("MODEL",), "ratio": RATIO}}

    def merge(self, model1: Any, model2: Any, ratio: float) -> tuple[Any]:
        return (merge_models(type(self).__name__, model1, model2, interpolation(ratio)),)


class ModelMergeBlocks:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "merge"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"model1": ("MODEL",), "model2": ("MODEL",), "input": RATIO, "middle": RATIO,
                             "out": RATIO}}

    def merge(self, model1: Any, model2: Any, **ratios: float) -> tuple[Any]:
        if not ratios:
            raise ValueError(f"{type(self).__name__}: a block merge needs at least one ratio input")
        coefficients = block_interpolation({name: float(value) for name, value in ratios.items()})
        return (merge_models(type(self).__name__, model1, model2, coefficients),)


class ModelSubtract:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "merge"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"model1": ("MODEL",), "model2": ("MODEL",), "multiplier": MULTIPLIER}}

    def merge(self, model1: Any, model2: Any, multiplier: float) -> tuple[Any]:
        return (merge_models(type(self).__name__, model1, model2, difference(multiplier)),)


class ModelAdd:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "merge"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"model1": ("MODEL",), "model2": ("MODEL",)}}

    def merge(self, model1: Any, model2: Any) -> tuple[Any]:
        return (merge_models(type(self).__name__, model1, model2, addition()),)


class CLIPMergeSimple:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "merge"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"clip1": ("CLIP",), "clip2": ("CLIP",), "ratio": RATIO}}

    def merge(self, clip1: Any, clip2: Any, ratio: float) -> tuple[Any]:
        return (merge_clips(type(self).__name__, clip1, clip2, interpolation(ratio)),)


def __getattr__(name: str) -> Any:
    raise not_offered("comfy_extras.nodes_model_merging", name)
