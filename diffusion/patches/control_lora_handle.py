"""A Control-LoRA as CONTROL_NET: the file's weights, composed into a ControlNet when it is applied to a model.

`ControlNetLoader` gives a `ControlLoraHandle` for a Control-LoRA file (there is no model at load time, as in
ComfyUI); the apply nodes put it in the conditioning's control chain like any ControlNet; when a UNet call of a
model needs its residuals, `control_residuals` asks `bind(model)` for an ordinary ControlNetHandle: the ControlNet
composed from that model's weights (with the model's own patches, e.g. a LoRA) and the file
(checkpoints/control_lora.py). The composed ControlNet is kept for the model and patch set it was made from, and
replaced (unloaded from the model manager) when the handle meets another.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..checkpoints.control_lora import ControlLoraInfo, compose_control_lora
from ..checkpoints.controlnet_files import ControlNetInfo
from ..checkpoints.families import TITLES
from ..memory import ModelManager
from ..models.unet import UNetConfig
from .control import ControlNetHandle, load_controlnet_handle

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)  # one per file, shared by every use, compared by identity
class ControlLoraHandle:
    """CONTROL_NET for a Control-LoRA: its weights (lazy views of the file) and the composed ControlNet of the
    last model it was applied to."""

    sd: Mapping[str, Tensor]
    info: ControlLoraInfo
    manager: ModelManager
    dtype: torch.dtype
    name: str
    _bound: tuple[tuple, ControlNetHandle] | None = dataclasses.field(default=None, repr=False)

    @property
    def title(self) -> str:
        return f"Control-LoRA {self.name!r} ({TITLES.get(self.info.family, self.info.family)})"

    def check_fits(self, family: str, family_title: str, unet: UNetConfig) -> None:
        if family != self.info.family:
            raise ValueError(f"{self.title} does not fit the model: it was made for "
                             f"{TITLES.get(self.info.family, self.info.family)} and the model is {family_title}")

    def bind(self, model: Any) -> ControlNetHandle:
        """The ControlNet this Control-LoRA makes of `model` (a DiffusionModel), composed on first use."""
        if model is None:
            raise ValueError(f"{self.title}: a Control-LoRA needs the model it is applied to")
        patcher = model.patcher
        key = (patcher.model, patcher.patch_token)
        if self._bound is not None and self._bound[0][0] is key[0] and self._bound[0][1] is key[1]:
            return self._bound[1]
        self.check_fits(model.family.name, model.family.title, model.family.unet)
        params = {n for n, _ in patcher.model.named_parameters()}

        def base(name: str) -> Tensor | None:  # the MODEL's weights, its own patches (LoRA) applied
            return patcher.patched_weight(name, "cpu") if name in params else None

        log.info("composing %s with the model's weights", self.title)
        net = compose_control_lora(self.sd, self.info, model.family.unet, base, dtype=self.dtype)
        info = ControlNetInfo(self.info.family, "control-lora", False, net.config)
        handle = load_controlnet_handle(net, info, self.manager, self.name)
        if self._bound is not None:
            self.manager.unload(self._bound[1].patcher)
        self._bound = (key, handle)
        return handle
