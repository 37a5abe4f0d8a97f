"""The cluster's pure parts, without Ray: the scheduler, the landing of workers' files, the worker class."""

from __future__ import annotations

import io
import threading
import time

import pytest
from PIL import Image

from nodes.environment import Environment
from server.ray_actor import PromptWorker
from server.ray_outputs import OutputLanding
from server.scheduling import Job, Scheduler, WorkerView, best_worker, prompt_checkpoints
from tests.server.harness import make_data_dir


def job(pid, *ckpts):
    return Job(pid, frozenset(ckpts))


def worker(wid, *loaded, busy=False, free=0):
    return WorkerView(wid, frozenset(loaded), busy, free)


def test_idle_worker_takes_the_oldest_prompt_of_a_checkpoint_it_holds():
    pending = [job("1", "a"), job("2", "b"), job("3", "a")]
    assert [(j.prompt_id, w) for j, w in Scheduler().assign(pending, [worker("w1", "b"), worker("w2", busy=True)])] \
        == [("2", "w1")]


def test_each_idle_worker_gets_its_own_checkpoint():
    pending = [job("1", "a"), job("2", "a"), job("3", "b")]
    pairs = Scheduler().assign(pending, [worker("wa", "a"), worker("wb", "b")])
    assert sorted((j.prompt_id, w) for j, w in pairs) == [("1", "wa"), ("3", "wb")]


def test_no_holder_goes_to_least_loaded_and_no_worker_idles_while_work_waits():
    pending = [job("1", "c"), job("2", "c")]
    workers = [worker("w1", "a", "b", free=10), worker("w2", "a", free=10), worker("w3", free=5)]
    pairs = Scheduler().assign(pending, workers)
    # most free memory first, then fewest models held
    assert [(j.prompt_id, w) for j, w in pairs] == [("1", "w2"), ("2", "w1")]


def test_partial_holder_is_preferred_for_a_prompt_of_two_checkpoints():
    chosen = best_worker(job("1", "a", "b"), [worker("w1", free=100), worker("w2", "b", free=1)])
    assert chosen.worker_id == "w2"


def test_busy_holder_does_not_block_an_idle_worker():
    pending = [job("1", "a")]
    assert Scheduler().assign(pending, [worker("wa", "a", busy=True), worker("w2", "b")])[0][1] == "w2"


def test_passed_over_prompt_runs_first_after_max_skips():
    scheduler = Scheduler(max_skips=2)
    old = job("old", "b")
    pending = [old, *(job(f"a{i}", "a") for i in range(5))]
    taken = []
    for _ in range(3):
        pairs = scheduler.assign(pending, [worker("wa", "a"), worker("wb", "b", busy=True)])
        taken.append(pairs[0][0].prompt_id)
        pending.remove(pairs[0][0])
    assert taken == ["a0", "a1", "old"] and "old" not in scheduler.skips


def test_window_bounds_lookahead():
    pending = [job(str(i), "a") for i in range(10)] + [job("b", "b")]
    pairs = Scheduler(window=10).assign(pending, [worker("wb", "b")])
    assert pairs[0][0].prompt_id == "0"  # the b prompt is beyond the window: the oldest one goes


def test_prompt_checkpoints_reads_literal_ckpt_names():
    prompt = {"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd/x.safetensors"}},
              "5": {"class_type": "KSampler", "inputs": {"model": ["4", 0]}},
              "6": {"class_type": "Other", "inputs": {"ckpt_name": ["9", 0]}}, "7": "junk"}
    assert prompt_checkpoints(prompt) == {"sd/x.safetensors"}
    assert prompt_checkpoints(None) == frozenset()


# landing ------------------------------------------------------------------------------------------------------
def test_landing_gives_each_worker_file_a_free_counter_and_maps_names(tmp_path):
    env = Environment(tmp_path / "data")
    env.ensure_dirs()
    (env.output_dir / "t_00001_.png").write_bytes(b"existing")
    landing = OutputLanding(env)
    entry = {"filename": "t_00001_.png", "subfolder": "", "type": "output"}
    landing.land("w1", [dict(entry, data=b"one")])
    landing.land("w2", [dict(entry, data=b"two")])
    landing.land("w2", [dict(entry, filename="plain.txt", subfolder="s", data=b"p")])
    landing.land("w1", [dict(entry, filename="plain.txt", subfolder="s", data=b"q")])
    assert (env.output_dir / "t_00001_.png").read_bytes() == b"existing"
    assert (env.output_dir / "t_00002_.png").read_bytes() == b"one"
    assert (env.output_dir / "t_00003_.png").read_bytes() == b"two"
    assert (env.output_dir / "s" / "plain.txt").read_bytes() == b"p"
    assert (env.output_dir / "s" / "plain_1.txt").read_bytes() == b"q"
    ui = {"images": [entry, {"filename": "x.png", "type": "input"}], "text": ["hi"]}
    assert landing.rename_ui("w2", ui) == {"images": [dict(entry, filename="t_00003_.png"),
                                                      {"filename": "x.png", "type": "input"}], "text": ["hi"]}
    landing.land("w2", [dict(entry, data=None)])  # a cached report: nothing written, same mapping
    assert landing.rename_ui("w2", ui)["images"][0]["filename"] == "t_00003_.png"
    landing.forget_worker("w2")
    assert landing.rename_ui("w2", ui)["images"][0]["filename"] == "t_00001_.png"


def test_landing_refuses_paths_out_of_the_data_dir_and_other_types(tmp_path):
    env = Environment(tmp_path / "data")
    landing = OutputLanding(env)
    with pytest.raises(ValueError, match="leave its folder"):
        landing.land("w", [{"type": "output", "subfolder": "../..", "filename": "x.png", "data": b"x"}])
    with pytest.raises(ValueError, match="input"):
        landing.land("w", [{"type": "input", "subfolder": "", "filename": "x.png", "data": b"x"}])


# the worker class, in this process ----------------------------------------------------------------------------
def image_prompt(steps=2):
    return {"1": {"class_type": "MakeImage", "inputs": {"width": 24, "height": 16, "value": 0.25}},
            "2": {"class_type": "PreviewSteps", "inputs": {"images": ["1", 0], "steps": steps, "delay": 0}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "w"}}}


def blocker_prompt(name):
    return {"1": {"class_type": "Number", "inputs": {"value": 1}},
            "2": {"class_type": "WaitForFile", "inputs": {"x": ["1", 0], "name": name, "timeout": 60}},
            "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}


def drain(worker, until_result=True, timeout=30.0):
    messages, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        messages += worker.take_events(0.1)
        if messages and messages[-1][1][0] == "result":
            return messages
    raise AssertionError(f"no result; got {messages}")


@pytest.fixture
def prompt_worker(tmp_path):
    data = make_data_dir(tmp_path / "data")
    worker = PromptWorker("wtest", str(data), scratch_root=str(tmp_path / "scratch"))
    yield worker
    worker.shutdown()
    assert not worker.scratch.exists()


def test_worker_reports_events_previews_and_ships_files_once(prompt_worker):
    status = prompt_worker.run_prompt("p1", image_prompt(), {}, [])
    messages = drain(prompt_worker)
    assert status == "success" and {pid for pid, _ in messages} == {"p1"}
    kinds = [m[0] if m[0] != "event" else m[1] for _, m in messages]
    assert kinds[:2] == ["execution_start", "execution_cached"] and kinds[-2:] == ["execution_success", "result"]
    assert kinds.count("preview") == 2
    jpeg = next(m[2] for _, m in messages if m[0] == "preview")
    assert jpeg[:2] == b"\xff\xd8"
    executed = next(m for _, m in messages if m[0] == "event" and m[1] == "executed")
    files = executed[3]
    assert [f["filename"] for f in files] == ["w_00001_.png"] and files[0]["data"][:4] == b"\x89PNG"
    scratch_file = prompt_worker.env.output_dir / "w_00001_.png"
    assert scratch_file.stat().st_size == 0  # emptied, name kept
    assert not (prompt_worker.env.data_dir / "output").exists()  # nothing written to the server's folder
    summary = messages[-1][1][1]
    assert summary["outputs"]["3"]["images"][0]["filename"] == "w_00001_.png"
    assert summary["stats"]["prompts_done"] == 1 and summary["stats"]["running"] is None
    # the same prompt again: the output node is cached; its file comes without bytes
    prompt_worker.run_prompt("p2", image_prompt(), {}, [])
    again = next(m for _, m in drain(prompt_worker) if m[0] == "event" and m[1] == "executed")
    assert again[3] == [dict(files[0], data=None)]
    # a new image gets the next counter on this worker
    prompt_worker.run_prompt("p3", image_prompt(steps=3), {}, [])
    third = next(m for _, m in drain(prompt_worker) if m[0] == "event" and m[1] == "executed")
    assert third[3][0]["filename"] == "w_00002_.png"


def test_worker_interrupt_before_and_during_the_run(prompt_worker):
    assert prompt_worker.interrupt("early") is False  # not running yet: remembered
    assert prompt_worker.run_prompt("early", blocker_prompt("never"), {}, []) == "interrupted"
    drain(prompt_worker)
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("s", prompt_worker.run_prompt(
        "late", blocker_prompt("never2"), {}, [])))
    thread.start()
    deadline = time.monotonic() + 30
    while prompt_worker.stats()["running"] != "late" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert prompt_worker.stats()["running"] == "late"
    prompt_worker.interrupt("late")
    thread.join(30)
    assert box["s"] == "interrupted"
    names = [m[1] for _, m in drain(prompt_worker) if m[0] == "event"]
    assert "execution_interrupted" in names


def test_worker_validation_error_and_free(prompt_worker):
    assert prompt_worker.run_prompt("bad", {"1": {"class_type": "NoSuchNode", "inputs": {}}}, {}, []) == "error"
    messages = drain(prompt_worker)
    assert messages[0][1][1] == "execution_error" and "NoSuchNode" in messages[0][1][2]["exception_message"]
    prompt_worker.run_prompt("img", image_prompt(), {}, [])
    drain(prompt_worker)
    prompt_worker.free(unload_models=True, free_memory=True)
    prompt_worker.run_prompt("img2", image_prompt(), {}, [])
    executed = next(m for _, m in drain(prompt_worker) if m[0] == "event" and m[1] == "executed")
    assert executed[3][0]["data"] is not None  # the cache was emptied: the image was made and shipped again
    Image.open(io.BytesIO(executed[3][0]["data"])).verify()
