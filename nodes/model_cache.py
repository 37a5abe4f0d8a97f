"""The environment's loaded models, shared by every worker thread: each file is read once, however many
threads ask for it at the same moment.

A plain dict filled by check-then-set lets two threads that both miss read the same checkpoint twice (twice
the memory, for a while) and hand their prompts two different copies, which then load, patch and evict
independently of each other. Here the first thread to miss puts a future in the cache's place for the key and
loads; the others wait on that future and get the same object (or the same error).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any

log = logging.getLogger(__name__)


class ModelCache(dict):
    """Loaded models by key (kind, path, size, modification time); a dict, plus `load` for load-once."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._loading: dict[Hashable, Future] = {}

    def load(self, key: Hashable, load: Callable[[], Any]) -> Any:
        """The value cached for `key`, made by `load()` when there is none; one call per key at a time."""
        with self._lock:
            if key in self:
                return self[key]
            future = self._loading.get(key)
            mine = future is None
            if mine:
                future = self._loading[key] = Future()
        if not mine:
            log.debug("waiting for another thread's load of %s", key)
            return future.result()
        try:
            value = load()
        except BaseException as exc:
            with self._lock:
                del self._loading[key]
            future.set_exception(exc)
            raise
        with self._lock:
            self[key] = value
            del self._loading[key]
        future.set_result(value)
        return value
