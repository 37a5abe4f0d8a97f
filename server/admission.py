"""Memory admission control: a prompt whose estimated peak memory exceeds the budget of the device it will
run on is refused when it is submitted, with a 400 in ComfyUI's error JSON that names the node, the size and
how to make it fit, instead of being accepted and then growing until the machine swaps or the kernel kills
the server.

The estimate comes from graph.memory_estimate (shapes propagated through the validated graph, each node
declaring its own needs). The budget is `--max-prompt-memory`: a size ("4GB", "512MB", binary units), a
fraction of the device's memory ("0.5"), or "off"; by default 75% of it. On a CPU that is the RAM, which
holds everything. On a GPU it is the GPU's memory, for the nodes' working tensors there, while the outputs
the executor keeps on the host are held to 75% of the RAM. With several devices the smallest one counts,
since any worker may take the prompt. With Ray workers the local machine says nothing about the actors'
devices, so only an explicit `--max-prompt-memory` applies there.
"""

from __future__ import annotations

import argparse
import logging
import re
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import networkx as nx
from aiohttp import web

from graph.memory_estimate import EstimateContext, NodeMemory, estimate_prompt, format_bytes
from graph.validation import ValidatedPrompt, Validation, error
from nodes.environment import ram_bytes

if TYPE_CHECKING:
    from server.state import ServerState

log = logging.getLogger(__name__)

DEFAULT_FRACTION = 0.75
OFF = ("off", "none", "no", "false")
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class MemoryLimit:
    """What `--max-prompt-memory` says: bytes, a fraction of the device's memory, or neither (off)."""

    bytes: int | None = None
    fraction: float | None = None

    def of(self, total: int) -> int | None:
        """The limit in bytes on a device of `total` bytes; None when off."""
        if self.bytes is not None:
            return self.bytes
        return int(total * self.fraction) if self.fraction is not None else None


def parse_memory_limit(text: str | None) -> MemoryLimit:
    """`4GB`, `512MB`, `1.5GiB`, `1073741824` (bytes), a fraction `0.5` of the device (at most 1), or `off`;
    None is the default, 75% of the device. Units are binary: 1 GB here is 1024³ bytes."""
    if text is None:
        return MemoryLimit(fraction=DEFAULT_FRACTION)
    if text.strip().lower() in OFF:
        return MemoryLimit()
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"expected a size such as 4GB or 512MB, a fraction such as 0.5, or 'off'; got {text!r}")
    number, unit, suffix = float(match.group(1)), match.group(2).lower(), match.group(3)
    if not unit and not suffix and number <= 1:
        if number <= 0:
            raise ValueError(f"a fraction of the device's memory must be above 0, got {text!r}")
        return MemoryLimit(fraction=number)
    size = int(number * _UNITS[unit])
    if size < 1 << 20:
        raise ValueError(f"{text!r} is less than 1 MB; no prompt fits in that")
    return MemoryLimit(bytes=size)


def memory_limit_option(text: str) -> str:
    """argparse `type` of --max-prompt-memory: checks the text, keeps it as written (ServerConfig holds it)."""
    try:
        parse_memory_limit(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


@dataclass(frozen=True)
class Budget:
    """The limits a prompt is held to: `limit` for the device (on a CPU: for everything), `host_limit` for
    the host's RAM when the device is a GPU (None on a CPU, where one memory holds both)."""

    device: str
    limit: int
    host_limit: int | None = None


def device_budget(env: Any, limit: MemoryLimit) -> Budget | None:
    """The budget on the smallest of the environment's devices (the ones the workers run on)."""
    devices = env.device_stats()
    smallest = min(devices, key=lambda d: d["vram_total"])
    total_ram = ram_bytes()[0]
    if smallest["type"] == "cpu":
        device_limit = limit.of(total_ram)
        return None if device_limit is None else Budget("cpu", device_limit)
    device_limit = limit.of(smallest["vram_total"])
    if device_limit is None:
        return None
    device = smallest["type"] if smallest.get("index") is None else f"{smallest['type']}:{smallest['index']}"
    return Budget(device, device_limit, int(total_ram * DEFAULT_FRACTION))


@dataclass(frozen=True)
class Overrun:
    """One node that would not fit: where the prompt's memory passes the limit."""

    node_id: str
    node_type: str
    message: str
    needed: int
    limit: int
    device: str


def _sentence(node: NodeMemory, total: int, own: int, limit: int, where: str) -> str:
    held = total - own
    need = f"{node.node_type} (node {node.node_id}) would need about {format_bytes(own)}"
    if node.what:
        need += f" for {node.what}"
    if held > own // 10:
        need += f", with {format_bytes(held)} held by the outputs of the nodes before it: {format_bytes(total)} in all"
    return f"{need}; the limit is {format_bytes(limit)}{where}. To make it fit: {node.advice}."


def check(prompt: ValidatedPrompt, env: Any, budget: Budget) -> list[Overrun]:
    """Every node at which the prompt's estimated memory passes its budget, in dependency order (the first is
    where a run would fail; naming all says what else must change). Empty when the prompt fits."""
    estimate = estimate_prompt(prompt, EstimateContext(env, budget.device))
    overruns: dict[str, Overrun] = {}
    for node in estimate.nodes.values():
        if budget.host_limit is None:
            pools = [(node.held_before + node.combined_need(), node.combined_need(), budget.limit, "")]
        else:
            pools = [(node.device_bytes, node.device_bytes, budget.limit, f" on {budget.device}"),
                     (node.held_before + node.host_need(), node.host_need(), budget.host_limit,
                      " of the host's RAM")]
        for total, own, limit, where in pools:
            if total > limit and node.node_id not in overruns:
                message = _sentence(node, total, own, limit, where)
                overruns[node.node_id] = Overrun(node.node_id, node.node_type, message, total, limit, budget.device)
    if overruns:
        log.info("refused a prompt: %s", " ".join(o.message for o in overruns.values()))
    return list(overruns.values())


def refusal_body(overruns: list[Overrun], prompt: ValidatedPrompt,
                 node_errors: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """ComfyUI's 400 body: the prompt-level error, and an entry in node_errors for each node that would not fit
    (next to any errors validation reported for outputs it dropped)."""
    errors = dict(node_errors or {})
    for overrun in overruns:
        node_error = error("memory_limit_exceeded", "Prompt would need more memory than this server allows",
                           overrun.message, estimated_bytes=overrun.needed, limit_bytes=overrun.limit,
                           device=overrun.device)
        dependents = [o for o in prompt.outputs
                      if o == overrun.node_id or overrun.node_id in nx.ancestors(prompt.graph, o)]
        errors[overrun.node_id] = {"errors": [node_error], "dependent_outputs": dependents,
                                   "class_type": overrun.node_type}
    details = "\n".join(o.message for o in overruns)
    return {"error": error("prompt_outputs_failed_validation", "Prompt outputs failed validation", details),
            "node_errors": errors}


_budgets: weakref.WeakKeyDictionary[Any, Budget | None] = weakref.WeakKeyDictionary()
_budgets_lock = threading.Lock()


def server_budget(state: ServerState) -> Budget | None:
    """The server's budget, worked out once (device totals do not change while it runs)."""
    with _budgets_lock:
        if state in _budgets:
            return _budgets[state]
    flag = state.config.max_prompt_memory
    if isinstance(state.config.workers, str) and flag is None:
        log.info("--workers %s: prompts are not checked against a memory budget without --max-prompt-memory",
                 state.config.workers)
        budget = None
    else:
        budget = device_budget(state.env, parse_memory_limit(flag))
    if budget is not None:
        log.info("prompts are refused above an estimated %s on %s", format_bytes(budget.limit), budget.device)
    with _budgets_lock:
        _budgets[state] = budget
    return budget


def refuse(state: ServerState, validation: Validation) -> web.Response | None:
    """POST /prompt's check after validation: the 400 response of a prompt over budget, else None."""
    budget = server_budget(state)
    if budget is None or validation.prompt is None:
        return None
    overruns = check(validation.prompt, state.env, budget)
    if not overruns:
        return None
    return web.json_response(refusal_body(overruns, validation.prompt, validation.node_errors), status=400)


def cli_refusal(prompt: ValidatedPrompt, env: Any, flag: str | None) -> list[str]:
    """`latentloom run` / `validate`: a line per node that would not fit (none when the workflow fits)."""
    budget = device_budget(env, parse_memory_limit(flag))
    if budget is None:
        return []
    return [f"node {o.node_id} ({o.node_type}): {o.message}" for o in check(prompt, env, budget)]
