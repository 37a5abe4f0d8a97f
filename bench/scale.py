"""Scaling benchmark: prompts per minute with 1 and 2 Ray workers on this machine, and the scheduler's cost.

    python bench/scale.py [--prompts 24] [--steps 4] [--size 64] [--sim-workers 64] [--sim-queue 10000]

Throughput: for 1, then 2 workers, starts a local Ray with that many CPUs (in a helper process, everything
under a temporary folder, see tests/server/ray_harness.py) and a real `latentloom serve --workers ray` joined
to it, with two tiny SD1 checkpoints; warms every worker up (loads both checkpoints), then submits `--prompts`
txt2img prompts over the two checkpoints at once and times from the first submission to the last history
entry. Prints prompts per minute for each and the ratio. On a machine with other work running, the ratio
says as much about that work as about the cluster.

Scheduler: `--sim-workers` simulated workers (each starting with 0-2 of 16 checkpoints, holding at most 3),
`--sim-queue` queued prompts over those checkpoints. All workers take a prompt, then one at a time a random
busy worker finishes and the scheduler is asked again, until the queue is empty. Prints the decision time
per prompt (target: under 1 ms), per call with one idle worker (p50/p99), and how many checkpoint loads
the affinity scheduler caused against a first-come-first-served baseline.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from server.scheduling import Job, Scheduler, WorkerView
from tests.server.harness import make_data_dir


# the scheduler ----------------------------------------------------------------------------------------
def simulate(workers: int, queue: int, checkpoints: int = 16, hold: int = 3, affinity: bool = True,
             seed: int = 0) -> dict[str, float]:
    rng = random.Random(seed)
    names = [f"ckpt{i}" for i in range(checkpoints)]
    pending = [Job(f"p{i}", frozenset([rng.choice(names)])) for i in range(queue)]
    loaded = {f"w{i}": list(rng.sample(names, rng.randint(0, 2))) for i in range(workers)}
    busy: dict[str, Job] = {}
    scheduler = Scheduler()
    per_call, total, assigned, loads = [], 0.0, 0, 0
    while pending or busy:
        views = [WorkerView(w, frozenset(held), w in busy, 0) for w, held in loaded.items()]
        start = time.perf_counter()
        if affinity:
            pairs = scheduler.assign(pending, views)
        else:  # first come, first served: the oldest prompts to the idle workers in order
            idle = [v.worker_id for v in views if not v.busy]
            pairs = list(zip(pending[:len(idle)], idle, strict=False))
        elapsed = time.perf_counter() - start
        total += elapsed
        if len(pairs) == 1:
            per_call.append(elapsed)
        for job, worker_id in pairs:
            index = next(i for i in range(len(pending)) if pending[i] is job)
            del pending[index]
            busy[worker_id] = job
            assigned += 1
            held = loaded[worker_id]
            for name in job.checkpoints:
                if name in held:
                    held.remove(name)
                else:
                    loads += 1
                held.append(name)
            del held[:-hold]
        if busy:
            del busy[rng.choice(sorted(busy))]
    per_call.sort()
    return {"per_prompt_ms": 1000 * total / max(1, assigned), "assigned": assigned, "loads": loads,
            "p50_ms": 1000 * per_call[len(per_call) // 2] if per_call else 0.0,
            "p99_ms": 1000 * per_call[int(0.99 * (len(per_call) - 1))] if per_call else 0.0}


# throughput -------------------------------------------------------------------------------------------
def txt2img(ckpt: str, seed: int, steps: int, size: int) -> dict:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blue", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "seed": seed, "steps": steps, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["5", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "scale"}},
    }


def run_batch(server, prompts: list[dict], timeout: float = 1800.0) -> float:
    """Seconds from the first submission until every prompt is in history."""
    start = time.perf_counter()
    ids = []
    for prompt in prompts:
        status, body = server.json("POST", "/prompt", {"prompt": prompt})
        assert status == 200, body
        ids.append(body["prompt_id"])
    left = set(ids)
    deadline = time.monotonic() + timeout
    while left and time.monotonic() < deadline:
        for pid in list(left):
            status, body = server.json("GET", f"/history/{pid}")
            if body:
                entry = body[pid]
                assert entry["status"]["status_str"] == "success", entry["status"]
                left.discard(pid)
        time.sleep(0.05)
    if left:
        raise RuntimeError(f"{len(left)} prompts did not finish")
    return time.perf_counter() - start


def throughput(workers: int, folder: Path, args: argparse.Namespace) -> float:
    from diffusion.checkpoints.random_checkpoints import write_random_checkpoint
    from tests.server.ray_harness import RayHead, RayServer, ray_environment

    folder.mkdir(parents=True)
    env = ray_environment(folder)
    data = make_data_dir(folder / "data")
    checkpoints = data / "models" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for index, name in enumerate(("a", "b")):
        write_random_checkpoint(checkpoints / f"{name}.safetensors", "sd1", seed=index + 1)
    head = RayHead(folder, env, cpus=workers)
    server = None
    try:
        server = RayServer(data, dict(env, RAY_ADDRESS=head.address), "--workers", "ray").start()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            ready = [w for w in server.json("GET", "/system_stats")[1].get("workers", []) if w["state"] == "idle"]
            if len(ready) == workers:
                break
            time.sleep(0.2)
        warm = [txt2img(f"{'ab'[i % 2]}.safetensors", 1000 + i, args.steps, args.size) for i in range(2 * workers)]
        run_batch(server, warm)
        prompts = [txt2img(f"{'ab'[i % 2]}.safetensors", i, args.steps, args.size) for i in range(args.prompts)]
        return 60.0 * args.prompts / run_batch(server, prompts)
    finally:
        if server is not None:
            server.stop()
        head.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--sim-workers", type=int, default=64)
    parser.add_argument("--sim-queue", type=int, default=10_000)
    parser.add_argument("--skip-throughput", action="store_true", help="only the scheduler simulation")
    args = parser.parse_args()

    sim = simulate(args.sim_workers, args.sim_queue)
    fifo = simulate(args.sim_workers, args.sim_queue, affinity=False)
    print(f"scheduler: {args.sim_workers} workers, {args.sim_queue} queued prompts over 16 checkpoints")
    print(f"  decision time per prompt: {sim['per_prompt_ms']:.4f} ms (target < 1 ms); one idle worker per call: "
          f"p50 {sim['p50_ms']:.4f} ms, p99 {sim['p99_ms']:.4f} ms")
    print(f"  checkpoint loads: {sim['loads']} with affinity, {fifo['loads']} first-come-first-served "
          f"({sim['assigned']} prompts)")
    if args.skip_throughput:
        return
    with tempfile.TemporaryDirectory(prefix="llscale") as tmp:
        rates = {n: throughput(n, Path(tmp) / f"w{n}", args) for n in (1, 2)}
    print(f"throughput ({args.prompts} txt2img prompts, {args.size}x{args.size}, {args.steps} steps, tiny SD1, "
          f"2 checkpoints):")
    for n, rate in rates.items():
        print(f"  {n} worker{'s' if n > 1 else ''}: {rate:.1f} prompts/min")
    print(f"  ratio 2/1: {rates[2] / rates[1]:.2f}")


if __name__ == "__main__":
    main()
