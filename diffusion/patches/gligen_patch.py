"""GLIGEN's grounding inside the UNet: boxes carried by conditioning entries, fusers run per model call.

GLIGENTextBoxApply stores its boxes on each conditioning entry, under the option `gligen`, in ComfyUI's form
`("position", GLIGEN handle, [(phrase embedding [1, D], height, width, y, x), ...])` with the box in latent
units (pixels / 8). Only the model call knows the latent's size, so that is where the boxes become GLIGEN's
normalised (x0, y0, x1, y1), the position net turns them into grounding tokens, and the fusers run after
each transformer block's self-attention (the `after_self_attention` hook).

Entries without boxes (the negative prompt, usually) that are evaluated in the same call get GLIGEN's null
tokens: every object slot masked, so the position net returns its learnt null features. That is what the
paper's sampler and diffusers' GLIGEN pipeline do for the unconditional prediction (ComfyUI instead runs them
without the fusers); it also keeps the positive and the negative in one batched call.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from ..models.gligen import MAX_OBJECTS, GLIGENModel
from .placement import PlacedModel
from .unet_patches import Site, UNetPatches

log = logging.getLogger(__name__)

OPTION = "gligen"
CONTEXT_FAMILIES = {768: "SD1.x", 1024: "SD2.x", 1280: "SDXL refiner", 2048: "SDXL"}
FAMILY_TITLES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "sdxl_refiner": "SDXL refiner"}

Box = tuple[Tensor, float, float, float, float]  # (phrase embedding [1, D], height, width, y, x) in latent units


class GLIGENHandle(PlacedModel[GLIGENModel]):
    """GLIGEN: a loaded GLIGEN model and its file name (errors name it). `placed(device, dtype)` gives the
    model on the sampler's device in the UNet's dtype; one such copy is kept (the CPU fp32 original is
    returned as is when it already fits)."""

    def describe(self) -> str:
        family = CONTEXT_FAMILIES.get(self.model.context_dim, f"{self.model.context_dim}-wide text")
        return f"GLIGEN {self.name!r} (for {family} models: {self.model.context_dim}-wide text context)"


def append_box(conditioning: list[tuple[Tensor, dict[str, Any]]], gligen: GLIGENHandle, phrase: Tensor,
               width: float, height: float, x: float, y: float, downscale: int = 8,
               node: str = "GLIGENTextBoxApply", clip_family: str | None = None,
               ) -> list[tuple[Tensor, dict[str, Any]]]:
    """New conditioning entries whose `gligen` option holds their earlier boxes plus this one (pixels, turned
    into latent units by `downscale`). The entries' tensors are shared; their option dicts are new.
    `clip_family` (the family of the CLIP that encoded the phrase) must be SD1's: text-box GLIGEN exists for
    SD1.x only, and an SD2/SDXL phrase embedding of the right width would still be meaningless to it."""
    if clip_family is not None and clip_family != "sd1":
        raise ValueError(f"{node}: {gligen.describe()} grounds SD1.x models only; the clip is from an "
                         f"{FAMILY_TITLES.get(clip_family, clip_family)} checkpoint")
    if phrase.ndim != 2 or phrase.shape[0] != 1:
        raise ValueError(f"{node}: the phrase embedding must be [1, width], got {list(phrase.shape)}")
    if phrase.shape[-1] != gligen.model.position_net.in_dim:
        raise ValueError(f"{node}: {gligen.describe()} takes {gligen.model.position_net.in_dim}-wide phrase "
                         f"embeddings; this clip's pooled output is {phrase.shape[-1]} wide "
                         f"({_family(phrase.shape[-1], pooled=True)}); use the CLIP of an SD1.x checkpoint")
    out = []
    for tensor, opts in conditioning:
        if tensor.shape[-1] != gligen.model.context_dim:
            raise ValueError(f"{node}: {gligen.describe()} does not fit conditioning_to, whose text context is "
                             f"{tensor.shape[-1]} wide ({_family(tensor.shape[-1])})")
        previous = opts.get(OPTION)
        boxes = list(previous[2]) if previous is not None else []
        if len(boxes) >= MAX_OBJECTS:
            raise ValueError(f"{node}: GLIGEN grounds at most {MAX_OBJECTS} boxes per conditioning; this one "
                             f"already has {len(boxes)}")
        boxes.append((phrase, height / downscale, width / downscale, y / downscale, x / downscale))
        out.append((tensor, {**opts, OPTION: ("position", gligen, boxes)}))
    return out


def _family(width: int, pooled: bool = False) -> str:
    if pooled:
        return {768: "SD1.x CLIP-L", 1024: "SD2.x OpenCLIP-H", 1280: "SDXL OpenCLIP-bigG"}.get(width, "unknown")
    return CONTEXT_FAMILIES.get(width, "unknown model family")


def box_tensors(boxes: list[Box], latent_h: int, latent_w: int, phrase_dim: int,
                slots: int = MAX_OBJECTS) -> tuple[Tensor, Tensor, Tensor]:
    """GLIGEN's inputs for one entry: boxes [slots, 4] as (x0, y0, x1, y1) fractions of the latent, masks
    [slots] (1 where an object is), phrase embeddings [slots, phrase_dim]; unused slots are zero."""
    if len(boxes) > slots:
        raise ValueError(f"GLIGEN grounds at most {slots} boxes, got {len(boxes)}")
    xyxy = torch.zeros(slots, 4)
    masks = torch.zeros(slots)
    phrases = torch.zeros(slots, phrase_dim)
    for i, (phrase, h, w, y, x) in enumerate(boxes):
        xyxy[i] = torch.tensor([x / latent_w, y / latent_h, (x + w) / latent_w, (y + h) / latent_h])
        masks[i] = 1.0
        phrases[i] = phrase.reshape(-1).float()
    return xyxy, masks, phrases


def grounding_tokens(model: GLIGENModel, entries: list[list[Box] | None], latent_h: int, latent_w: int) -> Tensor:
    """Tokens [len(entries), 30, context_dim] of a call's entries (None: no boxes, all slots null), on the
    model's device and in its dtype."""
    param = next(model.parameters())
    inputs = [box_tensors(boxes or [], latent_h, latent_w, model.position_net.in_dim) for boxes in entries]
    xyxy, masks, phrases = (torch.stack(parts).to(param.device, param.dtype) for parts in zip(*inputs, strict=True))
    return model.position_net(xyxy, masks, phrases)


def grounding_patches(options: list[dict[str, Any]], rows: int,
                      latent_hw: tuple[int, int]) -> UNetPatches | None:
    """The UNet patches of one batched model call whose entries have `options` (in batch order, `rows` batch
    rows each, inputs `latent_hw` in size), or None when no entry carries GLIGEN boxes. The grounding tokens
    are computed at the first fuser, on the UNet's device and in its dtype, once per call."""
    grounded = [opts[OPTION] for opts in options if OPTION in opts]
    if not grounded:
        return None
    handles = {id(g[1]): g[1] for g in grounded}
    if len(handles) > 1:
        names = ", ".join(sorted(h.name for h in handles.values()))
        raise ValueError(f"GLIGEN: one sampling call has boxes from different GLIGEN models ({names}); use one")
    for kind, *_ in grounded:
        if kind != "position":
            raise ValueError(f"GLIGEN: unsupported grounding kind {kind!r} (only 'position' boxes)")
    handle: GLIGENHandle = grounded[0][1]
    entries = [opts[OPTION][2] if OPTION in opts else None for opts in options]
    return UNetPatches(after_self_attention=(_FuserHook(handle, entries, rows, latent_hw),))


class _FuserHook:
    """`after_self_attention` hook running the fuser of each transformer block with the call's tokens."""

    def __init__(self, handle: GLIGENHandle, entries: list[list[Box] | None], rows: int,
                 latent_hw: tuple[int, int]) -> None:
        self.handle, self.entries, self.rows, self.latent_hw = handle, entries, rows, latent_hw
        self._placed: tuple[GLIGENModel, Tensor] | None = None

    def _model_and_tokens(self, x: Tensor) -> tuple[GLIGENModel, Tensor]:
        if self._placed is None or self._placed[1].device != x.device or self._placed[1].dtype != x.dtype:
            model = self.handle.placed(x.device, x.dtype)
            with torch.no_grad():
                tokens = grounding_tokens(model, self.entries, *self.latent_hw)
            self._placed = model, tokens.repeat_interleave(self.rows, dim=0)
        return self._placed

    def __call__(self, x: Tensor, site: Site) -> Tensor:
        model, tokens = self._model_and_tokens(x)
        kind, index = site.block
        fuser = model.fuser(kind, index, site.transformer)
        if fuser is None or fuser.query_dim != x.shape[-1]:
            where = "middle_block" if kind == "middle" else f"{kind}_blocks.{index}"
            raise ValueError(f"{self.handle.describe()} has no fuser for this model's transformer block "
                             f"{where}.1.transformer_blocks.{site.transformer} ({x.shape[-1]} wide): the model "
                             f"is not the SD1.x UNet GLIGEN was trained for")
        if x.shape[0] != tokens.shape[0]:
            raise ValueError(f"GLIGEN: the UNet batch {x.shape[0]} does not match its {tokens.shape[0]} "
                             f"rows of grounding tokens")
        return fuser(x, tokens, getattr(site.attention, "heads", None))
