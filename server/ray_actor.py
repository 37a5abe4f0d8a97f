"""What runs inside one Ray worker actor: an Executor with its own node cache and loaded models.

The class is plain Python (the pool wraps it with `ray.remote`), so it can be tested without a cluster.
`run_prompt` runs a prompt in one of the actor's threads and puts what it reports, in order, in an outbox
that the server drains with `take_events` (a long poll, from another of the actor's threads):

    ("event", name, data, files)   a ComfyUI event; for "executed", `files` carries the output files
    ("preview", node_id, jpeg)     a preview image, already JPEG-encoded here (small, and what clients get)
    ("result", summary)            last: status, outputs, history messages, the worker's stats

A long poll rather than a streaming generator: Ray Client (`ray://`) does not carry streaming generators,
and a batch per poll keeps the number of calls low when events come fast.

Files. Models and input images are read from the data directory at the path the server names (the same
machine, or the same folder mounted on every machine); outputs never are written there by a worker. Each
worker writes output/ and temp/ under its own scratch folder and ships every file a node reports (the
`filename`/`subfolder`/`type` entries of its ui) as bytes with that node's "executed" event; the server
writes them into its own data directory under a free name. A shipped scratch file is truncated to zero
bytes, not removed, so that its name stays taken and the next SaveImage counter on this worker stays unique
(a cached output node reports names shipped earlier; those come without bytes and the server maps them).
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import socket
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graph.cache import make_cache
from graph.executor import Executor
from graph.validation import validate_prompt
from nodes import build_registry
from nodes.environment import Environment
from server.prompt_run import encode_preview, interrupt_if_asked, is_preview, validation_error

log = logging.getLogger(__name__)

FILE_TYPES = ("output", "temp")


@dataclass
class WorkerEnvironment(Environment):
    """The server's data directory for models and input; output/ and temp/ under a private scratch folder."""

    scratch_dir: Path | None = None

    @property
    def output_dir(self) -> Path:
        return self._scratch / "output"

    @property
    def temp_dir(self) -> Path:
        return self._scratch / "temp"

    @property
    def _scratch(self) -> Path:
        if self.scratch_dir is None:
            raise RuntimeError("a worker environment needs a scratch folder")
        return Path(self.scratch_dir)

    def ensure_dirs(self) -> None:
        """Only the scratch folders: the data directory belongs to the server (and may not exist here)."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.temp_dir.mkdir(parents=True, exist_ok=True)


# The server's engine flags a worker takes over (--precision and ComfyUI's --force-fp32, --bf16-unet, --fp32-vae,
# --lowvram/--novram/--highvram, --input-directory, --preview-method, --compile, --weight-cache-gb). The device is
# the one Ray gives the actor; output and temp are the worker's scratch folders.
ENGINE_FIELDS = ("precision", "unet_precision", "vae_precision", "vram", "input_dir_override", "preview_method",
                 "compile_models", "weight_cache_bytes")


def engine_options(env: Environment) -> dict[str, Any]:
    """The server environment's engine flags as plain values an actor can be sent (see ENGINE_FIELDS)."""
    options = {name: getattr(env, name) for name in ENGINE_FIELDS}
    if options["input_dir_override"] is not None:
        options["input_dir_override"] = str(options["input_dir_override"])
    return options


def worker_engine(options: dict[str, Any]) -> dict[str, Any]:
    """engine_options' values as a WorkerEnvironment takes them."""
    unknown = set(options) - set(ENGINE_FIELDS)
    if unknown:
        raise ValueError(f"unknown engine options {sorted(unknown)}")
    folder = options.get("input_dir_override")
    return {**options, "input_dir_override": Path(folder) if folder is not None else None}


def file_entries(ui: dict[str, Any]) -> list[dict[str, Any]]:
    """The `{filename, subfolder, type}` dicts of a node's ui whose type is a folder we ship."""
    return [item for value in ui.values() if isinstance(value, list) for item in value
            if isinstance(item, dict) and isinstance(item.get("filename"), str) and item.get("type") in FILE_TYPES]


class PromptWorker:
    """One worker: runs prompts one at a time; `interrupt`, `free` and `stats` may come from other threads."""

    def __init__(self, worker_id: str, data_dir: str, extra_model_dirs: dict[str, list[str]] | None = None,
                 cache: str = "workflow", cache_bytes: int | None = None, scratch_root: str | None = None,
                 threads: int | None = None, image_limits: tuple[int | None, int | None] = (None, None),
                 engine: dict[str, Any] | None = None) -> None:
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.worker_id = worker_id
        root = Path(scratch_root or tempfile.gettempdir())
        root.mkdir(parents=True, exist_ok=True)
        self.scratch = Path(tempfile.mkdtemp(prefix=f"latentloom-{worker_id}-", dir=root))
        extra = {kind: [Path(p) for p in paths] for kind, paths in (extra_model_dirs or {}).items()}
        self.env = WorkerEnvironment(Path(data_dir), extra_model_dirs=extra, scratch_dir=self.scratch,
                                     max_image_pixels=image_limits[0], max_image_frames=image_limits[1],
                                     **worker_engine(engine or {}))
        self.env.ensure_dirs()
        self.registry = build_registry(self.env)
        self.executor = Executor(env=self.env, cache=make_cache(cache, cache_bytes),
                                 previews=self.env.preview_method != "none")
        self.lock = threading.Lock()
        self.running: str | None = None
        self.interrupts: set[str] = set()  # asked for by id; one that came before its prompt started counts
        self.free_flags = (False, False)
        self.prompts_done = 0
        self.loads: dict[str, int] = {}  # checkpoint name -> times this worker loaded it
        self.outbox: queue.Queue = queue.Queue()

    # control, from other threads ------------------------------------------------------------------
    def interrupt(self, prompt_id: str | None) -> bool:
        """Interrupt this prompt (any when None); one not started yet is interrupted as it starts."""
        if prompt_id is not None:
            with self.lock:
                self.interrupts.add(prompt_id)
        return self.executor.interrupt(prompt_id)

    def free(self, unload_models: bool, free_memory: bool) -> None:
        """/free: done now when idle, else once the running prompt ends."""
        with self.lock:
            self.free_flags = (self.free_flags[0] or unload_models, self.free_flags[1] or free_memory)
            idle = self.running is None
        if idle:
            self._apply_free()

    def stats(self) -> dict[str, Any]:
        devices = self.env.device_stats()
        device = devices[0] if devices else {}
        return {"worker_id": self.worker_id, "host": socket.gethostname(), "pid": os.getpid(),
                "device": device.get("name"), "device_type": device.get("type"),
                "memory_total": device.get("vram_total", 0), "memory_free": device.get("vram_free", 0),
                "loaded_checkpoints": self.loaded_checkpoints(), "checkpoint_loads": dict(self.loads),
                "running": self.running, "prompts_done": self.prompts_done}

    def shutdown(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)

    # running --------------------------------------------------------------------------------------
    def run_prompt(self, prompt_id: str, prompt: dict[str, Any], extra_data: dict[str, Any],
                   outputs: list[str]) -> str:
        """Run one prompt; what it reports goes to the outbox that `take_events` drains. Returns its status."""
        with self.lock:
            self.running = prompt_id
            self.interrupts &= {prompt_id}  # the server asks only the worker it gave the prompt to
        before = self.loaded_checkpoints()
        try:
            summary = self._run(prompt_id, prompt, extra_data, outputs)
        except BaseException as exc:  # the engine itself failed: the server records it
            summary = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
            raise
        finally:
            for name in set(self.loaded_checkpoints()) - set(before):
                self.loads[name] = self.loads.get(name, 0) + 1
            with self.lock:
                self.running = None
                self.prompts_done += 1
            self._apply_free()
            self.outbox.put((prompt_id, ("result", dict(summary, stats=self.stats()))))
        return summary["status"]

    def take_events(self, wait_s: float = 0.5, limit: int = 512) -> list[tuple[str, tuple[Any, ...]]]:
        """(prompt_id, message) pairs in order; waits up to wait_s for the first (a long poll)."""
        try:
            batch = [self.outbox.get(timeout=wait_s)]
        except queue.Empty:
            return []
        while len(batch) < limit:
            try:
                batch.append(self.outbox.get_nowait())
            except queue.Empty:
                break
        return batch

    def _run(self, prompt_id: str, prompt: dict[str, Any], extra_data: dict[str, Any],
             outputs: list[str]) -> dict[str, Any]:
        validation = validate_prompt(prompt, self.registry, self.env, targets=outputs or None)
        if not validation.ok:
            message = validation_error(prompt_id, validation.error)
            self.outbox.put((prompt_id, ("event", "execution_error", message, [])))
            return {"status": "error", "outputs": {}, "messages": [["execution_error", message]]}

        def sink(event: str, data: dict[str, Any]) -> None:
            if event == "execution_start":
                interrupt_if_asked(self.lock, self.interrupts, prompt_id, self.executor.interrupt)
            self.outbox.put((prompt_id, self._message(event, data)))

        result = self.executor.execute(validation.prompt, prompt_id, sink, extra_data)
        return {"status": result.status, "outputs": result.outputs, "messages": result.messages}

    def _message(self, event: str, data: dict[str, Any]) -> tuple[Any, ...]:
        if event == "preview":
            image = data.get("image")
            jpeg = encode_preview(image) if is_preview(image) else b""
            return ("preview", data.get("node"), jpeg)
        files = self._ship(data.get("output") or {}) if event == "executed" else []
        return ("event", event, data, files)

    def _ship(self, ui: dict[str, Any]) -> list[dict[str, Any]]:
        """Each reported file with its bytes (None when shipped before); the scratch copy is emptied."""
        shipped = []
        for item in file_entries(ui):
            root = self.env.output_dir if item["type"] == "output" else self.env.temp_dir
            path = root / (item.get("subfolder") or "") / item["filename"]
            data = None
            try:
                if path.stat().st_size > 0:
                    data = path.read_bytes()
                    os.truncate(path, 0)
            except OSError as exc:
                log.warning("worker %s: output %s cannot be read: %s", self.worker_id, path, exc)
            shipped.append({"type": item["type"], "subfolder": item.get("subfolder") or "",
                            "filename": item["filename"], "data": data})
        return shipped

    def _apply_free(self) -> None:
        with self.lock:
            unload, free_memory = self.free_flags
            self.free_flags = (False, False)
        if unload or free_memory:
            self.env.unload_models()
        if free_memory:
            self.executor.cache.clear()

    def loaded_checkpoints(self) -> list[str]:
        """Names (relative to their checkpoints folder) of the checkpoints this worker holds."""
        names = []
        folders = [folder.resolve() for folder in self.env.model_dirs("checkpoints")]
        for key in list(self.env.model_cache):
            if not (isinstance(key, tuple) and len(key) > 1 and key[0] == "checkpoint"):
                continue
            path = Path(key[1]).resolve()
            folder = next((f for f in folders if f in path.parents), None)
            names.append(path.relative_to(folder).as_posix() if folder else path.name)
        return sorted(names)


def new_worker_id() -> str:
    return uuid.uuid4().hex[:8]
