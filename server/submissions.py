"""Accepted prompts are written to the store by one thread, in batches.

A submission's 200 goes out only once its row is on disk, and a disk sync costs milliseconds. The event loop
must not wait for it, and one thread per waiting request (each blocking on the store's lock) costs more in
thread switches than the syncs themselves. So request handlers hand their rows to this writer and await a
future: every row waiting when a commit starts shares that commit's transaction and its single sync.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import defaultdict

from server.store import AddRequest, QueueItem, Store

log = logging.getLogger(__name__)

_Pending = tuple[AddRequest, asyncio.AbstractEventLoop, asyncio.Future]


class SubmissionWriter:
    """A thread that commits queued `AddRequest`s in batches and resolves their futures on their loops."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._requests: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="submission-writer", daemon=True)
        self._thread.start()

    async def add(self, request: AddRequest) -> QueueItem:
        """Commit `request`; returns its queue item or raises its error (DuplicatePromptId, a database error)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._requests.put((request, loop, future))
        await future
        return request.result()

    def close(self) -> None:
        """Commit what is queued, then stop the thread."""
        self._requests.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            first = self._requests.get()
            if first is None:
                return
            batch = [first]
            while True:
                try:
                    more = self._requests.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._requests.put(None)  # finish this batch, then stop
                    break
                batch.append(more)
            self._store.commit([request for request, _, _ in batch])
            by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future]] = defaultdict(list)
            for _, loop, future in batch:
                by_loop[loop].append(future)
            for loop, futures in by_loop.items():
                try:
                    loop.call_soon_threadsafe(_resolve, futures)
                except RuntimeError:  # that loop is closed: nobody is waiting any more
                    log.debug("a submitter's event loop closed before its commit was acknowledged")


def _resolve(futures: list[asyncio.Future]) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)
