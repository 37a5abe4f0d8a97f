"""`--workers N|ray|ray://HOST:PORT`, Ray imported only when asked for, the cluster store and worker counts."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from server.cli import build_parser
from server.cli_serve import workers_option
from server.cluster_store import ClusterStore
from server.scheduling import worker_target
from tests.server.harness import ROOT


def test_workers_option_takes_a_count_or_ray():
    assert workers_option("3") == 3
    assert workers_option("ray") == "ray"
    assert workers_option("ray://head:10001") == "ray://head:10001"
    for bad in ("0", "-1", "many", "ray://", "Ray"):
        with pytest.raises(argparse.ArgumentTypeError):
            workers_option(bad)
    args = build_parser().parse_args(["serve", "--workers", "ray://10.0.0.5:10001"])
    assert args.workers == "ray://10.0.0.5:10001"
    assert build_parser().parse_args(["serve", "--workers", "2"]).workers == 2


PROBE = """
import sys
from pathlib import Path
from server.app import create_app
from server.state import STATE, ServerConfig
data = Path(sys.argv[1])
app = create_app(ServerConfig(data_dir=data / "threads", workers=2))
assert "ray" not in sys.modules, "ray was imported without --workers ray"
assert len(app[STATE].pool.workers) == 2
app[STATE].store.close()
app = create_app(ServerConfig(data_dir=data / "cluster", workers="ray"))
assert "ray" in sys.modules and type(app[STATE].pool).__name__ == "RayWorkerPool"
assert type(app[STATE].store).__name__ == "ClusterStore"
print("ok")
"""


def test_ray_is_imported_only_with_workers_ray(tmp_path):
    pytest.importorskip("ray")
    result = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_worker_count_follows_the_cluster_resources():
    assert worker_target({"CPU": 2.0}) == (2, {"num_cpus": 1})
    assert worker_target({"CPU": 16.0}, cpus_per_worker=4) == (4, {"num_cpus": 4})
    assert worker_target({"CPU": 64.0, "GPU": 8.0}) == (8, {"num_gpus": 1, "num_cpus": 1})
    assert worker_target({"CPU": 64.0, "GPU": 8.0}, max_workers=3)[0] == 3
    assert worker_target({"CPU": 1.0, "GPU": 4.0})[0] == 1  # a GPU worker needs a CPU too
    assert worker_target({})[0] == 0  # a node that left takes its slots with it


def test_cluster_store_claims_any_pending_prompt_and_requeues_in_place(tmp_path):
    store = ClusterStore(tmp_path / "q.sqlite3", durable=False)
    for name in ("a", "b", "c"):
        store.add(name, {"1": {"class_type": "X", "inputs": {"ckpt_name": name}}}, {}, ["1"])
    store.add("front", {}, {}, [], front=True)
    assert store.pending_ids(10) == ["front", "a", "b", "c"] and store.pending_ids(2) == ["front", "a"]
    assert store.prompts(["b", "nope"]) == {"b": {"1": {"class_type": "X", "inputs": {"ckpt_name": "b"}}}}
    claimed = store.claim("b")
    assert claimed is not None and claimed.prompt_id == "b" and store.state_of("b") == "running"
    assert store.claim("b") is None and store.claim("nope") is None
    assert store.pending_ids(10) == ["front", "a", "c"]
    assert store.requeue("b") and not store.requeue("b")
    assert store.pending_ids(10) == ["front", "a", "b", "c"]  # back at its own place
    store.close()
