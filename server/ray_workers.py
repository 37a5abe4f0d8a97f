"""Prompts on a Ray cluster: one actor per GPU (per CPU slot where there is none), the queue on the server.

`latentloom serve --workers ray` (a local Ray, or the cluster RAY_ADDRESS names) or `--workers ray://HOST:PORT`.
The server keeps the API, the WebSocket and the durable queue; this pool takes the place of the thread
`WorkerPool` (same methods). One dispatcher thread keeps the set of workers matched to the cluster's
resources (workers on nodes that join are started; dead ones are dropped and, while the resources are
there, replaced), and hands queued prompts to idle workers as `server.scheduling.Scheduler` decides. Each
running prompt has one thread here that long-polls its worker's events and relays them to the hub exactly
as the thread workers do, writes the worker's output files into the data directory (`OutputLanding`), and
commits the history entry.

Faults: a worker that dies while running a prompt is dropped; the prompt goes back to the queue (it keeps
its place) and runs again on another worker, once; if that worker dies too, the prompt is recorded as
failed with the reason. A prompt is in SQLite from acceptance to its history entry, as with threads.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError, RayError

from nodes.environment import Environment
from server.cluster_store import ClusterStore
from server.prompt_run import (
    FinishedCallback,
    PromptPool,
    execution_error,
    interrupt_if_asked,
    now_ms,
    publish_preview,
)
from server.ray_actor import PromptWorker, engine_options, new_worker_id
from server.ray_outputs import OutputLanding
from server.scheduling import Job, Scheduler, WorkerView, prompt_checkpoints, worker_target
from server.store import QueueItem, history_entry
from server.websocket import Hub

log = logging.getLogger(__name__)

NAMESPACE = "latentloom"
ACTOR_PREFIX = "latentloom-worker-"
RETRIES = 1  # runs of a prompt after the first, when its worker died under it
POLL_S = 0.5
START_TIMEOUT_S = 30.0  # a worker not placed by then (no resources any more) is given up
WORKER_LOST = (RayActorError, NodeDiedError, ObjectLostError)


class ClusterUnreachable(ConnectionError):
    """Ray could not be started or joined."""


@dataclass
class RemoteWorker:
    """The server's view of one actor."""

    worker_id: str
    actor: Any
    state: str = "starting"  # starting, idle, running, dead
    probe: Any = None  # an outstanding stats() call: first the start, later the health check
    item: QueueItem | None = None
    current_node: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    expected: set[str] = field(default_factory=set)  # checkpoints given to it since its last stats
    created: float = field(default_factory=time.monotonic)

    def view(self) -> WorkerView:
        loaded = frozenset(self.stats.get("loaded_checkpoints", ())) | self.expected
        return WorkerView(self.worker_id, loaded, self.state != "idle", int(self.stats.get("memory_free") or 0))


class RayWorkerPool(PromptPool):
    """The thread pool's interface (start, stop, wake, cancel, interrupt, free, status) over Ray actors."""

    def __init__(self, store: ClusterStore, env: Environment, hub: Hub, on_finished: FinishedCallback, *,
                 address: str | None = None, cache: str = "workflow", cache_bytes: int | None = None,
                 max_workers: int | None = None, cpus_per_worker: int = 1, scratch_root: str | None = None,
                 scheduler: Scheduler | None = None, reconcile_s: float = 1.0) -> None:
        self.store, self.env, self.hub, self.on_finished = store, env, hub, on_finished
        self.address = address
        self.worker_args = {"data_dir": str(env.data_dir), "cache": cache, "cache_bytes": cache_bytes,
                            "extra_model_dirs": {k: [str(p) for p in v] for k, v in env.extra_model_dirs.items()},
                            "scratch_root": scratch_root,
                            "image_limits": (env.max_image_pixels, env.max_image_frames),
                            "engine": engine_options(env)}
        self.max_workers, self.cpus_per_worker = max_workers, cpus_per_worker
        self.scheduler = scheduler or Scheduler()
        self.reconcile_s = reconcile_s
        self.landing = OutputLanding(env)
        self.lock = threading.Lock()
        self.work = threading.Event()
        self.stopping = threading.Event()
        self.workers: dict[str, RemoteWorker] = {}
        self.cancelled: set[str] = set()
        self.attempts: dict[str, list[dict[str, Any]]] = {}  # prompt id -> deaths of workers running it
        self.checkpoints: dict[str, frozenset[str]] = {}
        self.runners: set[threading.Thread] = set()
        self.owns_ray = False
        self.failed_starts = 0
        self.next_start = 0.0
        self.dispatcher = threading.Thread(target=self._loop, name="ray-dispatcher", daemon=True)

    # the thread pool's interface -------------------------------------------------------------------
    def start(self) -> None:
        """Connect (in the calling thread, the main one: Ray's signal handlers go in before the server's own,
        which replace them, so SIGTERM still stops the server gracefully), then dispatch."""
        self._connect()
        self.dispatcher.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        self.work.set()
        self.interrupt(None)
        self.dispatcher.join(timeout)
        for runner in list(self.runners):
            runner.join(timeout)
        with self.lock:
            workers = list(self.workers.values())
        if ray.is_initialized():
            try:  # scratch folders removed, all workers at once
                ray.wait([w.actor.shutdown.remote() for w in workers], num_returns=len(workers), timeout=5)
            except Exception as exc:
                log.debug("workers' shutdown: %s", exc)
            for worker in workers:
                self._kill(worker)
            if self.owns_ray:
                ray.shutdown()

    def running(self) -> list[tuple[QueueItem, str | None]]:
        return [(w.item, w.current_node) for w in self.workers.values() if w.item is not None]

    def forget(self, prompt_id: str) -> None:
        self.attempts.pop(prompt_id, None)

    def interrupt(self, prompt_id: str | None) -> bool:
        """Interrupt this running prompt (every running prompt when None) on the worker running it."""
        with self.lock:
            targets = [w for w in self.workers.values() if w.item is not None and w.state == "running"
                       and (prompt_id is None or w.item.prompt_id == prompt_id)]
        for worker in targets:
            worker.actor.interrupt.remote(prompt_id)
        return bool(targets)

    def request_free(self, unload_models: bool, free_memory: bool) -> None:
        with self.lock:
            workers = [w for w in self.workers.values() if w.state in ("idle", "running")]
        for worker in workers:
            worker.actor.free.remote(unload_models, free_memory)

    def worker_stats(self) -> list[dict[str, Any]]:
        """Each worker as /system_stats shows it: where it runs, what it holds, what it runs."""
        with self.lock:
            workers = list(self.workers.values())
        return [{"id": w.worker_id, "state": w.state, "host": w.stats.get("host"), "device": w.stats.get("device"),
                 "device_type": w.stats.get("device_type"), "memory_total": w.stats.get("memory_total"),
                 "memory_free": w.stats.get("memory_free"),
                 "loaded_checkpoints": w.stats.get("loaded_checkpoints", []),
                 "checkpoint_loads": w.stats.get("checkpoint_loads", {}),
                 "running_prompt": w.item.prompt_id if w.item else None, "current_node": w.current_node,
                 "prompts_done": w.stats.get("prompts_done", 0)} for w in workers]

    # the dispatcher ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        next_reconcile = 0.0
        while not self.stopping.is_set():
            self.work.clear()
            try:
                if time.monotonic() >= next_reconcile:
                    self._reconcile()
                    next_reconcile = time.monotonic() + self.reconcile_s
                self._dispatch()
            except Exception:
                log.exception("the Ray dispatcher failed a round; it goes on")
            self.work.wait(self.reconcile_s)

    def _connect(self) -> None:
        if ray.is_initialized():
            return
        try:
            ray.init(address=self.address, namespace=NAMESPACE, log_to_driver=True)
        except Exception as exc:
            raise ClusterUnreachable(f"cannot connect to Ray ({self.address or 'local'}): {exc}") from exc
        self.owns_ray = True
        log.info("connected to Ray: %s", ray.cluster_resources())

    def _reconcile(self) -> None:
        """Match the workers to the cluster: probe them, drop the dead, start what the resources allow."""
        self._probe()
        target, options = worker_target(ray.cluster_resources(), self.cpus_per_worker, self.max_workers)
        now = time.monotonic()
        with self.lock:
            alive = [w for w in self.workers.values() if w.state != "dead"]
            stuck = [w for w in alive if w.state == "starting" and now - w.created > START_TIMEOUT_S]
        for worker in stuck[:max(0, len(alive) - target)]:
            log.warning("worker %s was not placed in %.0f s; given up", worker.worker_id, START_TIMEOUT_S)
            self._drop(worker, "not placed")
            alive.remove(worker)
        if len(alive) < target and now >= self.next_start:
            for _ in range(target - len(alive)):
                self._start_worker(options)

    def _start_worker(self, options: dict[str, Any]) -> None:
        worker_id = new_worker_id()
        threads = None if options.get("num_gpus") else int(options.get("num_cpus", 1))
        actor = ray.remote(PromptWorker).options(
            name=ACTOR_PREFIX + worker_id, namespace=NAMESPACE, max_concurrency=4, max_restarts=0, **options,
        ).remote(worker_id, threads=threads, **self.worker_args)
        worker = RemoteWorker(worker_id, actor, probe=actor.stats.remote())
        with self.lock:
            self.workers[worker_id] = worker
        log.info("starting worker %s (%s)", worker_id, options)

    def _probe(self) -> None:
        """Collect finished stats() calls: a started worker becomes idle, a failed one is dropped."""
        with self.lock:
            probes = {w.probe: w for w in self.workers.values() if w.probe is not None and w.state != "dead"}
        if probes:
            done, _ = ray.wait(list(probes), num_returns=len(probes), timeout=0)
            for ref in done:
                worker = probes[ref]
                worker.probe = None
                try:
                    stats = ray.get(ref)
                except RayError as exc:
                    if worker.state == "starting":
                        self.failed_starts += 1
                        self.next_start = time.monotonic() + min(60.0, 2.0 ** self.failed_starts)
                    self._drop(worker, f"{type(exc).__name__}: {exc}")
                    continue
                with self.lock:
                    worker.stats = stats
                    if worker.state == "starting":
                        worker.state = "idle"
                        self.failed_starts = 0
                        log.info("worker %s ready on %s (%s)", worker.worker_id, stats.get("host"),
                                 stats.get("device"))
                        self.work.set()
        with self.lock:
            for worker in self.workers.values():
                if worker.state == "idle" and worker.probe is None:
                    worker.probe = worker.actor.stats.remote()

    def _dispatch(self) -> None:
        with self.lock:
            views = [w.view() for w in self.workers.values() if w.state in ("idle", "running")]
        if self.stopping.is_set() or all(v.busy for v in views):
            return
        jobs = self._pending_jobs()
        for job, worker_id in self.scheduler.assign(jobs, views):
            item = self.store.claim(job.prompt_id)
            if item is None:  # cancelled or deleted meanwhile
                continue
            with self.lock:
                worker = self.workers.get(worker_id)
                if worker is None or worker.state != "idle":
                    worker = None
                else:
                    worker.state, worker.item, worker.current_node = "running", item, None
                    worker.expected |= job.checkpoints
            if worker is None:
                self.store.requeue(item.prompt_id)
                continue
            runner = threading.Thread(target=self._run, args=(worker, item), name=f"ray-run-{worker_id}",
                                      daemon=True)
            self.runners.add(runner)
            runner.start()
            self.publish_status()

    def _pending_jobs(self) -> list[Job]:
        ids = self.store.pending_ids(self.scheduler.window)
        unknown = [pid for pid in ids if pid not in self.checkpoints]
        known = {pid: self.checkpoints[pid] for pid in ids if pid in self.checkpoints}
        if unknown:
            known.update({pid: prompt_checkpoints(p) for pid, p in self.store.prompts(unknown).items()})
        self.checkpoints = known
        return [Job(pid, known[pid]) for pid in ids if pid in known]

    # one prompt on one worker -------------------------------------------------------------------------
    def _run(self, worker: RemoteWorker, item: QueueItem) -> None:
        try:
            try:
                summary = self._follow(worker, item)
            except WORKER_LOST as exc:
                self._drop(worker, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                self._lost(worker, item, exc)
                return
            except Exception as exc:
                log.exception("prompt %s on worker %s failed outside any node", item.prompt_id, worker.worker_id)
                summary = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
            with self.lock:
                worker.stats = summary.get("stats") or worker.stats
                worker.expected = set()
            self._finish(worker, item, self._entry(worker, item, summary))
        finally:
            self.runners.discard(threading.current_thread())

    def _follow(self, worker: RemoteWorker, item: QueueItem) -> dict[str, Any]:
        """Start the prompt and relay its events until its summary comes."""
        client_id = item.extra_data.get("client_id") or None
        run = worker.actor.run_prompt.remote(item.prompt_id, item.prompt, item.extra_data, item.outputs)
        ended = False
        while True:
            batch = ray.get(worker.actor.take_events.remote(POLL_S))
            for prompt_id, message in batch:
                if prompt_id != item.prompt_id:
                    log.warning("worker %s sent an event of prompt %s while running %s", worker.worker_id,
                                prompt_id, item.prompt_id)
                elif message[0] == "result":
                    return message[1]
                else:
                    try:
                        self._relay(worker, item, client_id, message)
                    except Exception:  # one event lost, not the prompt: the worker goes on with it
                        log.exception("prompt %s: an event of worker %s could not be relayed", item.prompt_id,
                                      worker.worker_id)
            if ended:  # the call returned and its outbox is drained: there will be no summary
                ray.get(run)  # raises what ended it
                return {"status": "failed", "reason": "the worker ended the prompt without a result"}
            ended = not batch and bool(ray.wait([run], timeout=0)[0])

    def _relay(self, worker: RemoteWorker, item: QueueItem, client_id: str | None,
               message: tuple[Any, ...]) -> None:
        if message[0] == "preview":
            _, node, jpeg = message
            publish_preview(self.hub, jpeg, item.prompt_id, node, client_id)
            return
        _, event, data, files = message
        if event == "execution_start":
            interrupt_if_asked(self.lock, self.cancelled, item.prompt_id, worker.actor.interrupt.remote)
        elif event == "executing":
            worker.current_node = data.get("node")
        elif event == "executed":
            self.landing.land(worker.worker_id, files)
            data = dict(data, output=self.landing.rename_ui(worker.worker_id, data.get("output") or {}))
        self.send_event(event, data, client_id)

    def _entry(self, worker: RemoteWorker, item: QueueItem, summary: dict[str, Any]) -> dict[str, Any]:
        retries = [["execution_retried", death] for death in self.attempts.get(item.prompt_id, [])]
        if summary.get("status") == "failed":
            return history_entry(item, {}, "error", False, [*retries, ["execution_error", execution_error(
                item.prompt_id, summary.get("reason", "the worker failed"), "WorkerError")]])
        outputs = self.landing.rename_outputs(worker.worker_id, summary.get("outputs") or {})
        success = summary.get("status") == "success"
        return history_entry(item, outputs, "success" if success else "error", success,
                             [*retries, *summary.get("messages", [])])

    def _lost(self, worker: RemoteWorker, item: QueueItem, exc: Exception) -> None:
        """The worker died under this prompt: back to the queue once, else recorded as failed."""
        death = {"prompt_id": item.prompt_id, "worker_id": worker.worker_id, "host": worker.stats.get("host"),
                 "reason": f"worker {worker.worker_id} died while running this prompt ({type(exc).__name__})",
                 "timestamp": now_ms()}
        with self.lock:
            deaths = self.attempts.setdefault(item.prompt_id, [])
            deaths.append(death)
            cancelled = item.prompt_id in self.cancelled
        if len(deaths) <= RETRIES and not cancelled and not self.stopping.is_set():
            log.warning("prompt %s: %s; it runs again on another worker", item.prompt_id, death["reason"])
            with self.lock:
                worker.item = None
            self.store.requeue(item.prompt_id)
            self.wake()
            return
        reason = "; ".join(d["reason"] for d in deaths) + (" (cancelled)" if cancelled else
                                                            f"; given up after {len(deaths)} runs")
        entry = history_entry(item, {}, "error", False,
                              [["execution_error", execution_error(item.prompt_id, reason, "WorkerDied")]])
        self._finish(worker, item, entry)

    def _finish(self, worker: RemoteWorker, item: QueueItem, entry: dict[str, Any]) -> None:
        def release() -> None:
            worker.item, worker.current_node = None, None
            if worker.state == "running":
                worker.state = "idle"

        self.finish(item, entry, release)
        self.wake()

    def _drop(self, worker: RemoteWorker, reason: str) -> None:
        log.warning("worker %s is gone: %s", worker.worker_id, reason)
        with self.lock:
            worker.state = "dead"
            self.workers.pop(worker.worker_id, None)
        self.landing.forget_worker(worker.worker_id)
        self._kill(worker)
        self.wake()

    def _kill(self, worker: RemoteWorker) -> None:
        try:
            ray.kill(worker.actor, no_restart=True)
        except Exception as exc:  # already gone
            log.debug("worker %s: %s", worker.worker_id, exc)
