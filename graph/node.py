"""Node declarations: typed inputs and outputs, hooks, and how a node renders for /object_info.

A node is a subclass of `Node` with class attributes that declare its schema and an `execute` method
that takes the inputs as keyword arguments:

    class Add(Node):
        category = "math"
        inputs = [Int("a"), Int("b", default=1)]
        outputs = [Output(INT, "sum")]

        def execute(self, a, b):
            return (a + b,)

`execute` returns a tuple with one value per output, or a `NodeOutput` that also carries a `ui` dict
(what an output node shows, e.g. the images it saved). A fresh instance runs every call, so nodes keep
no state between runs; what they need from outside comes through declared hidden inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from graph.types import BOOLEAN, COMBO, FLOAT, INT, STRING, WIDGET_TYPES

if TYPE_CHECKING:
    from graph.memory_estimate import EstimateContext, MemoryEstimate

# Hidden inputs a node may ask for by name; the executor fills them in.
HIDDEN_INPUTS = {
    "prompt": "PROMPT",  # the API-format workflow being run
    "extra_pnginfo": "EXTRA_PNGINFO",  # extra_data["extra_pnginfo"], e.g. {"workflow": <UI workflow>}
    "unique_id": "UNIQUE_ID",  # the node's id in the workflow
    "context": None,  # an ExecutionContext: progress, interrupt checks, the environment (not on the wire)
}

MAX_INT = 0xFFFFFFFFFFFFFFFF


@dataclass(frozen=True)
class Input:
    """One declared input. Widget inputs (INT, FLOAT, STRING, BOOLEAN, COMBO) take literals or links;
    socket inputs (any other type) take links only.

    `options` of a COMBO is a list, or a callable `(env) -> list[str]` for lists that change at run time
    (model files). `extra` carries further ComfyUI widget options verbatim (e.g. image_upload).
    """

    name: str
    type: str
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    round: float | None = None
    multiline: bool = False
    tooltip: str = ""
    options: Sequence[str] | Callable[[Any], Sequence[str]] | None = None
    optional: bool = False
    lazy: bool = False
    force_input: bool = False
    control_after_generate: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_widget(self) -> bool:
        """True when the canvas shows this input as a widget (and the UI format stores its value)."""
        return self.type in WIDGET_TYPES and not self.force_input

    def resolve_options(self, env: Any) -> list[str]:
        if self.options is None:
            return []
        return list(self.options(env) if callable(self.options) else self.options)

    def wire_config(self, env: Any) -> dict[str, Any]:
        """The options dict as /object_info shows it."""
        config: dict[str, Any] = {}
        if self.default is not None:
            config["default"] = self.default
        for key in ("min", "max", "step", "round"):
            value = getattr(self, key)
            if value is not None:
                config[key] = value
        if self.multiline:
            config["multiline"] = True
        if self.tooltip:
            config["tooltip"] = self.tooltip
        if self.lazy:
            config["lazy"] = True
        if self.force_input:
            config["forceInput"] = True
        if self.control_after_generate:
            config["control_after_generate"] = True
        config.update(self.extra)
        return config

    def wire_spec(self, env: Any) -> list[Any]:
        """`[TYPE, {options}]`, with a combo's options list in place of its type (ComfyUI's V1 shape)."""
        if self.type == COMBO:
            return [self.resolve_options(env), self.wire_config(env)]
        return [self.type, self.wire_config(env)]


# The helpers below give the usual defaults; pass None for `default` or `step` to declare none, as ComfyUI does for
# many inputs (its front end then starts a widget at 0, "" or false, and steps an INT by 1).
def Int(name: str, default: int | None = 0, min: int = -MAX_INT, max: int = MAX_INT, step: int | None = 1,
        **kw: Any) -> Input:
    return Input(name, INT, default=default, min=min, max=max, step=step, **kw)


def Float(name: str, default: float | None = 0.0, min: float = -1e9, max: float = 1e9, step: float | None = 0.01,
          **kw: Any) -> Input:
    return Input(name, FLOAT, default=default, min=min, max=max, step=step, **kw)


def String(name: str, default: str | None = "", multiline: bool = False, **kw: Any) -> Input:
    return Input(name, STRING, default=default, multiline=multiline, **kw)


def Boolean(name: str, default: bool | None = False, **kw: Any) -> Input:
    return Input(name, BOOLEAN, default=default, **kw)


def Combo(name: str, options: Sequence[str] | Callable[[Any], Sequence[str]], default: str | None = None,
          **kw: Any) -> Input:
    return Input(name, COMBO, default=default, options=options, **kw)


def Socket(name: str, type: str, **kw: Any) -> Input:
    return Input(name, type, **kw)


@dataclass(frozen=True)
class Output:
    type: str
    name: str | None = None
    is_list: bool = False
    tooltip: str = ""

    @property
    def display_name(self) -> str:
        return self.name or self.type


class NodeOutput:
    """What `execute` may return instead of a tuple: the output values plus a `ui` dict for the client."""

    __slots__ = ("ui", "values")

    def __init__(self, *values: Any, ui: dict[str, Any] | None = None) -> None:
        self.values = values
        self.ui = ui


class Node:
    """Base class of every node type. Override the class attributes and `execute`."""

    node_type: ClassVar[str] = ""  # the class_type on the wire; defaults to the class name
    display_name: ClassVar[str] = ""
    category: ClassVar[str] = "sd"
    description: ClassVar[str] = ""
    inputs: ClassVar[list[Input]] = []
    outputs: ClassVar[list[Output]] = []
    hidden: ClassVar[tuple[str, ...]] = ()
    output_node: ClassVar[bool] = False
    input_is_list: ClassVar[bool] = False  # True: execute gets whole lists, once
    not_idempotent: ClassVar[bool] = False  # True: never share cached results with an identical node
    deprecated: ClassVar[bool] = False
    experimental: ClassVar[bool] = False
    python_module: ClassVar[str] = ""
    # How to make this node need less memory; said when a prompt is refused for memory or runs out of it.
    memory_advice: ClassVar[str] = "use a smaller batch or a smaller size"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("node_type"):
            cls.node_type = cls.__name__
        unknown = set(cls.hidden) - set(HIDDEN_INPUTS)
        if unknown:
            raise TypeError(f"{cls.__name__}: unknown hidden inputs {sorted(unknown)}")
        names = [i.name for i in cls.inputs]
        if len(names) != len(set(names)):
            raise TypeError(f"{cls.__name__}: duplicate input names in {names}")
        cls._inputs_by_name = {i.name: i for i in cls.inputs}

    @classmethod
    def input(cls, name: str) -> Input | None:
        return cls._inputs_by_name.get(name)

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any], env: Any) -> Any:
        """A value that changes when outside state the node reads changes (e.g. a file's hash).

        Called once per prompt with the node's literal inputs. `None` means: no outside state.
        Return float("nan") to force a re-run every time."""
        return None

    @classmethod
    def validate_inputs(cls, inputs: dict[str, Any], env: Any) -> str | None:
        """The node's own check of its literal inputs (linked ones are absent). A string is the reason
        it failed; None means valid."""
        return None

    @classmethod
    def estimate_memory(cls, inputs: dict[str, Any], shapes: dict[str, Any],
                        context: EstimateContext) -> MemoryEstimate | None:
        """The memory one run of this node needs, before anything runs (see graph.memory_estimate).

        `inputs` are the node's literal inputs; `shapes` maps each linked input to the shape its source
        declared (None where unknown). Return None when the node cannot tell: it then adds nothing and its
        outputs' shapes are unknown downstream. Must be cheap and must not allocate what it estimates."""
        return None

    def check_lazy_status(self, inputs: dict[str, Any]) -> list[str]:
        """Names of lazy inputs this node needs, given what is known (unevaluated lazy inputs are None).
        The default asks for every lazy input that is linked."""
        return [i.name for i in self.inputs if i.lazy and inputs.get(i.name) is None]

    def execute(self, **inputs: Any) -> tuple[Any, ...] | NodeOutput:
        raise NotImplementedError(f"{self.node_type} does not implement execute")

    @classmethod
    def info(cls, env: Any = None) -> dict[str, Any]:
        """The node's declaration in the shape of ComfyUI's /object_info.

        Every key ComfyUI can send is always present, as its newer (V3) nodes render them: `deprecated`,
        `experimental` and `api_node` as booleans (its older nodes leave out a false flag, which clients read
        alike) and `output_tooltips` with one string per output. `input_order` lists each section's names in
        declaration order, because JSON objects (and ComfyUI's own sorted dumps) do not keep it."""
        required = {i.name: i.wire_spec(env) for i in cls.inputs if not i.optional}
        optional = {i.name: i.wire_spec(env) for i in cls.inputs if i.optional}
        hidden = {name: HIDDEN_INPUTS[name] for name in cls.hidden if HIDDEN_INPUTS[name]}
        spec: dict[str, Any] = {"required": required}
        if optional:
            spec["optional"] = optional
        if hidden:
            spec["hidden"] = hidden
        return {
            "input": spec,
            "input_order": {k: list(v) for k, v in spec.items()},
            "output": [o.type for o in cls.outputs],
            "output_is_list": [o.is_list for o in cls.outputs],
            "output_name": [o.display_name for o in cls.outputs],
            "output_tooltips": [o.tooltip for o in cls.outputs],
            "name": cls.node_type,
            "display_name": cls.display_name or cls.node_type,
            "description": cls.description,
            "python_module": cls.python_module or wire_module(cls.__module__),
            "category": cls.category,
            "output_node": cls.output_node,
            "deprecated": cls.deprecated,
            "experimental": cls.experimental,
            "api_node": False,
        }


# First parts of `python_module` that ComfyUI's front end files under "core"; anything else is a node pack.
CORE_MODULES = ("nodes", "comfy_extras", "comfy_api_nodes")
CUSTOM_NODES_PACKAGE = "latentloom_custom_nodes"  # where graph.registry imports custom_nodes/ files


def wire_module(module: str) -> str:
    """A node's `python_module` as ComfyUI writes it: clients read only its first dotted part, where `nodes` or
    `comfy_extras` mean built in and `custom_nodes.<pack>` names the node pack (the front end's source badge and
    its per-pack grouping). Our built-ins live in `nodes.*` and keep their real module; a file from the data
    directory's custom_nodes/ (imported as `latentloom_custom_nodes.<file>`) and a pack installed by entry point
    (its own top-level package) become `custom_nodes.<pack>`."""
    head, _, rest = module.partition(".")
    if head in CORE_MODULES:
        return module
    if head == CUSTOM_NODES_PACKAGE and rest:
        return f"custom_nodes.{rest.split('.')[0]}"
    return f"custom_nodes.{head}"
