"""The workers: one thread per compute device, each with its own Executor, taking prompts from the store.

A worker never waits on the event loop: events go to the loop with `call_soon_threadsafe` (through
`Hub.publish_threadsafe`), previews are encoded here, in the worker's thread. Routing follows ComfyUI:
a prompt's events go to the client that submitted it; without a client id, progress, previews and
interruptions go to everyone and the rest to no one. The final `executing {node: null}` is sent after the
history entry is committed, for every prompt that ends (succeeded, failed, interrupted or cancelled).
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from PIL import Image, ImageOps

from graph.cache import Cache
from graph.executor import Executor
from graph.registry import NodeRegistry
from graph.validation import validate_prompt
from nodes.environment import Environment
from server.store import QueueItem, Store, history_entry
from server.websocket import JPEG, Hub, Preview, text_message

log = logging.getLogger(__name__)

OWNER_ONLY = frozenset({"executing", "executed", "execution_start", "execution_cached", "execution_success",
                        "execution_error"})
PREVIEW_MAX_SIZE = 512

FinishedCallback = Callable[[str, dict[str, Any], dict[str, Any]], None]


def encode_preview(image: Image.Image, max_size: int = PREVIEW_MAX_SIZE) -> bytes:
    """JPEG (quality 95) no larger than max_size on its long side."""
    image = ImageOps.contain(image, (max_size, max_size)) if max(image.size) > max_size else image
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _now_ms() -> int:
    return int(time.time() * 1000)


def route_event(hub: Hub, message: str | Preview, event: str, client_id: str | None) -> None:
    """To the submitting client; without one, everyone gets what is not OWNER_ONLY."""
    if client_id:
        hub.publish_threadsafe(message, client_id)
    elif event not in OWNER_ONLY:
        hub.publish_threadsafe(message, None)


class QueueStatus:
    """What every worker pool (threads here, Ray actors in ray_workers) answers about the queue and does when
    a prompt ends; a pool has `work` (an Event its dispatcher waits on), `store`, `hub` and `on_finished`."""

    work: threading.Event
    store: Store
    hub: Hub
    on_finished: FinishedCallback

    def wake(self) -> None:
        self.work.set()

    def status(self) -> dict[str, Any]:
        return {"status": {"exec_info": {"queue_remaining": self.store.queue_remaining()}}}

    def publish_status(self) -> None:
        self.hub.publish_threadsafe(text_message("status", self.status()), None)

    def announce_end(self, item: QueueItem, entry: dict[str, Any]) -> None:
        """After the history entry is committed: `executing null`, the queue status, waiters/webhooks."""
        client_id = item.extra_data.get("client_id")
        if client_id:
            self.hub.publish_threadsafe(text_message("executing", {"node": None, "display_node": None,
                                                                   "prompt_id": item.prompt_id}), client_id)
        self.publish_status()
        try:
            self.on_finished(item.prompt_id, entry, item.extra_data)
        except Exception:
            log.exception("prompt %s: finish callback failed", item.prompt_id)


class WorkerPool(QueueStatus):
    """The workers and what requests ask of them: wake, cancel, interrupt, free."""

    def __init__(self, store: Store, registry: NodeRegistry, env: Environment, hub: Hub,
                 make_cache: Callable[[], Cache], devices: list[dict[str, Any]],
                 on_finished: FinishedCallback) -> None:
        self.store, self.registry, self.env, self.hub = store, registry, env, hub
        self.on_finished = on_finished
        self.work = threading.Event()
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.cancelled: set[str] = set()
        self.workers = [Worker(self, device, Executor(env=env, cache=make_cache(), previews=True))
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

    def running_node(self, client_id: str) -> tuple[str, str | None] | None:
        """(prompt_id, node now executing) of a running prompt submitted by this client."""
        for worker in self.workers:
            item = worker.current
            if item is not None and item.extra_data.get("client_id") == client_id:
                return item.prompt_id, worker.current_node
        return None

    def interrupt(self, prompt_id: str | None) -> bool:
        """Interrupt this running prompt (every running prompt when None)."""
        return any([w.executor.interrupt(prompt_id) for w in self.workers])

    def cancel(self, prompt_id: str) -> str | None:
        """Cancel a pending ('pending') or running ('running') prompt; None if it is neither."""
        item = self.store.cancel_pending(prompt_id, cancelled_entry)
        if item is not None:
            entry = cancelled_entry(item)
            self.announce_end(item, entry)
            return "pending"
        with self.lock:
            running = any(w.current is not None and w.current.prompt_id == prompt_id for w in self.workers)
            if running:
                self.cancelled.add(prompt_id)
        if not running:
            return None
        self.interrupt(prompt_id)
        return "running"

    def request_free(self, unload_models: bool, free_memory: bool) -> None:
        for worker in self.workers:
            worker.free_request(unload_models, free_memory)
        self.wake()


def cancelled_entry(item: QueueItem) -> dict[str, Any]:
    message = {"prompt_id": item.prompt_id, "node_id": None, "node_type": None, "executed": [],
               "timestamp": _now_ms(), "reason": "cancelled before it started"}
    return history_entry(item, {}, "error", False, [["execution_interrupted", message]])


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
                entry = history_entry(item, {}, "error", False, [["execution_error", {
                    "prompt_id": item.prompt_id, "node_id": None, "node_type": None, "executed": [],
                    "exception_message": str(exc), "exception_type": type(exc).__name__, "traceback": [],
                    "current_inputs": {}, "current_outputs": [], "timestamp": _now_ms()}]])
            try:
                pool.store.finish(item.prompt_id, entry)
            except Exception:
                log.exception("prompt %s: the history entry could not be written", item.prompt_id)
            with pool.lock:
                self.current, self.current_node = None, None
                pool.cancelled.discard(item.prompt_id)
            pool.announce_end(item, entry)

    def _execute(self, item: QueueItem) -> dict[str, Any]:
        pool = self.pool
        client_id = item.extra_data.get("client_id") or None
        validation = validate_prompt(item.prompt, pool.registry, pool.env, targets=item.outputs or None)
        if not validation.ok:
            error = validation.error or {}
            message = {"prompt_id": item.prompt_id, "node_id": None, "node_type": None, "executed": [],
                       "exception_message": f"{error.get('message')}: {error.get('details')}",
                       "exception_type": "ValidationError", "traceback": [], "current_inputs": {},
                       "current_outputs": [], "timestamp": _now_ms()}
            self._send("execution_error", message, client_id)
            return history_entry(item, {}, "error", False, [["execution_error", message]])

        def events(event: str, data: dict[str, Any]) -> None:
            if event == "execution_start":
                with pool.lock:
                    if item.prompt_id in pool.cancelled:
                        self.executor.interrupt(item.prompt_id)
            elif event == "executing":
                self.current_node = data.get("node")
            if event == "preview":
                image = data.get("image")
                if isinstance(image, Image.Image):
                    meta = {"node_id": data.get("node"), "prompt_id": item.prompt_id,
                            "display_node_id": data.get("node"), "parent_node_id": None,
                            "real_node_id": data.get("node")}
                    self._send_raw(Preview(encode_preview(image), JPEG, meta), "preview", client_id)
                return
            self._send(event, data, client_id)

        result = self.executor.execute(validation.prompt, item.prompt_id, events, item.extra_data)
        success = result.status == "success"
        return history_entry(item, result.outputs, "success" if success else "error", success, result.messages)

    def _send(self, event: str, data: dict[str, Any], client_id: str | None) -> None:
        self._send_raw(text_message(event, data), event, client_id)

    def _send_raw(self, message: str | Preview, event: str, client_id: str | None) -> None:
        route_event(self.pool.hub, message, event, client_id)
