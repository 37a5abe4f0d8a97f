"""One copy of a small side model on the sampler's device and dtype, beside the loaded original.

GLIGEN and IP-Adapter weights are not managed by the model manager: they are small, used only inside UNet calls
of the MODEL they patch, and needed in the UNet's dtype on its device. A handle keeps its loaded original (CPU,
as read) and at most one placed copy, made on first use under a lock (worker threads share handles).
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


@dataclass(eq=False)
class PlacedModel(Generic[M]):
    """A loaded side model and its file name (errors name it)."""

    model: M
    name: str
    _placed: dict[tuple[str, torch.dtype], M] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def placed(self, device: torch.device, dtype: torch.dtype) -> M:
        """The model on `device` in `dtype`: the original when it already fits, else the one kept copy."""
        first = next(self.model.parameters())
        if first.device == device and first.dtype == dtype:
            return self.model
        key = (str(device), dtype)
        with self._lock:
            if key not in self._placed:
                self._placed.clear()
                self._placed[key] = copy.deepcopy(self.model).to(device, dtype)
            return self._placed[key]
