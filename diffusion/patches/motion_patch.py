"""AnimateDiff motion modules inserted into the UNet as a reversible patch carried by a MODEL clone.

The UNet is never copied or changed: `motion_patches` returns `UNetPatches` whose `block_features` hook runs
the matching motion module after each block's ResBlock and transformer (the places the modules were trained
at), and a guidance wrapper (`frames_wrapper`) that tells the hook how many frames one clip has: the batch
of latents the guider is given is the frames of one clip, and the UNet call stacks one copy of it per
conditioning entry (positive, negative, areas), so the UNet's batch is a whole number of clips.

Without a guider (a bare denoiser call) the whole UNet batch counts as one clip.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import weakref
from collections.abc import Callable, Iterator
from contextvars import ContextVar

import torch
from torch import Tensor

from ..models.motion_module import MotionModuleSet
from ..models.unet_blocks import clip_group_norm
from ..sampling.guidance import GuidanceHooks
from ..sampling.model_sampling import ModelSampling
from ..sampling.schedules import DiscreteSchedule
from .unet_patches import Site, UNetPatches

_FRAMES: ContextVar[int | None] = ContextVar("latentloom_video_frames", default=None)


@contextlib.contextmanager
def video_frames(frames: int) -> Iterator[None]:
    """Within the block, motion modules treat every `frames` consecutive batch rows as one clip."""
    token = _FRAMES.set(int(frames))
    try:
        yield
    finally:
        _FRAMES.reset(token)


def frames_wrapper(x: Tensor, sigma: Tensor, inner: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Guidance wrapper: the latent batch the guider evaluates is one clip."""
    with video_frames(x.shape[0]):
        return inner(x, sigma)


def clip_norm_frames_wrapper(x: Tensor, sigma: Tensor, inner: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """`frames_wrapper`, and the UNet's ResBlocks normalise the clip's frames together (AnimateDiff v1)."""
    with video_frames(x.shape[0]), clip_group_norm(x.shape[0]):
        return inner(x, sigma)


def check_fits(motion: MotionModuleSet, model_channels: int, channel_mult: tuple[int, ...],
               num_res_blocks: int, family_title: str, name: str) -> None:
    """A ValueError naming the module and the model when the module's stages do not match the UNet's."""
    widths = tuple(model_channels * m for m in channel_mult)
    c = motion.config
    if widths != c.channels or c.down_per_level != num_res_blocks or c.up_per_level != num_res_blocks + 1:
        raise ValueError(f"motion module {name!r} ({c.version}, widths {list(c.channels)}) does not fit this "
                         f"{family_title} UNet (widths {list(widths)}); AnimateDiff v1/v2/v3 modules need an SD1.x "
                         f"model, the SDXL beta module an SDXL model")


def _locate(site: Site, levels: int, num_res_blocks: int) -> tuple[str, int, int] | None:
    """(side, level, index) of the motion module at `site` in the files' numbering."""
    kind, i = site.block
    if kind == "middle":
        return "mid", 0, 0
    if kind == "input":
        if i == 0:
            return None
        level, j = divmod(i - 1, num_res_blocks + 1)  # each level: its ResBlocks, then a Downsample
        return ("down", level, j) if j < num_res_blocks and level < levels else None
    level, j = divmod(i, num_res_blocks + 1)
    return "up", level, j


_PLACED: weakref.WeakKeyDictionary[MotionModuleSet, dict[tuple[str, torch.dtype], MotionModuleSet]] = \
    weakref.WeakKeyDictionary()
_PLACED_LOCK = threading.Lock()


def placed(motion: MotionModuleSet, device: torch.device, dtype: torch.dtype) -> MotionModuleSet:
    """`motion` on `device` in `dtype`: the loaded set itself when it already is, else one copy kept per set
    (the loaded set, shared by every MODEL clone and prompt, is never moved or cast)."""
    first = next(motion.parameters())
    if first.device == device and first.dtype == dtype:
        return motion
    key = (str(device), dtype)
    with _PLACED_LOCK:
        copies = _PLACED.setdefault(motion, {})
        if key not in copies:
            copies.clear()
            copies[key] = copy.deepcopy(motion).to(device, dtype)
        return copies[key]


def _module_prefix(side: str, level: int, index: int) -> str:
    if side == "mid":
        return "mid_block.motion_modules.0."
    return f"{side}_blocks.{level}.motion_modules.{index}."


def motion_patches(motion: MotionModuleSet, num_res_blocks: int, scale: float = 1.0,
                   deltas: dict[str, Tensor] | None = None) -> UNetPatches:
    """The UNet patches running `motion` (weights on the device and dtype of the features when first used).
    `scale` multiplies what each module adds to its input (1: as trained, 0: no motion). `deltas` (motion
    LoRAs: weight changes by module key) are added to the weights for these calls only, through
    `functional_call`: the shared module set is not changed."""
    levels = len(motion.config.channels)
    by_module: dict[str, dict[str, Tensor]] = {}
    for key, delta in (deltas or {}).items():
        head, _, rest = key.partition(".temporal_transformer.")
        by_module.setdefault(head + ".", {})["temporal_transformer." + rest] = delta

    def hook(h: Tensor, site: Site) -> Tensor:
        where = _locate(site, levels, num_res_blocks)
        module = None if where is None else motion.module_at(*where)
        if module is None:
            return h
        module = placed(motion, h.device, h.dtype).module_at(*where)
        frames = _FRAMES.get() or h.shape[0]
        changes = by_module.get(_module_prefix(*where))
        if changes:
            weights = {k: module.get_parameter(k) + d.to(h.device, h.dtype) for k, d in changes.items()}
            out = torch.func.functional_call(module, weights, (h, frames))
        else:
            out = module(h, frames)
        return out if scale == 1.0 else h + (out - h) * scale

    return UNetPatches(block_features=(hook,))


def motion_guidance(clip_norm: bool = False) -> GuidanceHooks:
    """The guidance hooks a motion-patched MODEL adds: the frame count of each evaluation; with `clip_norm` (v1
    modules, whose UNet was not "inflated" per frame) ResBlock norms span the clip's frames."""
    return GuidanceHooks(wrap=[clip_norm_frames_wrapper if clip_norm else frames_wrapper])



# ADE's beta_schedule choices (its order). AnimateDiff's SD1.x modules were trained on linear betas 0.00085..0.012
# ("sqrt_linear" in ComfyUI's naming, whose "linear" is SD's scaled-linear), the SDXL beta on scaled-linear betas
# up to 0.020; "HotshotXL/default" is SD's own schedule.
BETA_SCHEDULES = ("autoselect", "use existing", "sqrt_linear (AnimateDiff)", "linear (AnimateDiff-SDXL)",
                  "linear (HotshotXL/default)", "avg(sqrt_linear,linear)", "lcm avg(sqrt_linear,linear)", "lcm",
                  "lcm[100_ots]", "lcm >> sqrt_linear", "sqrt", "cosine", "squaredcos_cap_v2")
_BETAS = {"sqrt_linear (AnimateDiff)": ("linear", 0.00085, 0.012),
          "linear (AnimateDiff-SDXL)": ("scaled_linear", 0.00085, 0.020),
          "linear (HotshotXL/default)": ("scaled_linear", 0.00085, 0.012)}


def beta_schedule_sampling(name: str, versions: list[str], current: ModelSampling) -> ModelSampling | None:
    """The ModelSampling a MODEL gets for ADE's `beta_schedule` (None: keep the current one). `autoselect`
    picks the schedule the first motion module was trained with. Other schedules are refused by name."""
    if name == "autoselect":
        if not versions:
            return None
        name = "linear (AnimateDiff-SDXL)" if versions[0] == "sdxl_beta" else "sqrt_linear (AnimateDiff)"
    if name == "use existing":
        return None
    if name not in _BETAS:
        raise ValueError(f"beta_schedule {name!r} is not supported; supported: autoselect, use existing, "
                         f"{', '.join(_BETAS)}")
    if type(current) is not ModelSampling:
        raise ValueError(f"beta_schedule {name!r} needs a discrete-time (eps or v) model; this MODEL samples with "
                         f"{type(current).__name__} (choose 'use existing')")
    kind, start, end = _BETAS[name]
    schedule = DiscreteSchedule.from_config(kind, linear_start=start, linear_end=end)
    return ModelSampling(schedule, current.prediction, current.quantize_timesteps)
