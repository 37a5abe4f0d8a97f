"""Validation of a workflow before anything runs, with errors in ComfyUI's JSON shape.

The result says which output nodes may run: an output whose branch holds an invalid node is dropped,
while valid outputs still run. Each error names the node, the input and the value. The caller's JSON is
never mutated: literals are cast into a new `ValidatedPrompt`. A combo whose options callable has
`explain_missing(env, value)` (the lists of files) says in a not-in-list error's `details` where the value was
looked for and what to do, in place of the list; the error's `type` stays ComfyUI's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from graph.node import Input, Node
from graph.registry import NodeRegistry
from graph.types import BOOLEAN, COMBO, FLOAT, INT, STRING, WIDGET_TYPES, types_compatible
from graph.workflow import NodeCall, WorkflowFormatError, build_graph, parse_api_prompt


def error(type_: str, message: str, details: str = "", **extra_info: Any) -> dict[str, Any]:
    return {"type": type_, "message": message, "details": details, "extra_info": extra_info}


@dataclass
class ValidatedPrompt:
    """What the executor runs: the valid nodes with cast literals, the outputs to run, the graph."""

    nodes: dict[str, NodeCall]
    classes: dict[str, type[Node]]
    outputs: list[str]
    graph: nx.DiGraph
    api_prompt: dict[str, Any]  # the original JSON, for the hidden `prompt` input


@dataclass
class Validation:
    prompt: ValidatedPrompt | None
    error: dict[str, Any] | None = None
    node_errors: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    def response(self) -> dict[str, Any]:
        """The 400 body ComfyUI clients expect: `{"error": ..., "node_errors": ...}`."""
        return {"error": self.error, "node_errors": self.node_errors}


class _Invalid(Exception):
    def __init__(self, err: dict[str, Any]) -> None:
        super().__init__(err["message"])
        self.err = err


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _cast(value: Any, spec: Input) -> Any:
    """Cast a literal to the input's declared type; raise ValueError/TypeError if it cannot be."""
    t = spec.type
    if t == INT:
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, int):
            return value
        number = float(value) if isinstance(value, float | str) else None
        if number is None or not math.isfinite(number) or not number.is_integer():
            raise ValueError(f"{value!r} is not an integer")
        return int(value) if isinstance(value, str) and value.strip().lstrip("+-").isdigit() else int(number)
    if t == FLOAT:
        if isinstance(value, int | float | str) and not isinstance(value, bool):
            number = float(value)
            if not math.isfinite(number):
                raise ValueError(f"{value!r} is not a finite number")
            return number
        raise TypeError(f"{value!r} is not a number")
    if t == BOOLEAN:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError(f"{value!r} is not a boolean")
    if t in (STRING, COMBO):
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise TypeError(f"{value!r} is not a string")
    return value


def _check_literal(name: str, value: Any, spec: Input, env: Any) -> Any:
    config = spec.wire_config(env)
    if spec.type not in WIDGET_TYPES:
        raise _Invalid(error(
            "invalid_input_type", f"Input '{name}' of type {spec.type} must be linked to another node's output",
            f"{name}, {value!r}", input_name=name, input_config=config, received_value=value))
    try:
        cast = _cast(value, spec)
    except (TypeError, ValueError, OverflowError) as exc:
        raise _Invalid(error(
            "invalid_input_type", f"Failed to convert an input value to a {spec.type} value",
            f"{name}, {value!r}, {exc}", input_name=name, input_config=config, received_value=value,
            exception_message=str(exc))) from None
    if spec.type in (INT, FLOAT):
        if spec.min is not None and cast < spec.min:
            raise _Invalid(error("value_smaller_than_min", f"Value {cast} smaller than min of {spec.min}",
                                 name, input_name=name, input_config=config, received_value=cast))
        if spec.max is not None and cast > spec.max:
            raise _Invalid(error("value_bigger_than_max", f"Value {cast} bigger than max of {spec.max}",
                                 name, input_name=name, input_config=config, received_value=cast))
    if spec.type == COMBO:
        options = spec.resolve_options(env)
        if cast not in options:
            shown = options if len(options) <= 20 else f"(list of length {len(options)})"
            # Options that list files explain a missing one: where it was looked for, what to do.
            explain = getattr(spec.options, "explain_missing", None)
            explained = explain(env, cast) if callable(explain) else None
            details = f"{name}: '{cast}' {explained}" if explained else f"{name}: '{cast}' not in {shown}"
            raise _Invalid(error("value_not_in_list", "Value not in list", details,
                                 input_name=name, input_config=config if len(options) <= 20 else None,
                                 received_value=cast))
    return cast


def _check_node(call: NodeCall, cls: type[Node], calls: dict[str, NodeCall],
                registry: NodeRegistry, env: Any) -> tuple[NodeCall, list[dict[str, Any]]]:
    """Validate one node's own inputs; returns the cast NodeCall and the errors found."""
    errors: list[dict[str, Any]] = []
    literals: dict[str, Any] = {}
    links: dict[str, tuple[str, int]] = {}
    for spec in cls.inputs:
        name = spec.name
        try:
            if name in call.links:
                src, slot = call.links[name]
                src_call = calls.get(src)
                src_cls = registry.get(src_call.class_type) if src_call else None
                if src_cls is None:
                    raise _Invalid(error("bad_linked_input", "Bad linked input, the linked node does not exist",
                                         f"{name}: node '{src}' is not in the workflow",
                                         input_name=name, received_value=[src, slot]))
                if not 0 <= slot < len(src_cls.outputs):
                    raise _Invalid(error(
                        "bad_linked_input", "Bad linked input, output index out of range",
                        f"{name}: node '{src}' ({src_cls.node_type}) has {len(src_cls.outputs)} outputs, "
                        f"not an output {slot}", input_name=name, received_value=[src, slot]))
                received = src_cls.outputs[slot].type
                if not types_compatible(received, spec.type):
                    raise _Invalid(error(
                        "return_type_mismatch", "Return type mismatch between linked nodes",
                        f"{name}, received_type({received}) mismatch input_type({spec.type})",
                        input_name=name, input_config=spec.wire_config(env), received_type=received,
                        linked_node=[src, slot]))
                links[name] = (src, slot)
            elif name in call.bad_links:
                raise _Invalid(error("bad_linked_input",
                                     "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                                     f"{name}: {call.bad_links[name]!r}", input_name=name,
                                     received_value=call.bad_links[name]))
            elif name in call.literals:
                literals[name] = _check_literal(name, call.literals[name], spec, env)
            elif not spec.optional:
                raise _Invalid(error("required_input_missing", "Required input is missing", name,
                                     input_name=name))
        except _Invalid as exc:
            errors.append(exc.err)
    if not errors:
        reason = cls.validate_inputs(dict(literals), env)
        if reason is not None and reason is not True:
            errors.append(error("custom_validation_failed", "Custom validation failed for node",
                                f"{call.id} - {reason}"))
    checked = NodeCall(call.id, call.class_type, literals, links, title=call.title)
    return checked, errors


def validate_prompt(prompt: Any, registry: NodeRegistry, env: Any = None,
                    targets: list[str] | None = None) -> Validation:
    """Validate an API-format workflow. `targets` restricts which output nodes run (None: all)."""
    if prompt is None:
        return Validation(None, error("no_prompt", "No prompt provided", "No prompt provided"))
    try:
        calls = parse_api_prompt(prompt)
    except WorkflowFormatError as exc:
        return Validation(None, error("invalid_prompt", "Invalid prompt", str(exc)))
    classes: dict[str, type[Node]] = {}
    for node_id, call in calls.items():
        if not call.class_type:
            return Validation(None, error(
                "invalid_prompt", "Cannot execute because a node is missing the class_type property.",
                f"Node ID '#{node_id}'"))
        cls = registry.get(call.class_type)
        if cls is None:
            return Validation(None, error(
                "invalid_prompt", f"Cannot execute because node {call.class_type} does not exist.",
                f"Node ID '#{node_id}'"))
        classes[node_id] = cls

    outputs = [i for i, cls in classes.items() if cls.output_node]
    if targets is not None:
        wanted = {str(t) for t in targets}
        outputs = [i for i in outputs if i in wanted]
    if not outputs:
        return Validation(None, error("prompt_no_outputs", "Prompt has no outputs", ""))

    graph = build_graph(calls)
    needed = set(outputs)
    for out in outputs:
        needed |= nx.ancestors(graph, out)
    sub = graph if len(needed) == len(calls) else build_graph({i: calls[i] for i in needed})

    node_errors: dict[str, list[dict[str, Any]]] = {}
    invalid: set[str] = set()
    for component in nx.strongly_connected_components(sub):
        if len(component) > 1 or any(sub.has_edge(n, n) for n in component):
            members = sorted(component, key=_id_order)
            for n in members:
                node_errors.setdefault(n, []).append(error(
                    "dependency_cycle", "Dependency cycle detected",
                    "cycle through nodes " + ", ".join(members), cycle=members))
            invalid |= component

    checked: dict[str, NodeCall] = {}
    crashed: set[str] = set()
    for node_id in needed - invalid:
        try:
            checked[node_id], errs = _check_node(calls[node_id], classes[node_id], calls, registry, env)
        except Exception as exc:  # a node's declaration or hook raised
            crashed.add(node_id)
            errs = [error("exception_during_validation", "Exception when validating node",
                          f"{type(exc).__name__}: {exc}")]
        if errs:
            node_errors.setdefault(node_id, []).extend(errs)
            invalid.add(node_id)

    in_cycles = {n for n in invalid if _in_cycle(node_errors[n])}
    acyclic = sub if not in_cycles else build_graph({i: calls[i] for i in needed - in_cycles})
    for node_id in nx.topological_sort(acyclic):
        upstream = set(sub.predecessors(node_id))
        if upstream & crashed and node_id not in crashed:
            node_errors.setdefault(node_id, []).append(error(
                "exception_during_inner_validation", "Exception when validating inner node",
                ", ".join(sorted(upstream & crashed, key=_id_order))))
        if upstream & invalid:
            invalid.add(node_id)

    valid_outputs = [o for o in outputs if o not in invalid]
    response_errors = {}
    for node_id, errs in node_errors.items():
        dependents = [o for o in outputs if o == node_id or node_id in nx.ancestors(sub, o)]
        response_errors[node_id] = {"errors": errs, "dependent_outputs": dependents,
                                    "class_type": classes[node_id].node_type}
    if not valid_outputs:
        lines = [f"{e['message']}: {e['details']}" for errs in node_errors.values() for e in errs]
        return Validation(None, error("prompt_outputs_failed_validation", "Prompt outputs failed validation",
                                      "\n".join(lines)), response_errors)

    runnable = set(valid_outputs)
    for out in valid_outputs:
        runnable |= nx.ancestors(sub, out)
    nodes = {i: checked[i] for i in runnable}
    validated = ValidatedPrompt(nodes=nodes, classes={i: classes[i] for i in runnable}, outputs=valid_outputs,
                                graph=build_graph(nodes), api_prompt=prompt)
    return Validation(validated, None, response_errors)


def _in_cycle(errs: list[dict[str, Any]]) -> bool:
    return any(e["type"] == "dependency_cycle" for e in errs)


def _id_order(node_id: str) -> tuple[int, int | str]:
    return (0, int(node_id)) if node_id.isdigit() else (1, node_id)
