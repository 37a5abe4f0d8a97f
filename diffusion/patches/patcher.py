"""Weight patches (LoRA deltas, full diffs) applied to a shared module and removed again bit-exactly.

A `ModelPatcher` is what a MODEL or CLIP socket carries: the module plus the patches that node outputs
added to it. Loading a LoRA clones the patcher (the clone shares the module and copies the patch list), so a
graph can hold the same checkpoint with and without several LoRAs while keeping one copy of the weights. The
shared module carries at most one patch set at a time: patching it for one clone first restores the
original weights that another clone's patches replaced. Nothing here is locked: `ModelManager` patches a
module only while no other caller runs it with another patch set (sharing.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

Tensor = torch.Tensor


@dataclass(frozen=True, eq=False)  # tensors: compare by identity
class LoraDelta:
    """A low-rank update ΔW = (alpha / rank) · up @ down.

    Linear layers: up [out, rank], down [rank, in]. Convolutions (LoCon): up [out, rank, 1, 1] and down
    [rank, in, kh, kw], or with a Tucker core `mid` [rank, rank, kh, kw] between 1×1 up and down.
    alpha None means alpha = rank (scale 1), as trainers do when they store no alpha."""

    up: Tensor
    down: Tensor
    alpha: float | None = None
    mid: Tensor | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of ΔW before it is reshaped to the weight (the layer's own shape for LoCon)."""
        kernel = tuple(self.mid.shape[2:]) if self.mid is not None else tuple(self.down.shape[2:])
        return (self.up.shape[0], self.down.shape[1], *kernel)

    def delta(self, device: torch.device) -> Tensor:
        up = self.up.to(device, torch.float32).flatten(1)
        down = self.down.to(device, torch.float32)
        if self.mid is None:
            product = up @ down.flatten(1)
        else:  # ΔW[o, i, h, w] = Σ_ab up[o, a] · mid[a, b, h, w] · down[b, i]
            mid = self.mid.to(device, torch.float32)
            product = torch.einsum("oa,abhw,bi->oihw", up, mid, down.flatten(1))
        return self.scale * product.reshape(self.shape)


@dataclass(frozen=True, eq=False)  # tensors: compare by identity
class WeightDiff:
    """A full-size difference ΔW added to the weight (LyCORIS `diff`, or a merged model's difference)."""

    diff: Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.diff.shape)

    def delta(self, device: torch.device) -> Tensor:
        return self.diff.to(device, torch.float32)


@dataclass(frozen=True, eq=False)  # patchers: compare by identity
class ModelWeight:
    """Another model's weight, carrying that model's own patches, blended in: W' = model_scale · W + strength ·
    W_other (ComfyUI's merge patches). `model_scale` multiplies the weight as patched so far, so
    `add_patches({k: ModelWeight(other, k, r)}, 1 - r)` is the interpolation r · W + (1 - r) · W_other.
    Nothing is copied: the other weight is read (from its module's originals) when this model is patched."""

    source: ModelPatcher
    key: str
    shape: tuple[int, ...]
    model_scale: float = 1.0

    def delta(self, device: torch.device) -> Tensor:
        return self.source.patched_weight(self.key, device)


Patch = LoraDelta | WeightDiff | ModelWeight


class _PatchState:
    """Kept on the shared module itself: which patch set its weights carry and the originals they replaced."""

    def __init__(self) -> None:
        self.token: object | None = None  # None: the original weights
        self.backup: dict[str, Tensor] = {}


def _patch_state(module: nn.Module) -> _PatchState:
    state = module.__dict__.get("_latentloom_patch_state")
    if state is None:
        state = _PatchState()
        module.__dict__["_latentloom_patch_state"] = state
    return state


def module_nbytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each storage counted once."""
    seen: dict[int, int] = {}
    for t in [*module.parameters(), *module.buffers()]:
        if t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


class ModelPatcher:
    """A module, the devices it runs on and rests on, and the weight patches to apply when it runs."""

    def __init__(
        self,
        model: nn.Module,
        load_device: torch.device | str,
        offload_device: torch.device | str = "cpu",
        *,
        name: str | None = None,
    ) -> None:
        self.model = model
        self.load_device = torch.device(load_device)
        self.offload_device = torch.device(offload_device)
        self.name = name or type(model).__name__
        self.patches: dict[str, list[tuple[float, Patch]]] = {}
        self._token = object()  # identifies this patch set; clones share it until one adds patches

    def clone(self) -> ModelPatcher:
        """A patcher for the same module with its own copy of the patch list."""
        other = ModelPatcher(self.model, self.load_device, self.offload_device, name=self.name)
        other.patches = {key: list(entries) for key, entries in self.patches.items()}
        other._token = self._token
        return other

    @property
    def patch_token(self) -> object | None:
        """What identifies the weights this patcher wants: None for the originals."""
        return self._token if self.patches else None

    def add_patches(self, patches: Mapping[str, Patch], strength: float = 1.0) -> set[str]:
        """Queue `patches` (parameter name → patch) at `strength`; returns the names this module has.
        Names it lacks are left out (the caller reports them); a patch whose size does not fit its weight is
        an error, since it means the patches were made for another model."""
        params = dict(self.model.named_parameters())
        applied = set()
        for key, patch in patches.items():
            weight = params.get(key)
            if weight is None:
                continue
            if math.prod(patch.shape) != weight.numel():
                raise ValueError(
                    f"patch for {key!r} has shape {list(patch.shape)} but the weight is {list(weight.shape)}; "
                    f"was it made for another model?"
                )
            self.patches.setdefault(key, []).append((float(strength), patch))
            applied.add(key)
        if applied:
            self._token = object()
        return applied

    def is_applied(self) -> bool:
        """Whether the shared module's weights are currently this patcher's."""
        return _patch_state(self.model).token is self.patch_token

    @torch.no_grad()
    def patch(self, device: torch.device | str | None = None) -> nn.Module:
        """Move the module to `device` (None: leave it where it is) carrying this patcher's weights:
        W' = W + Σ strength · ΔW, computed in fp32 and stored in the weight's dtype. The originals are kept
        on the offload device for `unpatch`."""
        state = _patch_state(self.model)
        if state.token is not self.patch_token:
            self._restore(state)
        if device is not None:
            self.model.to(device)
        if state.token is not self.patch_token:
            params = dict(self.model.named_parameters())
            for key, entries in self.patches.items():
                weight = params[key]
                state.backup[key] = weight.detach().to(self.offload_device, copy=True)
                weight.copy_(self._apply(entries, weight.float()).to(weight.dtype))
            state.token = self.patch_token
        return self.model

    @staticmethod
    def _apply(entries: list[tuple[float, Patch]], total: Tensor) -> Tensor:
        for strength, patch in entries:
            if isinstance(patch, ModelWeight) and patch.model_scale != 1.0:
                total = total * patch.model_scale
            total = total + strength * patch.delta(total.device).reshape(total.shape)
        return total

    def original_weight(self, key: str) -> Tensor:
        """The module's own (unpatched) parameter `key`, whichever patch set the module carries now."""
        backup = _patch_state(self.model).backup.get(key)
        if backup is not None:
            return backup
        try:
            return self.model.get_parameter(key).detach()
        except AttributeError:
            raise KeyError(f"{self.name} has no parameter {key!r}") from None

    @torch.no_grad()
    def patched_weight(self, key: str, device: torch.device | str | None = None) -> Tensor:
        """Parameter `key` as this patcher's patch set makes it: read from the module when it carries this patch set
        (hold it with `ModelManager.use` so that no other caller re-patches it meanwhile), else computed from the
        originals in float32 without patching the module. On `device` when given."""
        entries = self.patches.get(key)
        if entries and self.is_applied():
            weight = self.model.get_parameter(key).detach()
            return weight.to(weight.device if device is None else torch.device(device))
        original = self.original_weight(key)
        device = original.device if device is None else torch.device(device)
        if not entries:
            return original.to(device)
        return self._apply(entries, original.to(device, torch.float32))

    def unpatch(self) -> None:
        """Restore the original weights, whichever patch set the module carries."""
        self._restore(_patch_state(self.model))

    @torch.no_grad()
    def _restore(self, state: _PatchState) -> None:
        if state.backup:
            params = dict(self.model.named_parameters())
            for key, original in state.backup.items():
                params[key].copy_(original)
        state.backup = {}
        state.token = None

    def model_nbytes(self) -> int:
        return module_nbytes(self.model)

    def __repr__(self) -> str:
        return f"ModelPatcher({self.name}, {len(self.patches)} patched weights, load={self.load_device})"
