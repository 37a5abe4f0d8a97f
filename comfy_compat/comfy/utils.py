"""ComfyUI's `comfy.utils` for packs: progress bars, reading model files (through our safe readers only: a
pickled file never runs code) and resizing."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from comfy_compat._state import context
from diffusion.checkpoints.files import read_metadata, read_state_dict
from nodes.tensor_ops import resize

log = logging.getLogger(__name__)

PROGRESS_BAR_ENABLED = True


def load_torch_file(ckpt: str, safe_load: bool = False, device: Any = None,
                    return_metadata: bool = False) -> Any:
    """A state dict from a .safetensors or pickled checkpoint, always read without executing pickled code
    (`safe_load` is accepted and has no effect: every load is safe)."""
    state = read_state_dict(ckpt)
    if device is not None:
        state = {k: v.to(device) for k, v in state.items()}
    if return_metadata:
        meta = read_metadata(ckpt) if str(ckpt).lower().endswith((".safetensors", ".sft")) else None
        return state, meta
    return state


def common_upscale(samples: torch.Tensor, width: int, height: int, upscale_method: str,
                   crop: str) -> torch.Tensor:
    """Resize [B, C, H, W] (ComfyUI's methods: nearest-exact, bilinear, area, bicubic, lanczos, bislerp;
    crop "disabled" or "center")."""
    return resize(samples, width, height, upscale_method, crop)


class ProgressBar:
    """Progress of the pack node running now, reported to its client; every update checks for an interrupt
    (raising model_management.InterruptProcessingException). Outside a run it only counts."""

    def __init__(self, total: int, node_id: str | None = None) -> None:
        self.total = int(total)
        self.current = 0
        self.node_id = node_id

    def update_absolute(self, value: int, total: int | None = None, preview: Any = None) -> None:
        if total is not None:
            self.total = int(total)
        self.current = min(int(value), self.total) if self.total else int(value)
        ctx = context()
        if ctx is None:
            return
        from comfy_compat.comfy.model_management import throw_exception_if_processing_interrupted

        throw_exception_if_processing_interrupted()
        ctx.progress(self.current, self.total, preview)

    def update(self, value: int) -> None:
        self.update_absolute(self.current + int(value), self.total)


def repeat_to_batch_size(tensor: torch.Tensor, batch_size: int, dim: int = 0) -> torch.Tensor:
    size = tensor.shape[dim]
    if size > batch_size:
        return tensor.narrow(dim, 0, batch_size)
    if size < batch_size:
        repeats = [1] * tensor.dim()
        repeats[dim] = math.ceil(batch_size / size)
        return tensor.repeat(repeats).narrow(dim, 0, batch_size)
    return tensor
