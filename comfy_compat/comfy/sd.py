"""ComfyUI's `comfy.sd` for packs: the CLIP and VAE types (our handles, registered as virtual subclasses for
isinstance checks) and `load_lora_for_models` on a LoRA state dict (from comfy.utils.load_torch_file), through our
own LoRA loading: the same key formats and patches as the LoraLoader node."""

from __future__ import annotations

import abc
from typing import Any

from comfy_compat.comfy._offered import not_offered
from diffusion.handles import ClipModel, DiffusionModel, VAEModel


class _Handle(abc.ABC):  # noqa: B024 (a virtual base: our handles are registered)
    kind = "object"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"comfy.sd.{type(self).__name__}(...): building a {self.kind} in a pack is not offered by "
                        f"Latent Loom (take a {self.kind} input)")


class CLIP(_Handle):
    kind = "CLIP"


class VAE(_Handle):
    kind = "VAE"


CLIP.register(ClipModel)
VAE.register(VAEModel)


def load_lora_for_models(model: DiffusionModel | None, clip: ClipModel | None, lora: dict[str, Any],
                         strength_model: float, strength_clip: float) -> tuple[Any, Any]:
    """Clones of model and clip carrying the LoRA `lora` (a state dict) at their strengths (ComfyUI's function)."""
    from nodes.loaders import apply_lora  # the LoraLoader node's own code: one way to apply a LoRA

    return apply_lora(model, clip, "from a pack", dict(lora), strength_model, strength_clip)


def __getattr__(name: str) -> Any:
    raise not_offered("comfy.sd", name)
