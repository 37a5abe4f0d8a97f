"""Server benchmark: submission latency with 50 concurrent clients, WebSocket fan-out to 100 clients.

    python bench/server.py [--clients 50] [--per-client 20] [--sockets 100] [--rounds 20]

Starts a real `latentloom serve` process on a free port with a temporary data directory (and the test
plugin's tiny nodes), then measures:
- submission latency: POST /prompt → 200 (validated and committed to SQLite), from N concurrent clients
  each submitting one prompt after another while the worker runs them;
- fan-out: from POST /queue (which broadcasts `status`) until the last of M sockets has received it
  (an upper bound: it includes the HTTP request).
Targets on the reference machine: p99 submission < 50 ms; fan-out < 100 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.server.harness import ServerProcess, make_data_dir


def prompt(value: int) -> dict:
    return {"1": {"class_type": "Number", "inputs": {"value": value % 1000}},
            "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 1}},
            "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def submissions(url: str, clients: int, per_client: int) -> list[float]:
    latencies: list[float] = []

    async def client(session: aiohttp.ClientSession, index: int) -> None:
        for i in range(per_client):
            start = time.perf_counter()
            async with session.post(f"{url}/prompt", json={"prompt": prompt(index * per_client + i)}) as response:
                await response.read()
                assert response.status == 200, response.status
            latencies.append(time.perf_counter() - start)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        await asyncio.gather(*(client(session, i) for i in range(clients)))
    return latencies


async def fan_out(url: str, sockets: int, rounds: int) -> list[float]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=sockets + 4)) as session:
        connections = [await session.ws_connect(f"{url}/ws") for _ in range(sockets)]
        for ws in connections:
            await ws.receive()

        async def status(ws: aiohttp.ClientWebSocketResponse) -> float:
            while True:
                msg = await ws.receive()
                if json.loads(msg.data)["type"] == "status":
                    return time.perf_counter()

        times = []
        for _ in range(rounds):
            waiting = [asyncio.create_task(status(ws)) for ws in connections]
            start = time.perf_counter()
            async with session.post(f"{url}/queue", json={}) as response:
                assert response.status == 200
            arrivals = await asyncio.gather(*waiting)
            times.append(max(arrivals) - start)
        for ws in connections:
            await ws.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--per-client", type=int, default=20)
    parser.add_argument("--sockets", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(make_data_dir(Path(tmp) / "data")).start()
        try:
            latencies = asyncio.run(submissions(server.url, args.clients, args.per_client))
            while server.json("GET", "/prompt")[1]["exec_info"]["queue_remaining"]:  # no worker broadcasts
                time.sleep(0.1)
            fan = asyncio.run(fan_out(server.url, args.sockets, args.rounds))
        finally:
            server.stop()
    ms = [x * 1000 for x in latencies]
    print(f"submission latency, {args.clients} concurrent clients, {len(ms)} prompts: "
          f"p50 {percentile(ms, 0.5):.1f} ms, p99 {percentile(ms, 0.99):.1f} ms (target p99 < 50 ms)")
    fan_ms = [x * 1000 for x in fan]
    print(f"fan-out of a status event to {args.sockets} sockets, {args.rounds} rounds: "
          f"median {statistics.median(fan_ms):.1f} ms, max {max(fan_ms):.1f} ms (target < 100 ms)")


if __name__ == "__main__":
    main()
