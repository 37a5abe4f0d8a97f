"""Which models sit on the compute device: load on demand, evict the least recently used, stream what
does not fit.

Models rest on the offload device (CPU RAM) and move to the compute device, with their patches applied, when
a node runs them. They stay there after the node ("smart memory") until another model needs the room; then
the least recently used ones go back. A model larger than the free memory can still run in low-memory mode:
as many of its layers as fit stay on the device and each of the others is copied there just for its own
forward.

Several worker threads share one manager. Its bookkeeping is under one lock, and a module that a caller of
`use` runs is held for it (sharing.py): another caller that wants a different patch set of the same module
waits until the block ends, so a running prompt's weights never change under it.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .devices import free_memory
from .patches.patcher import ModelPatcher
from .sharing import ModuleGates

log = logging.getLogger(__name__)

Tensor = torch.Tensor


def _own_tensors(module: nn.Module) -> list[tuple[str, Tensor]]:
    """The parameters and buffers a module holds itself (not through its children)."""
    own = [(n, p) for n, p in module.named_parameters(recurse=False)]
    own += [(n, b) for n, b in module.named_buffers(recurse=False) if b is not None]
    return own


def _set_tensor(module: nn.Module, name: str, value: Tensor) -> None:
    if name in module._parameters:
        module._parameters[name].data = value
    else:
        module._buffers[name] = value


def _to_device(value: object, device: torch.device) -> object:
    return value.to(device) if isinstance(value, Tensor) else value


class LayerStreamer:
    """Runs a module whose weights stay on the offload device: every submodule that holds tensors of its
    own gets them copied to `device` in a forward pre-hook and dropped again in the forward hook, so the
    device only ever holds one layer's weights (plus the `resident_bytes` worth of layers kept there).
    Tensor arguments reaching a streamed layer are moved to `device` too, so callers need not know where
    the weights are."""

    def __init__(self, model: nn.Module, device: torch.device, resident_bytes: int = 0) -> None:
        self.model, self.device = model, device
        self.resident: list[nn.Module] = []
        self.streamed: list[nn.Module] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._resting: dict[nn.Module, list[tuple[str, Tensor]]] = {}
        self._depth: dict[nn.Module, int] = {}
        self._lock = threading.Lock()  # threads holding the same patch set run the module at the same time
        self.resident_nbytes = 0
        for module in model.modules():
            own = _own_tensors(module)
            if not own:
                continue
            size = sum(t.nbytes for _, t in own)
            if self.resident_nbytes + size <= resident_bytes:
                self._place(module, own, device)
                self.resident.append(module)
                self.resident_nbytes += size
            else:
                self.streamed.append(module)
                self._handles.append(module.register_forward_pre_hook(self._bring, with_kwargs=True))
                self._handles.append(module.register_forward_hook(self._drop, always_call=True))

    @staticmethod
    @torch.no_grad()
    def _place(module: nn.Module, own: list[tuple[str, Tensor]], device: torch.device) -> None:
        for name, t in own:
            _set_tensor(module, name, t.data.to(device))

    @torch.no_grad()
    def _bring(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        with self._lock:
            depth = self._depth.get(module, 0)
            self._depth[module] = depth + 1
            if depth == 0:  # a copy even when the devices are the same, so the resting weights stay untouched
                own = _own_tensors(module)
                self._resting[module] = [(n, t.data) for n, t in own]
                for name, t in own:
                    _set_tensor(module, name, t.data.to(self.device, copy=True))
        args = tuple(_to_device(a, self.device) for a in args)
        kwargs = {k: _to_device(v, self.device) for k, v in kwargs.items()}
        return args, kwargs

    def _drop(self, module: nn.Module, args: tuple, output: object) -> None:
        with self._lock:
            depth = self._depth.get(module, 1) - 1
            self._depth[module] = depth
            if depth == 0 and module in self._resting:
                for name, resting in self._resting.pop(module):
                    _set_tensor(module, name, resting)

    def remove(self, offload_device: torch.device) -> None:
        """Take the hooks off and put the resident layers back on `offload_device`."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self.resident:
            self._place(module, _own_tensors(module), offload_device)
        self.resident.clear()


@dataclass
class LoadedModel:
    patcher: ModelPatcher
    nbytes: int  # bytes it holds on the compute device
    streamer: LayerStreamer | None = None
    in_use: int = 0


class ModelManager:
    """Moves models between an offload device and a compute device (see the module docstring).

    budget_bytes caps the bytes of models kept on the compute device; memory_probe replaces the device's
    own free-memory reading (tests simulate a small device with it). With device == offload device and
    neither given, nothing ever needs evicting and the manager only applies and removes patches."""

    def __init__(
        self,
        device: torch.device | str,
        offload_device: torch.device | str = "cpu",
        budget_bytes: int | None = None,
        low_memory: bool = False,
        *,
        memory_probe: Callable[[], int] | None = None,
        reserve_bytes: int = 0,
    ) -> None:
        self.device = torch.device(device)
        self.offload_device = torch.device(offload_device)
        self.budget_bytes = budget_bytes
        self.low_memory = low_memory
        self.memory_probe = memory_probe
        self.reserve_bytes = reserve_bytes
        self._loaded: OrderedDict[int, LoadedModel] = OrderedDict()  # least recently used first
        self._lock = threading.RLock()  # the bookkeeping above and the moves and patches it records
        self.gates = ModuleGates()  # who runs which module with which patch set now

    def loaded_nbytes(self) -> int:
        with self._lock:
            return sum(entry.nbytes for entry in self._loaded.values())

    def available(self) -> int:
        """Bytes the compute device can still take for models."""
        if self.memory_probe is not None:
            free = self.memory_probe()
        elif self.device == self.offload_device:
            free = 1 << 62  # moving a model to where it already is frees nothing
        else:
            free = free_memory(self.device)
        if self.budget_bytes is not None:
            free = min(free, self.budget_bytes - self.loaded_nbytes())
        return free - self.reserve_bytes

    def working_memory(self) -> int:
        """Bytes a model's activations may take now (what `attention_budget` is given around a model call): the
        device's free memory (the RAM's on the CPU, where `available` does not count), within the budget, less the
        reserve; a fifth of it is kept back for the activations around the attention."""
        free = self.memory_probe() if self.memory_probe is not None else free_memory(self.device)
        if self.budget_bytes is not None:
            free = min(free, self.budget_bytes - self.loaded_nbytes())
        return max(0, (free - self.reserve_bytes) * 4 // 5)

    def loaded(self) -> list[tuple[str, int]]:
        """(name, bytes on the compute device) of the loaded models, least recently used first."""
        with self._lock:
            return [(entry.patcher.name, entry.nbytes) for entry in self._loaded.values()]

    def is_loaded(self, patcher: ModelPatcher) -> bool:
        with self._lock:
            entry = self._loaded.get(id(patcher.model))
            return entry is not None and entry.patcher.patch_token is patcher.patch_token

    @contextmanager
    def use(self, patchers: Sequence[ModelPatcher], extra_memory: int = 0, *,
            exclusive: bool = False) -> Iterator[list[nn.Module]]:
        """Load `patchers` (see `load`) and keep them, with their patches, until the block ends: neither
        evicted nor re-patched for another caller, who waits (sharing.py). Callers with the same patch set
        share the modules; `exclusive` keeps them from everyone else too (for a caller that changes the
        module beyond its weights: hooks, flags). They stay loaded afterwards until something else needs
        the room."""
        self._check_distinct(patchers)
        with self.gates.hold(patchers, exclusive=exclusive):
            with self._lock:
                modules = self._load(patchers, extra_memory)
                entries = [self._loaded[id(p.model)] for p in patchers]
                for entry in entries:
                    entry.in_use += 1
            try:
                yield modules
            finally:
                with self._lock:
                    for entry in entries:
                        entry.in_use -= 1

    def load(self, patchers: Sequence[ModelPatcher], extra_memory: int = 0) -> list[nn.Module]:
        """Put each patcher's module on the compute device with its patches applied, evicting the least
        recently used other models while (free memory − extra_memory) is short of what they need. Waits
        while another caller uses one of them with another patch set; once it returns, nothing keeps them
        as they are: run them inside `use`."""
        self._check_distinct(patchers)
        with self.gates.hold(patchers), self._lock:
            return self._load(patchers, extra_memory)

    def _load(self, patchers: Sequence[ModelPatcher], extra_memory: int) -> list[nn.Module]:
        missing = [p for p in patchers if id(p.model) not in self._loaded]
        for p in patchers:
            entry = self._loaded.get(id(p.model))
            if entry is not None:
                if entry.patcher.patch_token is not p.patch_token:
                    p.patch()  # in place: resident weights on the device, streamed ones where they rest
                    entry.patcher = p
                self._loaded.move_to_end(id(p.model))
        needed = sum(p.model_nbytes() for p in missing)
        keep = {id(p.model) for p in patchers}
        self._evict_until(needed + extra_memory, keep)
        for p in missing:
            self._load_one(p, extra_memory)
        return [p.model for p in patchers]

    def _check_distinct(self, patchers: Sequence[ModelPatcher]) -> None:
        tokens: dict[int, object | None] = {}
        for p in patchers:
            if tokens.setdefault(id(p.model), p.patch_token) is not p.patch_token:
                raise ValueError(
                    f"two different patch sets of the same model {p.name!r} asked for at once; "
                    f"a shared module carries one patch set at a time"
                )

    def _evict_until(self, needed: int, keep: set[int]) -> None:
        for key in list(self._loaded):
            if self.available() >= needed:
                return
            entry = self._loaded[key]
            if key not in keep and entry.in_use == 0:
                log.debug("evicting %s (%d bytes) from %s", entry.patcher.name, entry.nbytes, self.device)
                self._unload(key)

    def _load_one(self, patcher: ModelPatcher, extra_memory: int) -> None:
        size = patcher.model_nbytes()
        room = self.available() - extra_memory
        if size <= room or not self.low_memory:
            if size > room:
                log.warning(
                    "%s needs %d bytes but %s has %d free; loading anyway (low-memory mode would stream it)",
                    patcher.name, size, self.device, room,
                )
            patcher.patch(self.device)
            entry = LoadedModel(patcher, size)
        else:
            patcher.patch(self.offload_device)
            streamer = LayerStreamer(patcher.model, self.device, resident_bytes=max(room, 0))
            log.info(
                "%s: %d of %d bytes fit on %s; streaming %d layers",
                patcher.name, streamer.resident_nbytes, size, self.device, len(streamer.streamed),
            )
            entry = LoadedModel(patcher, streamer.resident_nbytes, streamer)
        self._loaded[id(patcher.model)] = entry

    def _unload(self, key: int) -> None:
        entry = self._loaded.pop(key)
        if entry.streamer is not None:
            entry.streamer.remove(self.offload_device)
        entry.patcher.model.to(self.offload_device)
        entry.patcher.unpatch()

    def unload(self, patcher: ModelPatcher) -> None:
        """Send a model back to the offload device with its original weights (a no-op when not loaded);
        waits until nobody else runs it."""
        with self.gates.hold([patcher], exclusive=True), self._lock:
            if id(patcher.model) in self._loaded:
                self._unload(id(patcher.model))

    def unload_all(self) -> None:
        """Unload every model that no `use` block runs now; those that one does stay (another worker's
        running prompt) and go back when a later load needs their room."""
        with self._lock:
            for key, entry in list(self._loaded.items()):
                if entry.in_use:
                    log.info("%s is in use; it stays on %s", entry.patcher.name, self.device)
                else:
                    self._unload(key)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
