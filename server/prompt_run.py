"""What every worker pool does around a prompt, wherever the prompt runs (a thread of this process, worker.py;
a Ray actor, ray_workers.py and ray_actor.py): the messages it sends, how a cancel reaches a running prompt,
and the end of a prompt (history entry committed, then announced).

Routing follows ComfyUI: a prompt's events go to the client that submitted it; without a client id,
progress, previews and interruptions go to everyone and the rest to no one. The final
`executing {node: null}` is sent after the history entry is committed, for every prompt that ends
(succeeded, failed, interrupted or cancelled).
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable, Container
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from nodes.environment import Environment, UnsafePathError, safe_join
from server.progress_state import ENDS, ProgressStates
from server.store import QueueItem, Store, history_entry
from server.websocket import JPEG, PNG, Hub, Message, Preview, progress_text_frame, text_message

log = logging.getLogger(__name__)

OWNER_ONLY = frozenset({"executing", "executed", "execution_start", "execution_cached", "execution_success",
                        "execution_error"})
PREVIEW_MAX_SIZE = 512
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

FinishedCallback = Callable[[str, dict[str, Any], dict[str, Any]], None]


def now_ms() -> int:
    return int(time.time() * 1000)


def is_preview(value: Any) -> bool:
    """A preview a node reported: a PIL image (a sampler's latent preview), or ComfyUI's `(format, image,
    max_size)` form, "PNG" or "JPEG" at most max_size on its long side (None: full size), which output nodes such
    as SaveImageWebsocket use to send whole images."""
    if isinstance(value, tuple) and len(value) == 3:
        return value[0] in ("PNG", "JPEG") and isinstance(value[1], Image.Image)
    return isinstance(value, Image.Image)


def encode_preview(image: Image.Image | tuple[str, Image.Image, int | None], max_size: int = PREVIEW_MAX_SIZE) -> bytes:
    """JPEG (quality 95) no larger than max_size on its long side; for the `(format, image, max_size)` form (see
    is_preview), that format and size, PNG at compress level 1 as ComfyUI sends it."""
    image_format = "JPEG"
    if isinstance(image, tuple):
        image_format, image, max_size = image
    if max_size is not None and max(image.size) > max_size:
        image = ImageOps.contain(image, (max_size, max_size))
    buffer = io.BytesIO()
    if image_format == "PNG":
        image.save(buffer, format="PNG", compress_level=1)
    else:
        image.convert("RGB").save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def route_event(hub: Hub, message: Message, event: str, client_id: str | None) -> None:
    """To the submitting client; without one, everyone gets what is not OWNER_ONLY."""
    if client_id:
        hub.publish_threadsafe(message, client_id)
    elif event not in OWNER_ONLY:
        hub.publish_threadsafe(message, None)


def publish_preview(hub: Hub, jpeg: bytes, prompt_id: str, node: str | None, client_id: str | None) -> None:
    """A preview frame of a node, with the metadata ComfyUI's clients read; encoded by encode_preview, JPEG or PNG
    (told apart by the PNG signature, so that workers elsewhere need to send only the bytes)."""
    meta = {"node_id": node, "prompt_id": prompt_id, "display_node_id": node, "parent_node_id": None,
            "real_node_id": node}
    image_format = PNG if jpeg.startswith(PNG_SIGNATURE) else JPEG
    route_event(hub, Preview(jpeg, image_format, meta), "preview", client_id)


def execution_error(prompt_id: str, message: str, kind: str) -> dict[str, Any]:
    """The `execution_error` data of a prompt that failed outside any node (validation, the engine, a worker)."""
    return {"prompt_id": prompt_id, "node_id": None, "node_type": None, "executed": [],
            "exception_message": message, "exception_type": kind, "traceback": [], "current_inputs": {},
            "current_outputs": [], "timestamp": now_ms()}


def validation_error(prompt_id: str, error: dict[str, Any] | None) -> dict[str, Any]:
    """`execution_error` for a prompt that failed validation where it was about to run."""
    error = error or {}
    return execution_error(prompt_id, f"{error.get('message')}: {error.get('details')}", "ValidationError")


def cancelled_entry(item: QueueItem) -> dict[str, Any]:
    message = {"prompt_id": item.prompt_id, "node_id": None, "node_type": None, "executed": [],
               "timestamp": now_ms(), "reason": "cancelled before it started"}
    return history_entry(item, {}, "error", False, [["execution_interrupted", message]])


def interrupt_if_asked(lock: threading.Lock, asked: Container[str], prompt_id: str,
                       interrupt: Callable[[str], object]) -> None:
    """On `execution_start`: a cancel or interrupt asked for before the prompt's executor existed is applied
    now (the executor's interrupt flag for a prompt is made as it starts)."""
    with lock:
        hit = prompt_id in asked
    if hit:
        interrupt(prompt_id)


def delete_temp_files(temp_dir: Path, entries: list[dict[str, Any]]) -> int:
    """Remove the temp-folder files that deleted history entries referenced; returns how many. A file that cannot
    be removed is logged and left."""
    removed = 0
    for entry in entries:
        for ui in (entry.get("outputs") or {}).values():
            for items in ui.values() if isinstance(ui, dict) else ():
                for item in items if isinstance(items, list) else ():
                    if not isinstance(item, dict) or item.get("type") != "temp" or "filename" not in item:
                        continue
                    try:
                        path = safe_join(temp_dir, str(item.get("subfolder") or ""), str(item["filename"]))
                        if path.is_file():
                            path.unlink()
                            removed += 1
                    except UnsafePathError:
                        continue
                    except OSError as exc:
                        log.warning("temp file %s of a deleted history entry was not removed: %s", item["filename"],
                                    exc.strerror or exc)
    return removed


class PromptPool:
    """What every worker pool answers and does the same way: queue status, cancel, the running node, the end
    of a prompt. A pool has `work` (an Event its dispatcher waits on), `store`, `hub`, `on_finished`, `lock`
    (guarding `cancelled` and its workers' state) and the methods `running`, `interrupt` and `forget`."""

    work: threading.Event
    store: Store
    env: Environment
    hub: Hub
    on_finished: FinishedCallback
    lock: threading.Lock
    cancelled: set[str]
    # Node states of running prompts, by prompt id (unique across pools, so one registry serves them all).
    progress_states = ProgressStates()

    def running(self) -> list[tuple[QueueItem, str | None]]:
        """(item, node executing now) of each running prompt; called with `lock` held."""
        raise NotImplementedError

    def interrupt(self, prompt_id: str | None) -> bool:
        raise NotImplementedError

    def forget(self, prompt_id: str) -> None:
        """Drop what the pool keeps about a prompt that ended; called with `lock` held."""

    def wake(self) -> None:
        self.work.set()

    def send_event(self, event: str, data: dict[str, Any], client_id: str | None) -> None:
        """An executor event to its client with the `progress_state` it changes (ComfyUI's front end outlines the
        running node and draws its progress from those): after the event, but before the end of a prompt, as
        ComfyUI finishes a node's progress before it announces the prompt's success or error."""
        if event == "progress_text":  # a node's text, shown on it by ComfyUI's front end: a binary TEXT frame
            route_event(self.hub, progress_text_frame(data["node"], data["text"]), event, client_id)
            return
        state = self.progress_states.update(event, data)
        if state is None:
            route_event(self.hub, text_message(event, data), event, client_id)
            return
        pair = [(event, data), ("progress_state", state)]
        for name, body in reversed(pair) if event in ENDS else pair:
            route_event(self.hub, text_message(name, body), name, client_id)

    def status(self) -> dict[str, Any]:
        return {"status": {"exec_info": {"queue_remaining": self.store.queue_remaining()}}}

    def publish_status(self) -> None:
        self.hub.publish_threadsafe(text_message("status", self.status()), None)

    def running_node(self, client_id: str) -> tuple[str, str | None] | None:
        """(prompt_id, node now executing) of a running prompt submitted by this client."""
        with self.lock:
            for item, node in self.running():
                if item.extra_data.get("client_id") == client_id:
                    return item.prompt_id, node
        return None

    def cancel(self, prompt_id: str) -> str | None:
        """Cancel a pending ('pending') or running ('running') prompt; None if it is neither."""
        item = self.store.cancel_pending(prompt_id, cancelled_entry)
        delete_temp_files(self.env.temp_dir, self.store.take_dropped())
        if item is not None:
            with self.lock:
                self.forget(prompt_id)
            self.announce_end(item, cancelled_entry(item))
            return "pending"
        with self.lock:
            running = any(item.prompt_id == prompt_id for item, _ in self.running())
            if running:
                self.cancelled.add(prompt_id)
        if not running:
            return None
        self.interrupt(prompt_id)
        return "running"

    def finish(self, item: QueueItem, entry: dict[str, Any], release: Callable[[], None]) -> None:
        """Commit the history entry, then (under `lock`) `release` the worker that ran it and forget the
        prompt, then announce the end."""
        try:
            self.store.finish(item.prompt_id, entry)
        except Exception:
            log.exception("prompt %s: the history entry could not be written", item.prompt_id)
        delete_temp_files(self.env.temp_dir, self.store.take_dropped())  # entries past --max-history
        with self.lock:
            release()
            self.cancelled.discard(item.prompt_id)
            self.forget(item.prompt_id)
        self.announce_end(item, entry)

    def announce_end(self, item: QueueItem, entry: dict[str, Any]) -> None:
        """After the history entry is committed: `executing null`, the queue status, waiters/webhooks."""
        self.progress_states.forget(item.prompt_id)
        client_id = item.extra_data.get("client_id")
        if client_id:
            self.hub.publish_threadsafe(text_message("executing", {"node": None, "display_node": None,
                                                                   "prompt_id": item.prompt_id}), client_id)
        self.publish_status()
        try:
            self.on_finished(item.prompt_id, entry, item.extra_data)
        except Exception:
            log.exception("prompt %s: finish callback failed", item.prompt_id)
