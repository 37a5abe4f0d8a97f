"""The executor: runs a validated workflow's output nodes and their ancestors, reusing cached results.

Scheduling: nodes whose inputs are ready run closest-to-an-output first, so that e.g. a decode and its
preview finish as early as possible. Lazy inputs are evaluated only when the node asks for them.
List semantics: every value travels as a list; a node is called once per element (shorter lists repeat
their last element) unless it declares `input_is_list`, and outputs declared `is_list` are concatenated.

Events go to a callback `events(event_type, data)` with ComfyUI's event names and payloads. A prompt is
interrupted by id, at the next node or the next progress tick of a long node.

A node that runs out of memory fails its prompt alone, with a message that names the node and says how to
make it fit; the executor then drops what the failed node held and releases memory (see
`_release_after_out_of_memory`) so that the next prompt starts from a clean device.
"""

from __future__ import annotations

import gc
import heapq
import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from graph.cache import Cache, CachedResult, WorkflowCache, node_cache_key
from graph.memory_estimate import is_out_of_memory, out_of_memory_message
from graph.node import Node, NodeOutput
from graph.validation import ValidatedPrompt

log = logging.getLogger(__name__)

EventSink = Callable[[str, dict[str, Any]], None]


class Interrupted(Exception):
    """Raised inside a node (at a progress tick) or between nodes when its prompt was interrupted."""


class NodeExecutionError(Exception):
    """A node broke its own declaration (wrong number of outputs, and the like)."""


def _now_ms() -> int:
    return int(time.time() * 1000)


class ExecutionContext:
    """What a node that declares the hidden input `context` gets: progress reporting, interrupt checks,
    the environment (folders, model manager) and the prompt's extra data."""

    def __init__(self, prompt_id: str, node_id: str, env: Any, extra_data: dict[str, Any],
                 events: EventSink, interrupt_flag: threading.Event, previews: bool = False) -> None:
        self.prompt_id = prompt_id
        self.previews = previews  # whether anyone shows preview images (so nodes can skip making them)
        self.node_id = node_id
        self.env = env
        self.extra_data = extra_data
        self._events = events
        self._flag = interrupt_flag

    def check_interrupted(self) -> None:
        if self._flag.is_set():
            raise Interrupted(self.prompt_id)

    def progress(self, value: int, total: int, preview: Any = None) -> None:
        """Report progress (e.g. a sampler step), optionally with a preview image; checks interrupt."""
        self.check_interrupted()
        self._events("progress", {"value": value, "max": total, "prompt_id": self.prompt_id,
                                  "node": self.node_id})
        if preview is not None:
            self._events("preview", {"prompt_id": self.prompt_id, "node": self.node_id, "image": preview})

    def progress_text(self, text: str) -> None:
        """Text about this node's run for the UI, which ComfyUI's front end shows on the node (GetImageSize's
        size); the server sends it to the prompt's client as a binary TEXT frame."""
        self._events("progress_text", {"prompt_id": self.prompt_id, "node": self.node_id, "text": text})


@dataclass
class ExecutionResult:
    prompt_id: str
    status: str  # "success", "error" or "interrupted"
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)  # output node id -> ui dict
    messages: list[list[Any]] = field(default_factory=list)  # [event, data] for the history entry
    error: dict[str, Any] | None = None
    executed: list[str] = field(default_factory=list)  # ids of nodes that ran (not cached)
    cached: list[str] = field(default_factory=list)


def _format_input(value: Any) -> Any:
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    text = str(value)
    return text if len(text) <= 200 else text[:197] + "..."


def _has_own(cls: type[Node], name: str) -> bool:
    return getattr(cls, name) is not getattr(Node, name)


class Executor:
    """Runs prompts one at a time; `interrupt` may be called from any thread."""

    def __init__(self, env: Any = None, cache: Cache | None = None, previews: bool = False,
                 release_memory: Callable[[], Any] | None = None) -> None:
        """`release_memory` is called after a node ran out of memory; without it the environment's own
        `unload_models` is, when it has one (what POST /free {"unload_models": true} does)."""
        self.env = env
        self.previews = previews
        self.cache = cache if cache is not None else WorkflowCache()
        self.release_memory = release_memory
        self._running: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def interrupt(self, prompt_id: str | None = None) -> bool:
        """Interrupt the running prompt with this id (any running prompt when None); True if one was."""
        with self._lock:
            flags = list(self._running.values()) if prompt_id is None else \
                [f for pid, f in self._running.items() if pid == prompt_id]
        for flag in flags:
            flag.set()
        return bool(flags)

    def cache_keys(self, prompt: ValidatedPrompt) -> dict[str, str]:
        """Every node's cache key (computing fingerprints once)."""
        keys: dict[str, str] = {}
        for node_id in nx.topological_sort(prompt.graph):
            call, cls = prompt.nodes[node_id], prompt.classes[node_id]
            fingerprint = None
            if _has_own(cls, "fingerprint"):
                try:
                    fingerprint = cls.fingerprint(dict(call.literals), self.env)
                except Exception as exc:
                    log.warning("node %s (%s): fingerprint failed (%s); it will re-run", node_id,
                                cls.node_type, exc)
                    fingerprint = float("nan")
            sources = {name: keys[src] for name, (src, _) in call.links.items()}
            keys[node_id] = node_cache_key(call, cls, fingerprint, sources)
        return keys

    def execute(self, prompt: ValidatedPrompt, prompt_id: str, events: EventSink | None = None,
                extra_data: dict[str, Any] | None = None) -> ExecutionResult:
        flag = threading.Event()
        with self._lock:
            self._running[prompt_id] = flag
        try:
            return _Run(self, prompt, prompt_id, events or (lambda e, d: None), extra_data or {}, flag).run()
        finally:
            with self._lock:
                self._running.pop(prompt_id, None)


class _Run:
    """The state of one prompt's execution."""

    def __init__(self, executor: Executor, prompt: ValidatedPrompt, prompt_id: str, events: EventSink,
                 extra_data: dict[str, Any], flag: threading.Event) -> None:
        self.ex = executor
        self.prompt = prompt
        self.prompt_id = prompt_id
        self.events = events
        self.extra_data = extra_data
        self.flag = flag
        self.result = ExecutionResult(prompt_id, "success")
        self.values: dict[str, CachedResult] = {}
        self.by_key: dict[str, CachedResult] = {}  # results of this run, for identical sub-graphs
        self.to_run: set[str] = set()
        self.blockers: dict[str, set[str]] = {}
        self.waiting: dict[str, set[str]] = {}  # source -> nodes blocked on it
        self.ready: list[tuple[int, int, str]] = []
        self.distance: dict[str, int] = {}
        self.order: dict[str, int] = {}

    def emit(self, event: str, data: dict[str, Any], record: bool = False) -> None:
        if record:
            self.result.messages.append([event, data])
        try:
            self.events(event, data)
        except Exception:  # a broken listener must not break the run
            log.exception("event listener failed on %s", event)

    def run(self) -> ExecutionResult:
        prompt, cache = self.prompt, self.ex.cache
        self.emit("execution_start", {"prompt_id": self.prompt_id, "timestamp": _now_ms()}, record=True)
        current: str | None = None
        try:
            keys = self.ex.cache_keys(prompt)
            self.keys = keys
            cache.start_prompt(set(keys.values()))
            topo = list(keys)  # insertion order of cache_keys is topological
            self.order = {n: i for i, n in enumerate(topo)}
            self._distances(topo)
            for node_id in topo:
                hit = cache.get(keys[node_id])
                if hit is not None:
                    self.values[node_id] = hit
            self.result.cached = [n for n in topo if n in self.values]
            self.emit("execution_cached", {"nodes": self.result.cached, "prompt_id": self.prompt_id,
                                           "timestamp": _now_ms()}, record=True)
            for node_id in prompt.outputs:
                hit = self.values.get(node_id)
                if hit is not None and hit.ui is not None:
                    self._report_ui(node_id, hit.ui)
            for node_id in prompt.outputs:
                self._schedule(node_id)
            while self.ready:
                _, _, current = heapq.heappop(self.ready)
                if current in self.values or self.blockers.get(current):
                    continue  # a stale entry: already ran, or waits on lazily requested inputs
                if self.flag.is_set():
                    raise Interrupted(self.prompt_id)
                self._run_node(current)
                current = None
        except Interrupted:
            self.result.status = "interrupted"
            node = current
            self.emit("execution_interrupted", {
                "prompt_id": self.prompt_id, "node_id": node,
                "node_type": prompt.classes[node].node_type if node else None,
                "executed": list(self.result.executed), "timestamp": _now_ms()}, record=True)
            return self.result
        except Exception as exc:
            self.result.status = "error"
            self.result.error = self._error_data(current, exc)
            out_of_memory = current is not None and is_out_of_memory(exc)
            if out_of_memory:
                self.result.error["exception_message"] = out_of_memory_message(prompt.classes[current], current, exc)
                log.warning("prompt %s: %s", self.prompt_id, self.result.error["exception_message"])
                traceback.clear_frames(exc.__traceback__)  # the failed node's locals hold what filled memory
            del exc
            self.emit("execution_error", self.result.error, record=True)
            if out_of_memory:
                self._release_after_out_of_memory()
            return self.result
        self.emit("execution_success", {"prompt_id": self.prompt_id, "timestamp": _now_ms()}, record=True)
        return self.result

    def _release_after_out_of_memory(self) -> None:
        """Free what the failed node left behind (reference cycles through its frames are collected here, not
        whenever the collector next runs), then let the environment unload models from the device. Outputs
        of the nodes that succeeded stay cached: a retry with a smaller setting resumes from them."""
        gc.collect()
        release = self.ex.release_memory or getattr(self.ex.env, "unload_models", None)
        if callable(release):
            try:
                release()
            except Exception:
                log.exception("releasing memory after an out-of-memory error failed")

    def _distances(self, topo: list[str]) -> None:
        """Hops from each node to the nearest output it feeds (outputs are 0)."""
        graph, outputs = self.prompt.graph, set(self.prompt.outputs)
        for node_id in reversed(topo):
            if node_id in outputs:
                self.distance[node_id] = 0
            else:
                self.distance[node_id] = min((self.distance[s] + 1 for s in graph.successors(node_id)),
                                             default=1 << 30)

    def _lazy(self, node_id: str, name: str) -> bool:
        spec = self.prompt.classes[node_id].input(name)
        return spec is not None and spec.lazy

    def _schedule(self, node_id: str) -> None:
        """Make `node_id` run, with whatever it needs (non-lazy) that is not available yet."""
        stack = [node_id]
        while stack:
            n = stack.pop()
            if n in self.values or n in self.to_run:
                continue
            self.to_run.add(n)
            call = self.prompt.nodes[n]
            sources = {src for name, (src, _) in call.links.items() if not self._lazy(n, name)}
            self._block(n, sources)
            stack.extend(sources)

    def _block(self, node_id: str, sources: set[str]) -> None:
        pending = {s for s in sources if s not in self.values}
        self.blockers.setdefault(node_id, set()).update(pending)
        for src in pending:
            self.waiting.setdefault(src, set()).add(node_id)
        if not self.blockers[node_id]:
            self._push(node_id)

    def _push(self, node_id: str) -> None:
        heapq.heappush(self.ready, (self.distance.get(node_id, 1 << 30), self.order[node_id], node_id))

    def _inputs(self, node_id: str) -> dict[str, list[Any] | None]:
        call = self.prompt.nodes[node_id]
        inputs: dict[str, list[Any] | None] = {name: [v] for name, v in call.literals.items()}
        for name, (src, slot) in call.links.items():
            produced = self.values.get(src)
            inputs[name] = produced.outputs[slot] if produced is not None else None
        return inputs

    def _run_node(self, node_id: str) -> None:
        call, cls = self.prompt.nodes[node_id], self.prompt.classes[node_id]
        shared = self.by_key.get(self.keys[node_id])
        if shared is not None:  # an identical node already ran in this prompt
            self._finish(node_id, shared)
            return
        inputs = self._inputs(node_id)
        lazy_missing = [n for n, v in inputs.items() if v is None]
        node = cls()
        if lazy_missing:
            known = {n: (v[0] if v else None) if v is not None else None for n, v in inputs.items()}
            wanted = [n for n in node.check_lazy_status(known) if n in lazy_missing]
            if wanted:
                sources = {call.links[n][0] for n in wanted}
                for src in sources:
                    self._schedule(src)
                self._block(node_id, sources)
                return
        self.emit("executing", {"node": node_id, "display_node": node_id, "prompt_id": self.prompt_id})
        context = ExecutionContext(self.prompt_id, node_id, self.ex.env, self.extra_data, self.emit, self.flag,
                                   self.ex.previews)
        hidden = {"prompt": self.prompt.api_prompt, "extra_pnginfo": self.extra_data.get("extra_pnginfo"),
                  "unique_id": node_id, "context": context}
        hidden = {name: hidden[name] for name in cls.hidden}
        result = self._call(node, cls, inputs, hidden)
        self.result.executed.append(node_id)
        self.by_key[self.keys[node_id]] = result
        self.ex.cache.put(self.keys[node_id], result)
        self._finish(node_id, result)

    def _finish(self, node_id: str, result: CachedResult) -> None:
        self.values[node_id] = result
        if result.ui is not None:
            self._report_ui(node_id, result.ui)
        self.to_run.discard(node_id)
        for consumer in self.waiting.pop(node_id, ()):
            blockers = self.blockers[consumer]
            blockers.discard(node_id)
            if not blockers:
                self._push(consumer)

    def _call(self, node: Node, cls: type[Node], inputs: dict[str, list[Any] | None],
              hidden: dict[str, Any]) -> CachedResult:
        lists = {n: (v if v is not None else [None]) for n, v in inputs.items()}
        if cls.input_is_list:
            calls = [dict(lists, **hidden)]
        else:
            count = max((len(v) for v in lists.values()), default=1)
            if any(len(v) == 0 for v in lists.values()):
                count = 0
            calls = [{n: v[min(i, len(v) - 1)] for n, v in lists.items()} | hidden for i in range(count)]
        outputs: list[list[Any]] = [[] for _ in cls.outputs]
        ui: dict[str, list[Any]] | None = None
        for kwargs in calls:
            returned = node.execute(**kwargs)
            if isinstance(returned, NodeOutput):
                values, call_ui = returned.values, returned.ui
            else:
                values, call_ui = returned, None
            if values is None:
                values = ()
            if not isinstance(values, tuple | list) or len(values) != len(cls.outputs):
                raise NodeExecutionError(
                    f"{cls.node_type} returned {len(values) if isinstance(values, tuple | list) else values!r}"
                    f" values but declares {len(cls.outputs)} outputs")
            for slot, (spec, value) in enumerate(zip(cls.outputs, values, strict=True)):
                if spec.is_list:
                    outputs[slot].extend(value)
                else:
                    outputs[slot].append(value)
            if call_ui:
                ui = ui or {}
                for key, value in call_ui.items():
                    ui.setdefault(key, []).extend(value if isinstance(value, list) else [value])
        return CachedResult(outputs, ui)

    def _report_ui(self, node_id: str, ui: dict[str, Any]) -> None:
        self.result.outputs[node_id] = ui
        self.emit("executed", {"node": node_id, "display_node": node_id, "output": ui,
                               "prompt_id": self.prompt_id})

    def _error_data(self, node_id: str | None, exc: BaseException) -> dict[str, Any]:
        inputs = self._inputs(node_id) if node_id else {}
        exc_type = type(exc)
        # An environment may name its files for users (the data directory's relative to it): a node that let an OS
        # or library error through (a custom node, a full disk in SaveImage) names no absolute path either.
        public = getattr(self.ex.env, "public_text", None) or str
        return {
            "prompt_id": self.prompt_id,
            "node_id": node_id,
            "node_type": self.prompt.classes[node_id].node_type if node_id else None,
            "executed": list(self.result.executed),
            "exception_message": public(str(exc) or exc_type.__name__),
            "exception_type": f"{exc_type.__module__}.{exc_type.__qualname__}",
            "traceback": [public(line) for line in traceback.format_exception(exc)],
            "current_inputs": {n: [_format_input(x) for x in v] if v is not None else None
                               for n, v in inputs.items()},
            "current_outputs": [n for n in self.values],
            "timestamp": _now_ms(),
        }
