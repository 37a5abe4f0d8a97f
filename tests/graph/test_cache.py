from __future__ import annotations

import torch

from graph.cache import CachedResult, LRUCache, make_cache, nbytes_of
from tests.graph.conftest import Runner


def test_nbytes_counts_each_storage_once():
    t = torch.zeros(1000, dtype=torch.float32)
    assert nbytes_of(t) == 4000
    assert 4000 <= nbytes_of([t, t[:10], {"samples": t}]) < 4000 + 400  # views share the storage
    assert nbytes_of([t, t.clone()]) >= 8000


def test_lru_never_exceeds_byte_budget():
    cache = LRUCache(max_bytes=100_000)
    for i in range(50):
        cache.put(f"k{i}", CachedResult([[torch.zeros(2500 + 97 * i, dtype=torch.uint8)]]))
        assert cache.total_bytes <= cache.max_bytes
        assert cache.total_bytes == sum(e.nbytes for e in cache._entries.values())
    assert cache.get("k49") is not None and cache.get("k0") is None
    cache.put("huge", CachedResult([[torch.zeros(200_000, dtype=torch.uint8)]]))
    assert cache.get("huge") is None and cache.total_bytes <= cache.max_bytes


def test_lru_evicts_least_recently_used():
    cache = LRUCache(max_bytes=3 * 1300)  # three entries of ~1.2 kB fit, four do not
    for key in "abc":
        cache.put(key, CachedResult([[torch.zeros(1000, dtype=torch.uint8)]]))
    cache.get("a")
    cache.put("d", CachedResult([[torch.zeros(1000, dtype=torch.uint8)]]))
    assert cache.get("b") is None and cache.get("a") is not None


def test_lru_budget_holds_during_execution():
    runner = Runner(cache=make_cache("lru", 50_000))
    for value in range(30):
        runner.run({"1": {"class_type": "Number", "inputs": {"value": value}},
                    "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}})
        assert runner.executor.cache.total_bytes <= 50_000


def test_make_cache_rejects_unknown_mode():
    import pytest

    with pytest.raises(ValueError, match="unknown cache mode"):
        make_cache("bogus")
