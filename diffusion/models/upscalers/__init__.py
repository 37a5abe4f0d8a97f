"""Image upscaling networks (UPSCALE_MODEL): one module per architecture, found from a file's keys and shapes.

Protocol every architecture module here follows (the loader in `diffusion/checkpoints/upscale_models.py`
relies on nothing else):

    ARCH_NAME: str
        A human name such as "ESRGAN (RRDBNet)", used in messages and logs.
    detect(state_dict: dict[str, Tensor]) -> Config | None
        None when the keys are not this architecture's. Config is a frozen dataclass with at least
        `.scale` (int), `.in_channels` and `.out_channels`, all read from key names and tensor shapes.
    build(config) -> torch.nn.Module
        The network; building on the meta device is fine (the loader assigns the file's tensors).
        forward(x [B, C, H, W] in 0..1) -> [B, C, H*scale, W*scale].
    module_state_dict(state_dict, config) -> dict[str, Tensor]
        File keys -> the module's attribute names (the identity for the module's native layout).

Optional: `activation_elements(config, height, width) -> int`, the peak activation elements of one forward
over a `height`×`width` input (memory estimates and tile sizing; a generic guess is used without it).
`detect` may raise ValueError (with the reason) for a file that is clearly its architecture but a variant it
cannot build; the loader reports that with the file's name.

`ARCHITECTURES` lists the modules in the order they are tried; the first whose `detect` answers wins,
so put stricter detectors first. Wrapper keys (`params_ema`, `params`, `state_dict`, a `module.` prefix)
are stripped by the loader before `detect` sees the dict.

Why the architectures are written here rather than taken from spandrel (MIT; the library ComfyUI loads these
files with): spandrel 0.4.2 requires torchvision and imports it when `import spandrel` builds its registry (its
RestoreFormer and LaMa architectures import `torchvision.transforms.functional` at module level). No torchvision
build works with the torch this project pins on the CPU: 0.29.x requires torch >= 2.14, and 0.28.0, the one
built for torch 2.13.0, is a CUDA build whose compiled operators fail to register against torch 2.13.0+cpu
(`RuntimeError: operator torchvision::nms does not exist` on import). The networks themselves are small and
fully described by their papers (ESRGAN, Real-ESRGAN, SwinIR), so each is written here from them.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

log = logging.getLogger(__name__)

# Tried in order. A module named here that does not exist yet (being written) is skipped with a log line.
_ARCHITECTURE_MODULES = ("rrdbnet", "srvgg", "swinir")


def _load_architectures() -> tuple[ModuleType, ...]:
    found = []
    for name in _ARCHITECTURE_MODULES:
        try:
            found.append(importlib.import_module(f"{__name__}.{name}"))
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            log.debug("upscaler architecture %s is not present", name)
    return tuple(found)


ARCHITECTURES: tuple[ModuleType, ...] = _load_architectures()
