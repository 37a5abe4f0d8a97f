"""Who may use a shared module now: a module stays as one prompt sees it for as long as that prompt runs it.

Clones of a MODEL or CLIP share one module and differ in weight patches (patcher.py), so the module carries
one patch set at a time. With several worker threads on one `Environment`, prompt A could be sampling with
LoRA a while prompt B re-patched the same module for LoRA b: both images wrong. Each shared module
therefore has a gate, held by the callers of `ModelManager.use` for the whole block (a node's sampling
loop, a text encode, a decode):

- any number of holders that want the same patch set (the same `patch_token`) hold it together: prompts on
  the same base model, or the same LoRA at the same strength, still run concurrently;
- a caller that wants another patch set, or the module for itself alone (`exclusive`: it adds hooks or
  changes flags, as training does), waits until the current holders have left;
- waiting is first come, first served (a ticket per request, in one order for all gates), so a stream of
  prompts on the base model cannot starve one with a LoRA; a thread that already holds a gate skips that
  queue, since it is mid-node and others may be waiting for it to finish;
- a request for several modules (SDXL's two text encoders) takes them all at once or waits for all, so
  there is no order in which to acquire them and no partial hold to deadlock on;
- a nested request (a preview's VAE encode inside sampling) that could only be granted by a thread
  waiting, directly or through others, on this one raises `SharingDeadlock` instead of hanging; a thread
  asking again for a module it holds, with the same patch set, simply holds it once more.

Why gates and not a copy of the weights per worker: a checkpoint is 2–7 GB and a GPU rarely holds two, so
copies would cost what the model manager exists to save; serialising only prompts whose patch sets differ,
and only for the node that runs the module, costs little (on one CPU or one GPU two forward passes at once
are hardly faster than one after the other).
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import nn

from .patches.patcher import ModelPatcher


class SharingDeadlock(RuntimeError):
    """A nested request that could only be granted by a thread that waits for this one."""


@dataclass(eq=False)
class _Gate:
    name: str
    token: object | None = None  # the patch set the holders want; meaningless while there are none
    exclusive: int = 0  # holds taken with exclusive=True (all by one thread)
    holders: dict[int, int] = field(default_factory=dict)  # thread ident -> how many times it holds this gate


@dataclass(eq=False)
class _Ticket:
    order: int
    thread: int
    wants: list[tuple[_Gate, object | None]]
    exclusive: bool


def _conflict(token: object | None, exclusive: bool, other_token: object | None, other_exclusive: bool) -> bool:
    return exclusive or other_exclusive or token is not other_token


class ModuleGates:
    """The gates of the modules one `ModelManager` runs (see the module docstring)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._gates: weakref.WeakKeyDictionary[nn.Module, _Gate] = weakref.WeakKeyDictionary()
        self._waiting: list[_Ticket] = []  # oldest first
        self._order = itertools.count()

    @contextmanager
    def hold(self, patchers: Sequence[ModelPatcher], *, exclusive: bool = False) -> Iterator[None]:
        """Hold each patcher's module with its patch set until the block ends, waiting as the rules say."""
        me = threading.get_ident()
        with self._cond:
            gates = [(self._gate(p.model, p.name), p.patch_token) for p in patchers]
            ticket = _Ticket(next(self._order), me, gates, exclusive)
            self._waiting.append(ticket)
            try:
                while (blockers := self._blockers(ticket)):
                    self._check_cycle(ticket, blockers)
                    self._cond.wait()
            finally:
                self._waiting.remove(ticket)
                self._cond.notify_all()  # a younger ticket may have been queued behind this one
            for gate, token in gates:
                if not gate.holders:
                    gate.token = token
                gate.holders[me] = gate.holders.get(me, 0) + 1
                gate.exclusive += exclusive
        try:
            yield
        finally:
            with self._cond:
                for gate, _ in gates:
                    gate.exclusive -= exclusive
                    gate.holders[me] -= 1
                    if not gate.holders[me]:
                        del gate.holders[me]
                self._cond.notify_all()

    def holders(self, module: nn.Module) -> int:
        """How many threads hold this module now."""
        with self._cond:
            gate = self._gates.get(module)
            return len(gate.holders) if gate is not None else 0

    def waiting(self) -> int:
        """How many requests wait now."""
        with self._cond:
            return len(self._waiting)

    def _gate(self, module: nn.Module, name: str) -> _Gate:
        gate = self._gates.get(module)
        if gate is None:
            gate = self._gates[module] = _Gate(name)
        return gate

    def _blockers(self, ticket: _Ticket) -> set[int]:
        """The threads this request waits for: incompatible holders, then (for a thread holding nothing yet)
        the threads of older requests for the same modules that conflict with it."""
        me, blockers = ticket.thread, set()
        for gate, token in ticket.wants:
            if me in gate.holders:  # again: the same patch set is granted, alone if asked, as the others leave
                if token is not gate.token:
                    blockers.update(gate.holders)  # me among them: it would have to leave itself
                elif ticket.exclusive:
                    blockers.update(h for h in gate.holders if h != me)
            elif gate.holders and _conflict(token, ticket.exclusive, gate.token, gate.exclusive > 0):
                blockers.update(gate.holders)
        if blockers or self._holds_any(me):
            return blockers
        wanted = {id(gate): token for gate, token in ticket.wants}
        for older in self._waiting:
            if older.order >= ticket.order:
                break
            for gate, token in older.wants:
                if id(gate) in wanted and _conflict(wanted[id(gate)], ticket.exclusive, token,
                                                             older.exclusive):
                    blockers.add(older.thread)
        return blockers

    def _holds_any(self, thread: int) -> bool:
        return any(thread in gate.holders for gate in self._gates.values())

    def _check_cycle(self, ticket: _Ticket, blockers: set[int]) -> None:
        """Raise when a thread this request waits for waits, directly or through others, for this thread."""
        waits = {t.thread: t for t in self._waiting if t is not ticket}
        seen, todo = set(), list(blockers)
        while todo:
            thread = todo.pop()
            if thread == ticket.thread:
                names = ", ".join(sorted({gate.name for gate, _ in ticket.wants}))
                raise SharingDeadlock(
                    f"{names}: this thread already holds a module that the holder of this one is waiting "
                    f"for (or holds it itself with another patch set); run the models one after the other"
                )
            if thread in seen or thread not in waits:
                continue
            seen.add(thread)
            todo.extend(self._blockers(waits[thread]))
