"""A local Ray for the cluster tests and bench/scale.py, started and stopped by them, and a server joining it.

The Ray head runs in a helper process (`ray.init(num_cpus=N)`) whose environment keeps Ray's temp folder,
HOME and TMPDIR inside the caller's folder and turns Ray's auth and usage reporting off; the caller's own
process never imports Ray. The helper kills actors on request and shuts Ray down when its stdin closes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from tests.server.harness import ROOT, ServerProcess

HEAD_SCRIPT = r"""
import sys
import ray
ray.init(num_cpus=int(sys.argv[2]), _temp_dir=sys.argv[1], include_dashboard=False, object_store_memory=128 << 20)
print("address", ray.get_runtime_context().gcs_address, flush=True)
for line in sys.stdin:
    command, _, name = line.strip().partition(" ")
    if command == "kill":
        try:
            ray.kill(ray.get_actor(name, namespace="latentloom"), no_restart=True)
            print("killed", flush=True)
        except Exception as exc:
            print("error", type(exc).__name__, exc, flush=True)
ray.shutdown()
"""


def ray_environment(folder: Path) -> dict[str, str]:
    """Variables for Ray's processes (and the server's): everything they write stays under folder."""
    for name in ("home", "tmp"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    return dict(os.environ, RAY_AUTH_MODE="disabled", HOME=str(folder / "home"), TMPDIR=str(folder / "tmp"),
                PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0")


class RayHead:
    """A local Ray with `cpus` CPUs in a helper process; `kill(actor_name)`; `stop()` shuts Ray down."""

    def __init__(self, folder: Path, env: dict[str, str], cpus: int = 2) -> None:
        with open(folder / "head.log", "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", HEAD_SCRIPT, str(folder / "r"), str(cpus)], env=env,
                                         cwd=folder, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                         text=True)
        timer = threading.Timer(120, self.proc.kill)
        timer.start()
        line = self.proc.stdout.readline()
        timer.cancel()
        if not line.startswith("address "):
            raise RuntimeError(f"Ray did not start:\n{(folder / 'head.log').read_text(errors='replace')}")
        self.address = line.split()[1]
        self.env = env

    def add_node(self, folder: Path, cpus: int = 1) -> subprocess.Popen:
        """Another Ray node on this machine (`ray start --block`) joining this one; `terminate()` makes it leave
        (after a drain of at most a second: it would wait 30 s for the worker actor on it)."""
        with open(folder / "node.log", "ab") as log:
            return subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", f"--address={self.address}",
                                     f"--num-cpus={cpus}", "--block", "--disable-usage-stats"],
                                    env=dict(self.env, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="1"),
                                    cwd=folder, stdout=log, stderr=log)

    def kill(self, actor_name: str) -> None:
        self.proc.stdin.write(f"kill {actor_name}\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        if answer != "killed":
            raise RuntimeError(f"could not kill {actor_name}: {answer}")

    def stop(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class RayServer(ServerProcess):
    """The harness's server process with an environment of its own (RAY_ADDRESS and the rest)."""

    def __init__(self, data_dir: Path, env: dict[str, str], *args: str) -> None:
        super().__init__(data_dir, *args, env=env)

    def start(self, timeout: float = 120.0) -> RayServer:
        super().start(timeout)
        return self


SINGLE_PROCESS_SCRIPT = r"""
import json, sys
from pathlib import Path
from graph.executor import Executor
from graph.validation import validate_prompt
from nodes import build_registry
from nodes.environment import Environment
model_dir, prompts_file, folder = map(Path, sys.argv[1:4])
env = Environment(folder, extra_model_dirs={"checkpoints": [model_dir]})
env.ensure_dirs()
registry = build_registry(env, plugins=False)
executor = Executor(env=env)
files = []
for index, prompt in enumerate(json.loads(prompts_file.read_text())):
    result = executor.execute(validate_prompt(prompt, registry, env).prompt, f"single{index}")
    if result.status != "success":
        sys.exit(f"prompt {index}: {result.error}")
    files.append([str(env.output_dir / item["subfolder"] / item["filename"])
                  for ui in result.outputs.values() for item in ui.get("images", [])])
print(json.dumps(files))
"""


def single_process_outputs(model_dir: Path, prompts: list[dict[str, Any]], folder: Path) -> list[list[Path]]:
    """Run the prompts one after another in one plain process (one Executor, one torch thread, as each CPU
    worker has) and return each prompt's image files."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompts.json").write_text(json.dumps(prompts))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", SINGLE_PROCESS_SCRIPT, str(model_dir), str(folder / "prompts.json"),
                             str(folder / "data")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"the single-process run failed:\n{result.stderr[-3000:]}")
    return [[Path(p) for p in files] for files in json.loads(result.stdout.strip().splitlines()[-1])]
