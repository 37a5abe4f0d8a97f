from __future__ import annotations

import threading
import time

from graph.cache import LRUCache, NoCache
from graph.validation import validate_prompt
from tests.graph.conftest import Runner


def chain_prompt(value=1, b=2):
    return {
        "1": {"class_type": "Number", "inputs": {"value": value}},
        "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": b}},
        "3": {"class_type": "Add", "inputs": {"a": ["2", 0], "b": 10}},
        "4": {"class_type": "Show", "inputs": {"value": ["3", 0]}},
    }


def test_runs_and_reports_outputs(runner):
    result = runner.run(chain_prompt())
    assert result.status == "success"
    assert result.outputs == {"4": {"values": [13]}}
    assert sorted(runner.ran()) == ["1", "2", "3", "4"]
    kinds = [e for e, _ in runner.events]
    assert kinds[0] == "execution_start" and kinds[1] == "execution_cached" and kinds[-1] == "execution_success"
    assert ("executed", {"node": "4", "display_node": "4", "output": {"values": [13]}, "prompt_id": "p1"}) \
        in runner.events


def test_identical_resubmission_runs_nothing(runner):
    runner.run(chain_prompt())
    result = runner.run(chain_prompt(), prompt_id="p2")
    assert runner.ran() == []
    assert sorted(result.cached) == ["1", "2", "3", "4"]
    assert result.outputs == {"4": {"values": [13]}}  # cached output nodes still report their ui


def test_changing_one_literal_reruns_only_downstream(runner):
    runner.run(chain_prompt())
    runner.run(chain_prompt(b=5), prompt_id="p2")
    assert sorted(runner.ran()) == ["2", "3", "4"]


def test_identical_subgraphs_share_results(runner):
    prompt = {
        "1": {"class_type": "Number", "inputs": {"value": 7}},
        "2": {"class_type": "Number", "inputs": {"value": 7}},
        "3": {"class_type": "Show", "inputs": {"value": ["1", 0]}},
        "4": {"class_type": "Show", "inputs": {"value": ["2", 0]}},
    }
    result = runner.run(prompt)
    numbers_run = [n for n in runner.ran() if n in ("1", "2")]
    shows_run = [n for n in runner.ran() if n in ("3", "4")]
    assert len(numbers_run) == 1 and len(shows_run) == 1
    assert result.outputs["3"] == result.outputs["4"] == {"values": [7]}


def test_fingerprint_forces_rerun_only_when_it_changes():
    runner = Runner(env={"state": {"x": 1}})
    prompt = {"1": {"class_type": "OutsideState", "inputs": {"key": "x"}},
              "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    runner.run(prompt)
    runner.run(prompt)
    assert runner.ran() == []
    runner.env["state"]["x"] = 2
    runner.run(prompt)
    assert sorted(runner.ran()) == ["1", "2"]


def test_nan_fingerprint_reruns_every_time():
    runner = Runner(env={"state": {"x": float("nan")}})
    prompt = {"1": {"class_type": "OutsideState", "inputs": {"key": "x"}},
              "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    runner.run(prompt)
    runner.run(prompt)
    assert "1" in runner.ran()


def test_lazy_input_not_needed_is_never_evaluated(runner):
    prompt = {
        "1": {"class_type": "Number", "inputs": {"value": 1}},
        "2": {"class_type": "Fail", "inputs": {"x": ["1", 0]}},  # would raise if evaluated
        "3": {"class_type": "Choose", "inputs": {"use_a": True, "a": ["1", 0], "b": ["2", 0]}},
        "4": {"class_type": "Show", "inputs": {"value": ["3", 0]}},
    }
    result = runner.run(prompt)
    assert result.status == "success", result.error
    assert "2" not in runner.ran()
    assert result.outputs["4"] == {"values": [1]}


def test_lazy_input_evaluated_when_asked(runner):
    prompt = {
        "1": {"class_type": "Number", "inputs": {"value": 1}},
        "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 41}},
        "3": {"class_type": "Choose", "inputs": {"use_a": False, "a": ["1", 0], "b": ["2", 0]}},
        "4": {"class_type": "Show", "inputs": {"value": ["3", 0]}},
    }
    result = runner.run(prompt)
    assert result.outputs["4"] == {"values": [42]}
    assert runner.ran().count("3") == 1


def test_raising_node_reports_and_next_prompt_succeeds(runner):
    prompt = {"1": {"class_type": "Number", "inputs": {"value": 3}},
              "2": {"class_type": "Fail", "inputs": {"x": ["1", 0]}},
              "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}
    result = runner.run(prompt)
    assert result.status == "error"
    errors = [d for e, d in runner.events if e == "execution_error"]
    assert len(errors) == 1
    err = errors[0]
    assert err["node_id"] == "2" and err["node_type"] == "Fail"
    assert err["exception_type"] == "builtins.RuntimeError" and err["exception_message"] == "boom on 3"
    assert err["current_inputs"] == {"x": [3]} and err["traceback"] and err["executed"] == ["1"]
    # the failed node left no cache entry: fixing the graph reruns from there, and the cached part is reused
    fixed = dict(prompt, **{"2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 1}}})
    result = runner.run(fixed, prompt_id="p2")
    assert result.status == "success" and result.outputs["3"] == {"values": [4]}
    assert sorted(runner.ran()) == ["2", "3"]
    again = runner.run(prompt, prompt_id="p3")
    assert again.status == "error" and "2" in runner.ran()


def test_interrupt_stops_long_chain_at_next_node():
    runner = Runner()
    prompt = {"0": {"class_type": "Number", "inputs": {"value": 0}}}
    for i in range(1, 41):
        prompt[str(i)] = {"class_type": "Slow", "inputs": {"x": [str(i - 1), 0], "steps": 1, "delay": 0.02}}
    prompt["out"] = {"class_type": "Show", "inputs": {"value": ["40", 0]}}
    done = {}

    def go():
        done["result"] = runner.run(prompt, prompt_id="long")

    thread = threading.Thread(target=go)
    thread.start()
    time.sleep(0.2)
    assert runner.executor.interrupt("other") is False  # a different prompt id interrupts nothing
    assert runner.executor.interrupt("long") is True
    thread.join(10)
    result = done["result"]
    assert result.status == "interrupted"
    assert 1 <= len(result.executed) < 40
    interrupted = [d for e, d in runner.events if e == "execution_interrupted"]
    assert interrupted and interrupted[0]["prompt_id"] == "long"
    assert runner.run({"1": {"class_type": "Number", "inputs": {"value": 1}},
                       "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}, "next").status == "success"


def test_interrupt_inside_a_node_at_progress_tick():
    runner = Runner()
    prompt = {"1": {"class_type": "Number", "inputs": {"value": 0}},
              "2": {"class_type": "Slow", "inputs": {"x": ["1", 0], "steps": 500, "delay": 0.01}},
              "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}
    events = []

    def on_event(event, data):
        events.append((event, data))
        if event == "progress" and data["value"] == 3:  # interrupt from another thread mid-node
            threading.Thread(target=runner.executor.interrupt, args=("p1",)).start()

    validation = validate_prompt(prompt, runner.registry, runner.env)
    result = runner.executor.execute(validation.prompt, "p1", on_event)
    assert result.status == "interrupted"
    progress = [d for e, d in events if e == "progress"]
    assert progress[0] == {"value": 1, "max": 500, "prompt_id": "p1", "node": "2"}
    assert 3 <= len(progress) < 100
    assert [d["node_id"] for e, d in events if e == "execution_interrupted"] == ["2"]


def test_list_mapping(runner):
    prompt = {
        "1": {"class_type": "Range", "inputs": {"count": 4}},
        "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 10}},  # mapped: runs 4 times
        "3": {"class_type": "Total", "inputs": {"values": ["2", 0]}},  # takes the whole list once
        "4": {"class_type": "Show", "inputs": {"value": ["3", 0]}},
        "5": {"class_type": "Show", "inputs": {"value": ["2", 0]}},
    }
    result = runner.run(prompt)
    assert result.outputs["4"] == {"values": [0 + 1 + 2 + 3 + 40]}
    assert result.outputs["5"] == {"values": [10, 11, 12, 13]}


def test_empty_list_means_no_calls(runner):
    prompt = {"1": {"class_type": "Range", "inputs": {"count": 0}},
              "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 10}},
              "3": {"class_type": "Total", "inputs": {"values": ["2", 0]}},
              "4": {"class_type": "Show", "inputs": {"value": ["3", 0]}}}
    assert runner.run(prompt).outputs["4"] == {"values": [0]}


def test_output_closest_to_an_output_runs_first(runner):
    # 1 feeds a short branch (Show 2) and a long one (3 -> 4 -> Show 5): Show 2 runs right after 1.
    prompt = {"1": {"class_type": "Number", "inputs": {"value": 1}},
              "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}},
              "3": {"class_type": "Add", "inputs": {"a": ["1", 0]}},
              "4": {"class_type": "Add", "inputs": {"a": ["3", 0]}},
              "5": {"class_type": "Show", "inputs": {"value": ["4", 0]}}}
    runner.run(prompt)
    assert runner.ran()[:2] == ["1", "2"]


def test_hidden_inputs(runner):
    prompt = {"7": {"class_type": "Hidden", "inputs": {"value": 1}},
              "8": {"class_type": "Show", "inputs": {"value": ["7", 0]}}}
    runner.events = []
    validation = validate_prompt(prompt, runner.registry, runner.env)
    result = runner.executor.execute(validation.prompt, "h", extra_data={"extra_pnginfo": {"workflow": {"a": 1}}})
    shown = result.outputs["8"]["values"][0]
    assert shown == {"prompt": prompt, "unique_id": "7", "extra": {"workflow": {"a": 1}}}


def test_no_cache_mode_reruns_everything():
    runner = Runner(cache=NoCache())
    runner.run(chain_prompt())
    runner.run(chain_prompt())
    assert sorted(runner.ran()) == ["1", "2", "3", "4"]


def test_lru_mode_keeps_results_across_workflows():
    runner = Runner(cache=LRUCache(1 << 20))
    runner.run(chain_prompt(value=1))
    runner.run(chain_prompt(value=2))
    runner.run(chain_prompt(value=1))
    assert runner.ran() == []


def test_workflow_mode_drops_what_the_new_workflow_does_not_use(runner):
    runner.run(chain_prompt(value=1))
    runner.run(chain_prompt(value=2))
    runner.run(chain_prompt(value=1))
    assert sorted(runner.ran()) == ["1", "2", "3", "4"]
