"""ComfyUI's `comfy.model_management` for packs: devices, memory, interrupts, mapped onto our model manager
and the running prompt's interrupt flag."""

from __future__ import annotations

import gc
import logging
from typing import Any

import torch

from comfy_compat._state import context, environment
from diffusion.devices import free_memory, total_memory
from graph.executor import Interrupted

log = logging.getLogger(__name__)


class InterruptProcessingException(Interrupted):
    """The prompt was interrupted. A subclass of our engine's own, so that the run ends as interrupted."""


OOM_EXCEPTION = torch.cuda.OutOfMemoryError


def _manager() -> Any:
    return environment().model_manager()


def get_torch_device() -> torch.device:
    return _manager().device


def intermediate_device() -> torch.device:
    return torch.device("cpu")


def unet_offload_device() -> torch.device:
    return _manager().offload_device


def text_encoder_device() -> torch.device:
    return get_torch_device()


def text_encoder_offload_device() -> torch.device:
    return unet_offload_device()


def vae_device() -> torch.device:
    return get_torch_device()


def vae_offload_device() -> torch.device:
    return unet_offload_device()


def is_device_mps(device: Any) -> bool:
    return torch.device(device).type == "mps"


def get_free_memory(dev: Any = None, torch_free_too: bool = False) -> Any:
    device = torch.device(dev) if dev is not None else get_torch_device()
    free = free_memory(device)
    return (free, free) if torch_free_too else free


def get_total_memory(dev: Any = None, torch_total_too: bool = False) -> Any:
    device = torch.device(dev) if dev is not None else get_torch_device()
    total = total_memory(device)
    return (total, total) if torch_total_too else total


def soft_empty_cache(force: bool = False) -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if hasattr(torch, "mps") and torch.backends.mps.is_available():
        torch.mps.empty_cache()


def unload_all_models() -> None:
    env = environment()
    env.unload_models()


def processing_interrupted() -> bool:
    ctx = context()
    if ctx is None:
        return False
    try:
        ctx.check_interrupted()
    except Interrupted:
        return True
    return False


def throw_exception_if_processing_interrupted() -> None:
    """Raise InterruptProcessingException when the prompt running this node was interrupted."""
    if processing_interrupted():
        raise InterruptProcessingException(getattr(context(), "prompt_id", ""))


def interrupt_current_processing(value: bool = True) -> None:
    """Interrupt the prompt running this node (ComfyUI's global flag is per prompt here)."""
    ctx = context()
    if ctx is not None and value:
        ctx._flag.set()
