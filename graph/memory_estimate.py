"""How much memory a validated prompt will need, estimated before it runs from what its nodes declare; and
how to recognise a node that ran out of memory anyway (`is_out_of_memory`, for the executor).

Each node may declare `estimate_memory(inputs, shapes, context)` (see graph.node): given its literal inputs
and the shapes of its linked inputs, it returns the shapes of its outputs and the memory it needs while it
runs. This module only orchestrates: it walks the graph in dependency order, hands every node the shapes
its sources produced, and adds the results up the way the executor holds memory. It knows nothing about
what a LATENT or an IMAGE is; shapes are `TensorSpec`s, or dicts and tuples of them, that nodes agree on.

Two pools are counted apart, because on a GPU they are different memories:
- host memory: node outputs (the executor keeps every output of a prompt until the prompt ends, so they
  accumulate) plus a node's transient host tensors;
- device memory: a node's working tensors on the compute device (activations of a model, attention).
On a CPU both pools are the same RAM (`PromptEstimate.combined`). A node's device and host transients are
taken not to coincide (a decode's activations are gone before its result is converted), so one memory
needs the larger of the two, plus the node's outputs, plus what earlier outputs hold.

A node without a declaration, or whose inputs have unknown shapes, contributes nothing: an estimate that
guesses is worse than none, because it would refuse prompts that fit.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from graph.node import Node
from graph.validation import ValidatedPrompt

log = logging.getLogger(__name__)

GIB = 1 << 30


@dataclass(frozen=True)
class TensorSpec:
    """The shape and element size of a tensor that will exist: what flows through IMAGE, MASK and LATENT
    sockets during estimation."""

    shape: tuple[int, ...]
    itemsize: int = 4

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    def label(self) -> str:
        """`1×3×16384×16384`, as error messages show a shape."""
        return "×".join(str(d) for d in self.shape)


@dataclass(frozen=True)
class MemoryEstimate:
    """What a node declares about one run.

    `outputs`: one shape per output slot (a TensorSpec, a dict or tuple of them, anything the consuming
    nodes understand), or None where unknown. `device_bytes`: working memory on the compute device.
    `host_bytes`: transient host memory beyond the outputs (copies made while converting results).
    `kept_bytes`: how much of the outputs is new memory; None means all of it (a node that passes a
    tensor through, e.g. adds a mask to a latent, keeps only what it adds). `what` names the big thing
    for messages ("a 1×3×16384×16384 image"); `advice` says how to make it smaller (default: the class's
    `memory_advice`)."""

    outputs: tuple[Any, ...] = ()
    device_bytes: int = 0
    host_bytes: int = 0
    kept_bytes: int | None = None
    what: str = ""
    advice: str = ""

    def new_output_bytes(self) -> int:
        return spec_bytes(self.outputs) if self.kept_bytes is None else self.kept_bytes


@dataclass
class EstimateContext:
    """What estimates may depend on besides the graph: the environment (to read a file's header) and the
    device the prompt will run on ("cpu", "cuda", "cuda:1", "mps")."""

    env: Any = None
    device: str = "cpu"

    @property
    def device_type(self) -> str:
        return self.device.partition(":")[0]


@dataclass(frozen=True)
class NodeMemory:
    """One node's estimate, with what the prompt holds when it runs."""

    node_id: str
    node_type: str
    device_bytes: int
    host_bytes: int  # transient host memory
    kept_bytes: int  # new memory in its outputs, held until the prompt ends
    held_before: int  # host bytes of outputs of the nodes before it
    what: str
    advice: str

    def host_need(self) -> int:
        return self.host_bytes + self.kept_bytes

    def combined_need(self) -> int:
        """What the node itself needs when device and host are one memory (what "would need" says on a CPU)."""
        return max(self.device_bytes, self.host_bytes) + self.kept_bytes


@dataclass
class PromptEstimate:
    nodes: dict[str, NodeMemory] = field(default_factory=dict)  # the nodes that declared an estimate
    shapes: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # every node's output shapes (None: unknown)

    def host_peak(self) -> tuple[int, NodeMemory | None]:
        """(bytes, node at which the host pool peaks)."""
        return _peak(self.nodes.values(), lambda n: n.held_before + n.host_need())

    def device_peak(self) -> tuple[int, NodeMemory | None]:
        return _peak(self.nodes.values(), lambda n: n.device_bytes)

    def combined(self) -> tuple[int, NodeMemory | None]:
        """Both pools in one memory (a CPU): outputs held so far plus the node's own needs."""
        return _peak(self.nodes.values(), lambda n: n.held_before + n.combined_need())


def _peak(nodes: Iterable[NodeMemory], measure: Any) -> tuple[int, NodeMemory | None]:
    best, at = 0, None
    for node in nodes:
        value = measure(node)
        if value > best:
            best, at = value, node
    return best, at


def spec_bytes(value: Any) -> int:
    """Bytes of the tensors a shape describes: TensorSpecs, possibly inside dicts, lists or tuples."""
    if isinstance(value, TensorSpec):
        return value.nbytes
    if isinstance(value, dict):
        return sum(spec_bytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(spec_bytes(v) for v in value)
    return 0


def estimate_prompt(prompt: ValidatedPrompt, context: EstimateContext) -> PromptEstimate:
    """Propagate shapes through the prompt in dependency order and collect every node's needs.

    A hook that raises is logged and treated as unknown: an estimate must never be why a valid prompt
    fails."""
    result = PromptEstimate()
    shapes = result.shapes
    held = 0
    for node_id in nx.topological_sort(prompt.graph):
        call, cls = prompt.nodes[node_id], prompt.classes[node_id]
        linked = {name: _slot(shapes.get(src), slot) for name, (src, slot) in call.links.items()}
        try:
            estimate = cls.estimate_memory(dict(call.literals), linked, context)
        except Exception:
            log.exception("node %s (%s): its memory estimate failed; counted as unknown", node_id, cls.node_type)
            estimate = None
        if estimate is None:
            shapes[node_id] = (None,) * len(cls.outputs)
            continue
        outputs = tuple(estimate.outputs) + (None,) * (len(cls.outputs) - len(estimate.outputs))
        shapes[node_id] = outputs[:len(cls.outputs)]
        kept = max(0, int(estimate.new_output_bytes()))
        result.nodes[node_id] = NodeMemory(
            node_id, cls.node_type, max(0, int(estimate.device_bytes)), max(0, int(estimate.host_bytes)), kept, held,
            estimate.what, estimate.advice or cls.memory_advice)
        held += kept
    return result


def _slot(outputs: tuple[Any, ...] | None, slot: int) -> Any:
    if outputs is None or not 0 <= slot < len(outputs):
        return None
    return outputs[slot]


def format_bytes(n: float) -> str:
    """`96.0 GiB`, `512.0 MiB`: binary units, one decimal."""
    for unit, size in (("TiB", 1 << 40), ("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


# Recognised by class name along the MRO, because graph/ must not import torch: torch.OutOfMemoryError (which
# torch.cuda.OutOfMemoryError is) and any framework's class of that name. RuntimeErrors are recognised by the
# messages PyTorch's allocators give when they raise a plain RuntimeError instead (CPU, MPS, older CUDA).
_OOM_CLASS_NAMES = frozenset({"OutOfMemoryError"})
_OOM_MESSAGES = ("DefaultCPUAllocator: can't allocate memory", "CUDA out of memory", "MPS backend out of memory",
                 "out of memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for an allocation failure: MemoryError, a torch OutOfMemoryError, or a RuntimeError with an
    allocator's message; also when such an error is the explicit cause of `exc` (a node that re-raised)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, MemoryError) or any(k.__name__ in _OOM_CLASS_NAMES for k in type(current).__mro__):
            return True
        if isinstance(current, RuntimeError) and any(m in str(current) for m in _OOM_MESSAGES):
            return True
        current = current.__cause__
    return False


def out_of_memory_message(cls: type[Node], node_id: str, exc: BaseException) -> str:
    """What a user reads when a node ran out of memory: which node, the allocator's own words (they say how
    much it tried to allocate), and the node's advice."""
    detail = (str(exc) or type(exc).__name__).strip().splitlines()[0]
    detail = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", detail)  # c10's source location, noise to a user
    if len(detail) > 300:
        detail = detail[:297] + "..."
    return f"{cls.node_type} (node {node_id}) ran out of memory ({detail}). To make it fit: {cls.memory_advice}."
