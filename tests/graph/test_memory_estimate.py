"""The estimate engine (shapes propagated through a validated graph, node needs added up the way the executor
holds memory) and the executor's handling of a node that runs out of memory."""

from __future__ import annotations

import weakref

from graph.executor import Executor
from graph.memory_estimate import (
    EstimateContext,
    MemoryEstimate,
    TensorSpec,
    estimate_prompt,
    format_bytes,
    is_out_of_memory,
)
from graph.node import Int, Node, Output, Socket
from graph.registry import NodeRegistry
from graph.validation import validate_prompt
from tests.graph.testnodes import NODE_CLASSES as BASE

MB = 1 << 20


class Blob(Node):
    """Makes a `size`-MB blob; declares it."""

    category = "test"
    inputs = [Int("size", default=1, min=1, max=1 << 20)]
    outputs = [Output("BLOB")]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        return MemoryEstimate(outputs=(TensorSpec((inputs["size"], MB), 1),), what=f"{inputs['size']} MB")

    def execute(self, size):
        return (bytearray(size * MB),)


class Twice(Node):
    """Doubles a blob, with a working copy on the device: propagates the shape it is given."""

    category = "test"
    inputs = [Socket("blob", "BLOB")]
    outputs = [Output("BLOB")]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        blob = shapes["blob"]
        if blob is None:
            return None
        out = TensorSpec((blob.shape[0] * 2, MB), 1)
        return MemoryEstimate(outputs=(out,), device_bytes=out.nbytes, host_bytes=blob.nbytes // 2)

    def execute(self, blob):
        return (blob + blob,)


class Opaque(Node):
    """Declares nothing: its output's shape is unknown downstream."""

    category = "test"
    inputs = [Socket("blob", "BLOB")]
    outputs = [Output("BLOB")]

    def execute(self, blob):
        return (blob,)


class BrokenEstimate(Node):
    category = "test"
    inputs = [Socket("blob", "BLOB")]
    outputs = [Output("BLOB")]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        raise KeyError("a bug in the hook")

    def execute(self, blob):
        return (blob,)


class Sink(Node):
    category = "test"
    output_node = True
    inputs = [Socket("blob", "BLOB")]
    outputs = []

    def execute(self, blob):
        return ()


class OutOfMemoryError(RuntimeError):
    """Named like torch's: recognised by name, since graph/ cannot import torch."""


class Exhaust(Node):
    """Fills a frame local with a big object, then fails to allocate."""

    category = "test"
    memory_advice = "use a smaller blob"
    inputs = [Socket("blob", "BLOB"), Int("mode", default=0, min=0, max=2)]
    outputs = [Output("BLOB")]
    held: list[weakref.ref] = []

    def execute(self, blob, mode):
        ballast = bytearray(8 * MB)
        Exhaust.held.append(weakref.ref(_Holder(ballast)))
        if mode == 0:
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")
        if mode == 1:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:116] . DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)")
        raise MemoryError()


class _Holder:
    """A weak-referenceable owner of the ballast; alive as long as the failed node's frame is."""

    def __init__(self, payload: bytearray) -> None:
        self.payload = payload
        self.self_cycle = self  # only the cycle collector frees it once the frame lets go


def registry() -> NodeRegistry:
    reg = NodeRegistry()
    for cls in [*BASE, Blob, Twice, Opaque, BrokenEstimate, Sink, Exhaust]:
        reg.register(cls)
    return reg


def validated(prompt):
    validation = validate_prompt(prompt, registry(), None)
    assert validation.ok, validation.response()
    return validation.prompt


def chain(*classes, size=4):
    prompt = {"1": {"class_type": "Blob", "inputs": {"size": size}}}
    for i, cls in enumerate(classes, start=2):
        prompt[str(i)] = {"class_type": cls, "inputs": {"blob": [str(i - 1), 0]}}
    prompt[str(len(classes) + 2)] = {"class_type": "Sink", "inputs": {"blob": [str(len(classes) + 1), 0]}}
    return prompt


def test_shapes_propagate_and_outputs_accumulate():
    estimate = estimate_prompt(validated(chain("Twice", "Twice")), EstimateContext())
    first, second, third = (estimate.nodes[n] for n in ("1", "2", "3"))
    assert (first.kept_bytes, second.kept_bytes, third.kept_bytes) == (4 * MB, 8 * MB, 16 * MB)
    assert (first.held_before, second.held_before, third.held_before) == (0, 4 * MB, 12 * MB)
    assert (third.device_bytes, third.host_bytes) == (16 * MB, 4 * MB)
    assert estimate.device_peak() == (16 * MB, third)
    assert estimate.host_peak() == (12 * MB + 4 * MB + 16 * MB, third)
    # one memory: the larger of a node's transients, its outputs, and what earlier outputs hold
    assert estimate.combined() == (12 * MB + 16 * MB + 16 * MB, third)
    assert third.what == "" and third.advice == Node.memory_advice and first.what == "4 MB"


def test_an_undeclared_node_contributes_nothing_and_hides_shapes_downstream():
    estimate = estimate_prompt(validated(chain("Twice", "Opaque", "Twice")), EstimateContext())
    assert set(estimate.nodes) == {"1", "2"}  # the second Twice cannot know its input


def test_a_failing_hook_counts_as_unknown(caplog):
    estimate = estimate_prompt(validated(chain("BrokenEstimate", "Twice")), EstimateContext())
    assert set(estimate.nodes) == {"1"}
    assert "BrokenEstimate" in caplog.text and "counted as unknown" in caplog.text


def test_context_device_type_and_formatting():
    assert EstimateContext(device="cuda:1").device_type == "cuda"
    assert [format_bytes(n) for n in (512, 3 * MB // 2, 96 << 30, 3 << 40)] == \
        ["512 B", "1.5 MiB", "96.0 GiB", "3.0 TiB"]
    assert TensorSpec((1, 3, 16384, 16384), 4).label() == "1×3×16384×16384"


def test_out_of_memory_is_recognised_by_name_and_message():
    assert is_out_of_memory(OutOfMemoryError("x"))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 bytes"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    wrapped = ValueError("decoding failed")
    wrapped.__cause__ = MemoryError()
    assert is_out_of_memory(wrapped)
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("bad value"))


def run_exhaust(executor, mode, prompt_id):
    prompt = {"1": {"class_type": "Blob", "inputs": {"size": 1}},
              "2": {"class_type": "Exhaust", "inputs": {"blob": ["1", 0], "mode": mode}},
              "3": {"class_type": "Sink", "inputs": {"blob": ["2", 0]}}}
    events = []
    result = executor.execute(validated(prompt), prompt_id, lambda e, d: events.append((e, d)))
    return result, events


def test_an_out_of_memory_node_fails_its_prompt_alone_and_memory_is_released():
    released = []
    executor = Executor(env=None, release_memory=lambda: released.append(True))
    for mode, detail in ((0, "CUDA out of memory. Tried to allocate 64.00 GiB"),
                         (1, "DefaultCPUAllocator: can't allocate memory"), (2, "MemoryError")):
        Exhaust.held.clear()
        result, events = run_exhaust(executor, mode, f"oom{mode}")
        assert result.status == "error"
        message = result.error["exception_message"]
        assert message.startswith(f"Exhaust (node 2) ran out of memory ({detail}")
        assert "To make it fit: use a smaller blob." in message
        assert next(d for e, d in events if e == "execution_error")["exception_message"] == message
        assert result.error["node_id"] == "2" and result.error["node_type"] == "Exhaust"
        assert Exhaust.held and Exhaust.held[0]() is None  # the failed node's frame no longer holds its ballast
    assert released == [True, True, True]
    ok = executor.execute(validated(chain("Twice", size=1)), "next")  # the next prompt runs on the same executor,
    assert ok.status == "success" and ok.executed == ["2", "3"] and ok.cached == ["1"]  # resuming from the cache


def test_release_defaults_to_the_environments_unload_and_other_errors_release_nothing():
    class Env:
        unloads = 0

        def unload_models(self):
            Env.unloads += 1

    executor = Executor(env=Env())
    result, _ = run_exhaust(executor, 0, "a")
    assert result.status == "error" and Env.unloads == 1
    failing = {"1": {"class_type": "Number", "inputs": {"value": 1}},
               "2": {"class_type": "Fail", "inputs": {"x": ["1", 0]}},
               "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}
    other = executor.execute(validated(failing), "b")  # an ordinary error: message untouched, nothing released
    assert other.status == "error" and other.error["exception_message"] == "boom on 1"
    assert Env.unloads == 1
