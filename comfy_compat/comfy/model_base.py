"""ComfyUI's `comfy.model_base` for packs: `ModelType`, and the model classes packs test MODEL.model against
(`isinstance(model.model, comfy.model_base.SDXL)`), matched on the family of our BaseModel view."""

from __future__ import annotations

import abc
import enum
from typing import Any

from comfy_compat.comfy._offered import not_offered
from diffusion.patches.comfy_model import BaseModelView


class ModelType(enum.StrEnum):
    """Members compare equal to the view's `model_type` string (EPS, V_PREDICTION, V_PREDICTION_EDM)."""

    EPS = "EPS"
    V_PREDICTION = "V_PREDICTION"
    V_PREDICTION_EDM = "V_PREDICTION_EDM"


class _FamilyCheck(abc.ABCMeta):
    def __instancecheck__(cls, instance: Any) -> bool:
        if not isinstance(instance, BaseModelView):
            return False
        families = cls.__dict__.get("families")
        return families is None or instance.family_name in families


class BaseModel(metaclass=_FamilyCheck):
    """Every MODEL's `.model`."""

    families: tuple[str, ...] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("comfy.model_base model classes cannot be built in a pack with Latent Loom")


class SD15(BaseModel):
    families = ("sd1",)


class SD20(BaseModel):
    families = ("sd2",)


class SDXL(BaseModel):
    families = ("sdxl",)


class SDXLRefiner(BaseModel):
    families = ("sdxl_refiner",)


def __getattr__(name: str) -> Any:
    raise not_offered("comfy.model_base", name)
