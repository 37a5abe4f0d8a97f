"""Engine overhead: validate + execute a chain of trivial nodes, a fully cached re-run, per-node cost.

Targets on a 2-core machine: per-node overhead under 0.2 ms; fully cached 1,000-node re-run under 100 ms.
The reference in the same run is the bare cost of calling the 1,000 node functions directly.

    python bench/engine.py [--nodes 1000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from graph.executor import Executor
from graph.node import Int, Node, NodeOutput, Output, Socket
from graph.registry import NodeRegistry
from graph.validation import validate_prompt


class Start(Node):
    inputs = [Int("value", default=0)]
    outputs = [Output("INT")]

    def execute(self, value):
        return (value,)


class Inc(Node):
    inputs = [Socket("x", "INT"), Int("by", default=1)]
    outputs = [Output("INT")]

    def execute(self, x, by):
        return (x + by,)


class Sink(Node):
    output_node = True
    inputs = [Socket("x", "INT")]

    def execute(self, x):
        return NodeOutput(ui={"value": [x]})


def chain(n: int, start: int = 0) -> dict:
    prompt = {"0": {"class_type": "Start", "inputs": {"value": start}}}
    for i in range(1, n - 1):
        prompt[str(i)] = {"class_type": "Inc", "inputs": {"x": [str(i - 1), 0], "by": 1}}
    prompt[str(n - 1)] = {"class_type": "Sink", "inputs": {"x": [str(n - 2), 0]}}
    return prompt


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    registry = NodeRegistry()
    for cls in (Start, Inc, Sink):
        registry.register(cls)
    n = args.nodes
    events = []

    def bare() -> None:
        x = Start().execute(0)[0]
        for _ in range(n - 2):
            x = Inc().execute(x, 1)[0]
        Sink().execute(x)

    cold, cached, validate_only = [], [], []
    for rep in range(args.repeat):
        executor = Executor()
        prompt = chain(n, start=rep)

        def run(p=prompt, ex=executor) -> None:
            validation = validate_prompt(p, registry)
            result = ex.execute(validation.prompt, "bench", lambda e, d: events.append(e))
            assert result.status == "success", result.error

        cold.append(timed(run))
        cached.append(timed(run))
        validate_only.append(timed(lambda p=prompt: validate_prompt(p, registry)))
    reference = min(timed(bare) for _ in range(args.repeat))
    cold_s, cached_s, valid_s = min(cold), min(cached), min(validate_only)
    print(f"chain of {n} trivial nodes (best of {args.repeat})")
    print(f"  bare node calls (reference)     {reference * 1e3:8.2f} ms")
    print(f"  validate only                   {valid_s * 1e3:8.2f} ms")
    print(f"  validate + execute (cold)       {cold_s * 1e3:8.2f} ms")
    print(f"  fully cached re-run             {cached_s * 1e3:8.2f} ms   target < 100 ms")
    per_node = (cold_s - reference) / n
    print(f"  per-node overhead               {per_node * 1e3:8.4f} ms   target < 0.2 ms")
    print(f"  median cold / cached            {statistics.median(cold) * 1e3:8.2f} / "
          f"{statistics.median(cached) * 1e3:.2f} ms")
    ok = per_node < 0.2e-3 and cached_s < 0.1
    print("targets met" if ok else "TARGETS MISSED")


if __name__ == "__main__":
    main()
