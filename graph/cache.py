"""Cache keys and the output caches.

A node's key is a hash of its class, its literal inputs, its fingerprint and, for each link, the key of
the source node and the output index: a Merkle hash over the ancestors, with no node id in it. Two
identical sub-graphs under different ids therefore share results, and editing one literal changes only
the keys downstream of it.

Three caches, chosen per executor:
- `WorkflowCache` (default): keeps what the current workflow uses; entries the new workflow does not
  use are dropped when it starts, so memory follows the workflow being edited.
- `LRUCache`: keeps results across workflows up to a byte budget (tensors counted by their storage,
  each storage once), evicting the least recently used.
- `NoCache`: keeps nothing between runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from graph.node import Node
from graph.workflow import NodeCall


@dataclass
class CachedResult:
    """A node's outputs (one list per output slot, list semantics) and its ui dict."""

    outputs: list[list[Any]]
    ui: dict[str, Any] | None = None
    nbytes: int = 0


def _canonical(value: Any) -> str:
    """A stable text for a literal or fingerprint; NaN (and anything unhashable) never equals itself."""
    if isinstance(value, bytes):
        return "b:" + value.hex()
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True)
    except (TypeError, ValueError):
        return f"<unhashable {uuid.uuid4()}>"
    if isinstance(value, float) and math.isnan(value):
        return f"<nan {uuid.uuid4()}>"
    return text


def node_cache_key(call: NodeCall, cls: type[Node], fingerprint: Any, source_keys: dict[str, str]) -> str:
    """Hash of class, literals, fingerprint and the linked sources' keys (`source_keys` by input name)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(cls.node_type.encode())
    if cls.not_idempotent:
        h.update(b"\0id\0" + call.id.encode())
    for name in sorted(call.literals):
        h.update(b"\0L" + name.encode() + b"=" + _canonical(call.literals[name]).encode())
    for name in sorted(call.links):
        h.update(b"\0K" + name.encode() + b"=" + source_keys[name].encode() + b":" +
                 str(call.links[name][1]).encode())
    if fingerprint is not None:
        h.update(b"\0F" + _canonical(fingerprint).encode())
    return h.hexdigest()


def nbytes_of(value: Any, seen: set[int] | None = None) -> int:
    """Approximate memory held by a value: tensor and array storages (each counted once), containers
    recursively, objects that define `cache_nbytes()`, else sys.getsizeof."""
    seen = set() if seen is None else seen
    if hasattr(value, "untyped_storage"):  # torch.Tensor, without importing torch here
        storage = value.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in seen:
            return 0
        seen.add(ptr)
        return int(storage.nbytes())
    if hasattr(value, "cache_nbytes"):
        if id(value) in seen:
            return 0
        seen.add(id(value))
        return int(value.cache_nbytes())
    if type(value).__module__ == "numpy" and hasattr(value, "nbytes"):
        return int(value.nbytes)
    if isinstance(value, list | tuple | set | frozenset):
        return sys.getsizeof(value) + sum(nbytes_of(v, seen) for v in value)
    if isinstance(value, dict):
        return sys.getsizeof(value) + sum(nbytes_of(k, seen) + nbytes_of(v, seen) for k, v in value.items())
    return sys.getsizeof(value)


class Cache:
    """Interface of the output caches; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def get(self, key: str) -> CachedResult | None:
        raise NotImplementedError

    def put(self, key: str, result: CachedResult) -> None:
        raise NotImplementedError

    def start_prompt(self, keys: set[str]) -> None:
        """Called when a workflow starts, with the keys of all its nodes."""

    def clear(self) -> None:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError


class NoCache(Cache):
    def get(self, key: str) -> CachedResult | None:
        return None

    def put(self, key: str, result: CachedResult) -> None:
        return None

    def clear(self) -> None:
        return None

    def __len__(self) -> int:
        return 0


class WorkflowCache(Cache):
    def __init__(self) -> None:
        super().__init__()
        self._entries: dict[str, CachedResult] = {}

    def get(self, key: str) -> CachedResult | None:
        return self._entries.get(key)

    def put(self, key: str, result: CachedResult) -> None:
        with self._lock:
            self._entries[key] = result

    def start_prompt(self, keys: set[str]) -> None:
        with self._lock:
            for key in [k for k in self._entries if k not in keys]:
                del self._entries[key]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class LRUCache(Cache):
    """Least-recently-used eviction under a byte budget; a result larger than the budget is not kept."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__()
        self.max_bytes = int(max_bytes)
        self.total_bytes = 0
        self._entries: OrderedDict[str, CachedResult] = OrderedDict()

    def get(self, key: str) -> CachedResult | None:
        with self._lock:
            result = self._entries.get(key)
            if result is not None:
                self._entries.move_to_end(key)
            return result

    def put(self, key: str, result: CachedResult) -> None:
        result.nbytes = nbytes_of([result.outputs, result.ui])
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.total_bytes -= old.nbytes
            if result.nbytes > self.max_bytes:
                return
            self._entries[key] = result
            self.total_bytes += result.nbytes
            while self.total_bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.total_bytes -= evicted.nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.total_bytes = 0

    def __len__(self) -> int:
        return len(self._entries)


def default_ram_budget(fraction: float = 0.25) -> int:
    """A fraction of physical RAM, for the LRU cache when no budget is given."""
    try:
        return int(os_total_ram() * fraction)
    except (OSError, ValueError):
        return 4 << 30


def os_total_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def make_cache(mode: str, max_bytes: int | None = None) -> Cache:
    """`workflow` (default), `lru` (with a byte budget) or `none`."""
    if mode in ("workflow", "classic", ""):
        return WorkflowCache()
    if mode == "lru":
        return LRUCache(max_bytes if max_bytes is not None else default_ram_budget())
    if mode == "none":
        return NoCache()
    raise ValueError(f"unknown cache mode {mode!r}: expected workflow, lru or none")
