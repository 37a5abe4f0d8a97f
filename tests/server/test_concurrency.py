"""200 submissions from 20 concurrent clients: all complete, and each client hears only its own prompts."""

from __future__ import annotations

import asyncio
import json
import uuid

import aiohttp


def slow_prompt(value):
    return {"1": {"class_type": "Number", "inputs": {"value": value}},
            "2": {"class_type": "Slow", "inputs": {"x": ["1", 0], "steps": 2, "delay": 0}},
            "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}


async def one_client(session, url, index, per_client):
    client_id = f"client-{index}-{uuid.uuid4().hex[:6]}"
    mine, done, foreign, events = set(), set(), [], []
    async with session.ws_connect(f"{url}/ws?clientId={client_id}") as ws:
        await ws.receive()
        for i in range(per_client):
            async with session.post(f"{url}/prompt", json={"prompt": slow_prompt(index * per_client + i - 100),
                                                           "client_id": client_id}) as response:
                assert response.status == 200
                mine.add((await response.json())["prompt_id"])
        async with asyncio.timeout(120):
            while done != mine:
                msg = await ws.receive()
                assert msg.type == aiohttp.WSMsgType.TEXT, msg
                event = json.loads(msg.data)
                prompt_id = event["data"].get("prompt_id")
                if event["type"] == "status":
                    continue
                events.append(event)
                if prompt_id not in mine:
                    foreign.append(event)
                if event["type"] == "executing" and event["data"]["node"] is None:
                    done.add(prompt_id)
    return mine, events, foreign


def test_200_prompts_from_20_clients(start_server):
    server = start_server()

    async def run():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=40)) as session:
            return await asyncio.gather(*(one_client(session, server.url, i, 10) for i in range(20)))

    results = asyncio.run(run())
    all_ids = set().union(*(mine for mine, _, _ in results))
    assert len(all_ids) == 200
    for mine, events, foreign in results:
        assert foreign == []
        progress = [e for e in events if e["type"] == "progress"]
        assert len(progress) == 2 * len(mine)
        assert sum(e["type"] == "execution_success" for e in events) == len(mine)
    history = server.json("GET", "/history")[1]
    assert all_ids <= set(history)
    assert all(history[pid]["status"]["status_str"] == "success" for pid in all_ids)


def test_events_from_threads_arrive_in_order_with_one_wake_up_per_burst():
    import threading

    from server.websocket import Hub

    async def scenario() -> tuple[list[str], int]:
        hub = Hub(lambda: {}, {}, lambda cid: None)
        hub.loop = asyncio.get_running_loop()
        delivered: list[str] = []
        wake_ups = 0
        deliver = hub._deliver_inbox

        def counting() -> None:
            nonlocal wake_ups
            wake_ups += 1
            deliver()

        hub._deliver_inbox = counting
        hub.publish = lambda message, to: delivered.append(message)
        burst = threading.Thread(target=lambda: [hub.publish_threadsafe(f"m{i}", "c") for i in range(500)])
        burst.start()
        burst.join()  # the loop is not running callbacks meanwhile: the whole burst waits for one delivery
        await asyncio.sleep(0.05)
        return delivered, wake_ups

    delivered, wake_ups = asyncio.run(scenario())
    assert delivered == [f"m{i}" for i in range(500)]
    assert wake_ups == 1
