"""`--compile`: torch.compile of the UNet's and the VAE decoder's forward, with the eager code as the fallback.

`compile_forward(module)` puts a `CompiledForward` in front of the module's own forward (an instance attribute:
the module, its weights, its patches and the model manager's device moves stay as they are). Calls with only
tensors (and None) go through torch.compile's graph; calls that carry model patches (keyword arguments: hooks,
wrappers, ControlNet residuals) run eagerly, since each patch set would compile a graph of its own and most are
used for a few steps. Compiled graphs are specialised to shapes, dtypes and devices; a new shape recompiles once.

Compiling needs a working backend (Inductor: a C++ compiler on CPUs, Triton on GPUs). Where there is none, or a
graph fails to compile, the first call logs one warning line and the module runs eagerly from then on: the
result is the eager result, only the speed-up is lost.

Inductor's cache (compiled kernels, FX graphs) goes to the folder `set_cache_dir` names (the data directory's
cache/torchinductor for the engine), so a later process with the same model and shapes compiles in seconds.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


def set_cache_dir(folder: Path) -> None:
    """Inductor's and Triton's caches under `folder` (unless the environment already names them)."""
    folder.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder))
    os.environ.setdefault("TRITON_CACHE_DIR", str(folder / "triton"))


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, Tensor)


class CompiledForward:
    """A module's forward that runs through torch.compile when called with tensors only (see module docstring).

    `what` names the module in the warning. `compiler` is torch.compile unless a test gives another."""

    def __init__(self, forward: Callable[..., Tensor], what: str,
                 compiler: Callable[..., Callable[..., Tensor]] | None = None,
                 eager_when: Callable[[], bool] | None = None):
        self.eager = forward
        self.eager_when = eager_when  # state the graph cannot see (a context variable): eager while it says so
        self.what = what
        self.compiler = compiler or torch.compile
        self.compiled: Callable[..., Tensor] | None = None
        self.failed = False
        self.calls = 0  # calls that went through the compiled graph (tests, the bench)
        self._lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        if self.failed or kwargs or not all(_plain(a) for a in args) or (self.eager_when and self.eager_when()):
            return self.eager(*args, **kwargs)
        try:
            with self._lock:  # one thread compiles; torch.compile's graphs are then safe to share
                if self.compiled is None:
                    self.compiled = self.compiler(self.eager, dynamic=False)
                started = time.perf_counter()
                out = self.compiled(*args)
            self.calls += 1
            if self.calls == 1:
                log.info("%s compiled and run in %.1f s", self.what, time.perf_counter() - started)
            return out
        except Exception as exc:  # no C++ compiler, no Triton, an unsupported op: the eager forward still works
            self.failed = True
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            log.warning("--compile: %s runs uncompiled (%s: %s)", self.what, type(exc).__name__, reason)
            return self.eager(*args)


def compile_forward(module: nn.Module, what: str,
                    compiler: Callable[..., Callable[..., Tensor]] | None = None,
                    eager_when: Callable[[], bool] | None = None) -> CompiledForward:
    """Route `module`'s calls through a CompiledForward (once: a module already wrapped keeps its wrapper)."""
    current = module.__dict__.get("forward")
    if isinstance(current, CompiledForward):
        return current
    wrapper = CompiledForward(module.forward, what, compiler, eager_when)
    module.forward = wrapper  # type: ignore[method-assign]
    return wrapper


def uncompile(module: nn.Module) -> None:
    """Back to the module's own forward."""
    if isinstance(module.__dict__.get("forward"), CompiledForward):
        del module.forward
