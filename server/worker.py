"""The workers: one thread per compute device, each with its own Executor, taking prompts from the store.

A worker never waits on the event loop: events go to the loop with `call_soon_threadsafe` (through
`Hub.publish_threadsafe`), previews are encoded here, in the worker's thread. Event routing, cancelling and
the end of a prompt are the same for every pool (prompt_run.py). The workers share one `Environment`, so
loaded models are shared too: the model cache loads each file once, and the model manager keeps a module
that one prompt runs from being re-patched for another (diffusion/sharing.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from graph.cache import Cache
from graph.executor import Executor
from graph.registry import NodeRegistry
from graph.validation import validate_prompt
from nodes.environment import Environment
from server.prompt_run import (
    FinishedCallback,
    PromptPool,
    encode_preview,
    execution_error,
    interrupt_if_asked,
    is_preview,
    publish_preview,
    validation_error,
)
from server.store import QueueItem, Store, history_entry
from server.websocket import Hub

log = logging.getLogger(__name__)


class WorkerPool(PromptPool):
    """The workers and what requests ask of them: wake, cancel, interrupt, free."""

    def __init__(self, store: Store, registry: NodeRegistry, env: Environment, hub: Hub,
                 make_cache: Callable[[], Cache], devices: list[dict[str, Any]],
                 on_finished: FinishedCallback, previews: bool = True) -> None:
        self.store, self.registry, self.env, self.hub = store, registry, env, hub
        self.on_finished = on_finished
        self.work = threading.Event()
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.cancelled: set[str] = set()
        # previews False (--preview-method none): samplers make no preview images at all
        self.workers = [Worker(self, device, Executor(env=env, cache=make_cache(), previews=previews))
                        for device in devices]

    def start(self) -> None:
        for worker in self.workers:
            worker.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.stopping.set()
        self.work.set()
        for worker in self.workers:
            worker.executor.interrupt(None)
        for worker in self.workers:
            worker.join(timeout)

    def running(self) -> list[tuple[QueueItem, str | None]]:
        return [(w.current, w.current_node) for w in self.workers if w.current is not None]

    def interrupt(self, prompt_id: str | None) -> bool:
        """Interrupt this running prompt (every running prompt when None)."""
        return any([w.executor.interrupt(prompt_id) for w in self.workers])

    def request_free(self, unload_models: bool, free_memory: bool) -> None:
        for worker in self.workers:
            worker.free_request(unload_models, free_memory)
        self.wake()


class Worker(threading.Thread):
    """Runs prompts on one device, one at a time."""

    def __init__(self, pool: WorkerPool, device: dict[str, Any], executor: Executor) -> None:
        super().__init__(name=f"worker-{device.get('type', 'cpu')}-{device.get('index') or 0}", daemon=True)
        self.pool = pool
        self.device = device
        self.executor = executor
        self.current: QueueItem | None = None
        self.current_node: str | None = None
        self._free = (False, False)
        self._free_lock = threading.Lock()

    def free_request(self, unload_models: bool, free_memory: bool) -> None:
        with self._free_lock:
            self._free = (self._free[0] or unload_models, self._free[1] or free_memory)

    def _apply_free(self) -> None:
        with self._free_lock:
            unload, free_memory = self._free
            self._free = (False, False)
        if unload or free_memory:
            self.pool.env.unload_models()
        if free_memory:
            self.executor.cache.clear()

    def _bind_device(self) -> None:
        if self.device.get("type") == "cuda":
            import torch

            torch.cuda.set_device(int(self.device.get("index") or 0))

    def run(self) -> None:
        self._bind_device()
        pool = self.pool
        while not pool.stopping.is_set():
            self._apply_free()
            pool.work.clear()
            try:
                item = pool.store.claim_next()
            except Exception:
                log.exception("the queue could not be read")
                item = None
            if item is None:
                pool.work.wait(1.0)
                continue
            with pool.lock:
                self.current, self.current_node = item, None
            pool.publish_status()
            try:
                entry = self._execute(item)
            except Exception as exc:  # the engine itself failed: record it, keep serving
                log.exception("prompt %s failed outside any node", item.prompt_id)
                entry = history_entry(item, {}, "error", False, [["execution_error", execution_error(
                    item.prompt_id, str(exc), type(exc).__name__)]])
            pool.finish(item, entry, self._release)

    def _release(self) -> None:
        self.current, self.current_node = None, None

    def _execute(self, item: QueueItem) -> dict[str, Any]:
        pool = self.pool
        client_id = item.extra_data.get("client_id") or None
        validation = validate_prompt(item.prompt, pool.registry, pool.env, targets=item.outputs or None)
        if not validation.ok:
            message = validation_error(item.prompt_id, validation.error)
            self._send("execution_error", message, client_id)
            return history_entry(item, {}, "error", False, [["execution_error", message]])

        def events(event: str, data: dict[str, Any]) -> None:
            if event == "execution_start":
                interrupt_if_asked(pool.lock, pool.cancelled, item.prompt_id, self.executor.interrupt)
            elif event == "executing":
                self.current_node = data.get("node")
            if event == "preview":
                image = data.get("image")
                if is_preview(image):
                    publish_preview(pool.hub, encode_preview(image), item.prompt_id, data.get("node"), client_id)
                return
            self._send(event, data, client_id)

        result = self.executor.execute(validation.prompt, item.prompt_id, events, item.extra_data)
        success = result.status == "success"
        return history_entry(item, result.outputs, "success" if success else "error", success, result.messages)

    def _send(self, event: str, data: dict[str, Any], client_id: str | None) -> None:
        self.pool.send_event(event, data, client_id)
