"""ComfyUI's node interface, version 1, translated at registration into our own declaration.

A ComfyUI node pack declares a node as a plain class: `INPUT_TYPES()` (required / optional / hidden),
`RETURN_TYPES`, `RETURN_NAMES`, `FUNCTION`, `CATEGORY`, `OUTPUT_NODE`, `INPUT_IS_LIST`, `OUTPUT_IS_LIST`,
`IS_CHANGED`, `VALIDATE_INPUTS`, `check_lazy_status`, `DESCRIPTION`, `OUTPUT_TOOLTIPS`, `DEPRECATED`,
`EXPERIMENTAL` and `NOT_IDEMPOTENT`. `translate_v1` turns such a class into a `Node` subclass, so that the engine
stays one engine: validation, caching, lazy inputs, lists and `ui` results work the same for both kinds.

What /object_info shows for a pack's node is what the pack declared, option for option (`PackInput` keeps
the pack's own dict), so the front end draws the widgets the pack expects (`image_upload`, `dynamicPrompts`,
`display`, ...). Facts of the interface come from ComfyUI's public documentation (docs.comfy.org, "custom
nodes"); the code is ours.

Where we differ: `VALIDATE_INPUTS` that asks for `input_types` runs just before the node runs (our
validation does not see the types of linked outputs), so its refusal is an execution error, not a 400.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from graph.node import HIDDEN_INPUTS, Input, Node, NodeOutput, Output, wire_module
from graph.types import ANY, BOOLEAN, COMBO, FLOAT, INT, STRING

log = logging.getLogger(__name__)

# ComfyUI's hidden input kinds and the hidden input of ours that carries the same value.
HIDDEN_KINDS = {"PROMPT": "prompt", "EXTRA_PNGINFO": "extra_pnginfo", "UNIQUE_ID": "unique_id",
                "DYNPROMPT": "prompt"}
WIDGET_NAMES = {INT, FLOAT, STRING, BOOLEAN, COMBO}


class PackNodeError(ValueError):
    """A pack's node declaration that cannot be translated, or a run that broke the declaration."""


@dataclass(frozen=True)
class PackRun:
    """What runs now: the pack's node and the execution context, for the compatibility layer's progress bars,
    interrupt checks and `PromptServer.send_sync` (they have no argument that could carry it)."""

    node_type: str
    pack: str
    context: Any


_CURRENT: contextvars.ContextVar[PackRun | None] = contextvars.ContextVar("latentloom_pack_run", default=None)


def current_run() -> PackRun | None:
    """The pack node running in this thread, or None outside one."""
    return _CURRENT.get()


@contextmanager
def running(run: PackRun) -> Iterator[None]:
    token = _CURRENT.set(run)
    try:
        yield
    finally:
        _CURRENT.reset(token)


@dataclass(frozen=True)
class PackInput(Input):
    """An input as a pack declared it. `wire` is the pack's options dict, shown verbatim; `wire_type` its type
    string (None for a combo declared as a list, whose options `options` reads fresh each time)."""

    wire: Any = None
    wire_type: str | None = None

    def wire_config(self, env: Any) -> dict[str, Any]:
        return dict(self.wire or {})

    def wire_spec(self, env: Any) -> list[Any]:
        config = self.wire_config(env)
        if self.wire_type is None:
            return [self.resolve_options(env), config]
        if self.wire_type == COMBO and self.options is not None:
            config["options"] = self.resolve_options(env)
        return [self.wire_type, config]


def _plain(kind: str) -> str:
    """A type name as a plain str. Packs declare "any" types as str subclasses whose `==` is always true (so
    that ComfyUI's type checks pass them); compared as they are, they would equal COMBO, INT, anything."""
    return str.__str__(kind)


def _signature(fn: Callable[..., Any]) -> tuple[set[str], bool]:
    """The keyword names a pack's function takes, and whether it takes **kwargs."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return set(), True
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def _input_types(pack_cls: type) -> dict[str, Any]:
    declared = pack_cls.INPUT_TYPES()
    if not isinstance(declared, dict):
        raise PackNodeError(f"INPUT_TYPES() returned {type(declared).__name__}, not a dict")
    return declared


def _combo_reader(pack_cls: type, section: str, name: str) -> Callable[[Any], list[str]]:
    """A combo's options, read from INPUT_TYPES() each time (packs list files that come and go)."""

    def options(env: Any) -> list[str]:
        spec = _input_types(pack_cls).get(section, {}).get(name)
        if not spec:
            return []
        kind = spec[0]
        if isinstance(kind, list | tuple):
            return [str(o) if not isinstance(o, str) else o for o in kind]
        config = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        return list(config.get("options", []))

    return options


def _translate_input(pack_cls: type, section: str, name: str, spec: Any, skip_checks: bool,
                     skip_types: bool) -> PackInput:
    """One INPUT_TYPES entry. `skip_checks`: VALIDATE_INPUTS takes this input, so ComfyUI's default checks (range,
    combo membership) do not apply; `skip_types`: VALIDATE_INPUTS takes `input_types`, so links of any type do."""
    if isinstance(spec, str):
        spec = (spec,)
    if not isinstance(spec, list | tuple) or not spec:
        raise PackNodeError(f"input {name!r}: expected (TYPE, {{options}}), got {spec!r}")
    kind = spec[0]
    config = spec[1] if len(spec) > 1 else {}
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise PackNodeError(f"input {name!r}: options must be a dict, got {type(config).__name__}")
    optional = section == "optional"
    common = dict(default=config.get("default"), tooltip=str(config.get("tooltip") or ""), optional=optional,
                  lazy=bool(config.get("lazy")), force_input=bool(config.get("forceInput")),
                  multiline=bool(config.get("multiline")), wire=dict(config))
    if isinstance(kind, list | tuple):  # a combo declared by its options
        return PackInput(name, STRING if skip_checks else COMBO, options=_combo_reader(pack_cls, section, name),
                         wire_type=None, **common)
    if not isinstance(kind, str):
        raise PackNodeError(f"input {name!r}: type must be a string or a list of options, got {kind!r}")
    kind = _plain(kind)
    if kind == COMBO:
        return PackInput(name, STRING if skip_checks else COMBO, options=_combo_reader(pack_cls, section, name),
                         wire_type=COMBO, **common)
    numbers = {} if skip_checks or kind not in (INT, FLOAT) else \
        {key: config.get(key) for key in ("min", "max") if isinstance(config.get(key), int | float)}
    # With `input_types`, links of any type are the node's to judge: such an input is checked as "*" unless it
    # is a widget that takes literals (our validation casts those by their type, and would refuse "*" literals).
    widget = kind in WIDGET_NAMES and not config.get("forceInput")
    # A V3 MatchType socket takes any type here, as ComfyUI's backend validation treats it (its front end keeps one
    # template's sockets of one type).
    check_type = ANY if (skip_types and not widget) or kind == "COMFY_MATCHTYPE_V3" else kind
    return PackInput(name, check_type, wire_type=kind, **numbers, **common)


def _outputs(pack_cls: type) -> list[Output]:
    types = getattr(pack_cls, "RETURN_TYPES", ())
    if isinstance(types, str) or not isinstance(types, list | tuple):
        raise PackNodeError(f"RETURN_TYPES must be a tuple, got {types!r}")
    names = getattr(pack_cls, "RETURN_NAMES", None) or ()
    is_list = getattr(pack_cls, "OUTPUT_IS_LIST", None) or ()
    tooltips = getattr(pack_cls, "OUTPUT_TOOLTIPS", None) or ()
    outputs = []
    for i, kind in enumerate(types):
        if isinstance(kind, list | tuple):  # an output that feeds combos (ComfyUI shows it as COMBO)
            kind = COMBO
        if not isinstance(kind, str):
            raise PackNodeError(f"RETURN_TYPES[{i}] must be a type name, got {kind!r}")
        kind = _plain(kind)
        outputs.append(Output(kind, names[i] if i < len(names) else None,
                              is_list=bool(is_list[i]) if i < len(is_list) else False,
                              tooltip=tooltips[i] if i < len(tooltips) else ""))
    return outputs


def translate_v1(pack_cls: type, node_type: str, display_name: str | None = None, pack: str = "") -> type[Node]:
    """A `Node` subclass that declares and runs `pack_cls`, a ComfyUI V1 node class registered as `node_type`.

    Raises PackNodeError naming what is wrong when the declaration cannot be read."""
    function = getattr(pack_cls, "FUNCTION", None)
    if not isinstance(function, str) or not callable(getattr(pack_cls, function, None)):
        raise PackNodeError(f"{node_type}: FUNCTION {function!r} does not name a method of {pack_cls.__name__}")
    validate = getattr(pack_cls, "VALIDATE_INPUTS", None)
    validate_names, validate_all = _signature(validate) if callable(validate) else (set(), False)
    late_validation = "input_types" in validate_names
    declared = _input_types(pack_cls)
    inputs: list[Input] = []
    for section in ("required", "optional"):
        for name, spec in (declared.get(section) or {}).items():
            skip = callable(validate) and (validate_all or name in validate_names)
            try:
                inputs.append(_translate_input(pack_cls, section, name, spec, skip, late_validation))
            except PackNodeError as exc:
                raise PackNodeError(f"{node_type}: {exc}") from None
    hidden = dict(declared.get("hidden") or {})
    lazy_check = getattr(pack_cls, "check_lazy_status", None)
    changed = getattr(pack_cls, "IS_CHANGED", None)
    attrs: dict[str, Any] = {
        "node_type": node_type,
        "display_name": display_name or getattr(pack_cls, "DISPLAY_NAME", "") or node_type,
        "category": getattr(pack_cls, "CATEGORY", "sd") or "sd",
        "description": str(getattr(pack_cls, "DESCRIPTION", "") or ""),
        "inputs": inputs,
        "outputs": _outputs(pack_cls),
        "hidden": ("prompt", "extra_pnginfo", "unique_id", "context"),
        "output_node": bool(getattr(pack_cls, "OUTPUT_NODE", False)),
        "input_is_list": bool(getattr(pack_cls, "INPUT_IS_LIST", False)),
        "not_idempotent": bool(getattr(pack_cls, "NOT_IDEMPOTENT", False)),
        "deprecated": bool(getattr(pack_cls, "DEPRECATED", False)),
        "experimental": bool(getattr(pack_cls, "EXPERIMENTAL", False)),
        "python_module": wire_module(pack_cls.__module__),
        "pack_class": pack_cls,
        "_function": function,
        "pack": pack,
        "pack_hidden": hidden,
        "_validate": validate if callable(validate) else None,
        "_validate_names": (validate_names, validate_all),
        "_late_validation": late_validation,
        "_lazy_check": callable(lazy_check),
        "_changed": changed if callable(changed) else None,
        "__module__": pack_cls.__module__,
        "__qualname__": f"{pack_cls.__qualname__}<v1>",
    }
    return type(pack_cls.__name__, (PackNode,), attrs)


def _hashable(value: Any) -> Any:
    """IS_CHANGED's answer as a fingerprint: NaN stays NaN (always re-run), anything else by its text."""
    if isinstance(value, float) and math.isnan(value):
        return value
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return repr(value)


class PackNode(Node):
    """The base of translated ComfyUI nodes: runs the pack's class behind our declaration."""

    pack_class: type = object
    pack: str = ""
    pack_hidden: dict[str, str] = {}
    registry: Any = None  # the registry that holds this node (set at registration), for linked outputs' types
    _function = ""
    _validate: Callable[..., Any] | None = None
    _validate_names: tuple[set[str], bool] = (set(), False)
    _late_validation = False
    _lazy_check = False
    _changed: Callable[..., Any] | None = None

    def __init__(self) -> None:
        self._instance: Any = None

    @property
    def instance(self) -> Any:
        """The pack's own object, made on first use (ComfyUI's nodes take no constructor arguments)."""
        if self._instance is None:
            self._instance = self.pack_class()
        return self._instance

    @classmethod
    def info(cls, env: Any = None) -> dict[str, Any]:
        info = super().info(env)
        spec = info["input"]
        spec.pop("hidden", None)
        if cls.pack_hidden:
            spec["hidden"] = dict(cls.pack_hidden)
        info["input_order"] = {k: list(v) for k, v in spec.items()}
        return info

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any], env: Any) -> Any:
        if cls._changed is None:
            return None
        names, takes_all = _signature(cls._changed)
        kwargs = inputs if takes_all else {k: v for k, v in inputs.items() if k in names}
        return _hashable(cls._changed(**kwargs))

    @classmethod
    def validate_inputs(cls, inputs: dict[str, Any], env: Any) -> str | None:
        if cls._validate is None or cls._late_validation:
            return None
        return cls._call_validate(inputs, None)

    @classmethod
    def _call_validate(cls, inputs: dict[str, Any], input_types: dict[str, str] | None) -> str | None:
        names, takes_all = cls._validate_names
        kwargs = dict(inputs) if takes_all else {k: v for k, v in inputs.items() if k in names}
        if input_types is not None:
            kwargs["input_types"] = input_types
        for name in names - set(kwargs):  # a requested input that is not a literal: ComfyUI passes nothing
            if name != "input_types":
                kwargs.setdefault(name, None)
        answer = cls._validate(**kwargs)
        if answer is True or answer is None:
            return None
        return str(answer)

    def check_lazy_status(self, inputs: dict[str, Any]) -> list[str]:
        if not self._lazy_check:
            return super().check_lazy_status(inputs)
        wanted = self.instance.check_lazy_status(**inputs)
        return [wanted] if isinstance(wanted, str) else list(wanted or [])

    def _link_types(self, prompt: Any, unique_id: str) -> dict[str, str]:
        """The types of the outputs linked to this node's inputs, read from the workflow and the registry that
        registered the linked nodes' classes (for VALIDATE_INPUTS' `input_types`)."""
        types: dict[str, str] = {}
        call = (prompt or {}).get(str(unique_id), {}) if isinstance(prompt, dict) else {}
        registry = getattr(type(self), "registry", None)
        for name, value in (call.get("inputs") or {}).items():
            if isinstance(value, list) and len(value) == 2 and registry is not None:
                source = prompt.get(str(value[0]), {})
                source_cls = registry.get(source.get("class_type", ""))
                if source_cls is not None and 0 <= int(value[1]) < len(source_cls.outputs):
                    types[name] = source_cls.outputs[int(value[1])].type
        return types

    def execute(self, **inputs: Any) -> NodeOutput:
        cls = type(self)
        ours = {name: inputs.pop(name, None) for name in cls.hidden}
        hidden = hidden_values(self, ours)
        if cls.input_is_list:  # ComfyUI hands a list node every input as a list, hidden ones too
            hidden = {name: [value] for name, value in hidden.items()}
        if cls._late_validation:
            call = (ours["prompt"] or {}).get(str(ours["unique_id"]), {})
            literals = {k: v for k, v in (call.get("inputs") or {}).items()
                        if not (isinstance(v, list) and len(v) == 2)}
            reason = cls._call_validate(literals, self._link_types(ours["prompt"], ours["unique_id"]))
            if reason is not None:
                raise PackNodeError(f"{cls.node_type} (pack {cls.pack or '?'}): custom validation failed: {reason}")
        function = getattr(self.instance, cls._function)
        with running(PackRun(cls.node_type, cls.pack, ours["context"])):
            try:
                returned = function(**inputs, **hidden)
            except AttributeError as exc:
                renamed = _missing_method(cls, inputs, exc)
                if renamed is None:
                    raise
                raise renamed from exc
        return _node_output(cls, returned)


def _missing_method(cls: type[PackNode], inputs: dict[str, Any], exc: AttributeError) -> Exception | None:
    """An AttributeError on one of the node's input objects (a MODEL, a CLIP, ...) said as what it is: the pack
    called a method our object does not offer."""
    target = getattr(exc, "obj", None)
    if target is None:
        return None
    for name, value in inputs.items():
        values = value if isinstance(value, list) else [value]
        if any(v is target or type(v) is type(target) for v in values):  # the input, or a clone the pack made
            spec = cls.input(name)
            kind = spec.wire_type if isinstance(spec, PackInput) and spec.wire_type else type(target).__name__
            return PackNodeError(
                f"node {cls.node_type} (pack {cls.pack or '?'}) called {kind}.{exc.name} on its input {name!r}, "
                f"which Latent Loom's {kind} does not offer")
    return None


def _node_output(cls: type[PackNode], returned: Any) -> NodeOutput:
    """A pack function's result, a tuple or `{"ui": ..., "result": ...}`, as our NodeOutput."""
    ui = None
    if isinstance(returned, dict):
        if "expand" in returned:
            raise PackNodeError(f"{cls.node_type} (pack {cls.pack or '?'}): node expansion ('expand' in the "
                                "result) is not supported by Latent Loom")
        ui = returned.get("ui")
        returned = returned.get("result", ())
    if returned is None:
        returned = ()
    if not isinstance(returned, tuple | list):
        raise PackNodeError(f"{cls.node_type} (pack {cls.pack or '?'}) returned {type(returned).__name__}, "
                            "not a tuple of outputs")
    if ui is not None and not isinstance(ui, dict):
        raise PackNodeError(f"{cls.node_type} (pack {cls.pack or '?'}): 'ui' must be a dict, got {ui!r}")
    if ui is not None:  # packs often give tuples, which ComfyUI's JSON sends as lists: our executor joins lists
        ui = {key: list(value) if isinstance(value, tuple) else value for key, value in ui.items()}
    return NodeOutput(*returned, ui=ui)


def hidden_values(node: PackNode, ours: dict[str, Any]) -> dict[str, Any]:
    """The pack's hidden inputs, by the pack's names, from the values the executor filled in under ours."""
    values = {}
    for name, kind in node.pack_hidden.items():
        source = HIDDEN_KINDS.get(str(kind))
        if source is not None and source in HIDDEN_INPUTS:
            values[name] = ours.get(source)
    return values
