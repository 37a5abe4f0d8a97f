"""ComfyUI's V3 node interface (`comfy_api.latest.io`) for packs, as far as its public description goes.

A V3 node is an `io.ComfyNode` subclass whose classmethod `define_schema()` returns an `io.Schema` (node id, display
name, category, typed inputs and outputs, flags) and whose classmethod `execute(**inputs)` returns an
`io.NodeOutput`. Rather than a second translation, a ComfyNode exposes ComfyUI's V1 attributes (`INPUT_TYPES`,
`RETURN_TYPES`, `FUNCTION`, ...) computed from its schema, so graph.comfy_v1 declares and runs it like any V1
node: one path for both. A pack registers V3 nodes through `async comfy_entrypoint() -> ComfyExtension`, whose
`get_node_list()` lists them (graph.registry awaits both).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar


class NumberDisplay(enum.StrEnum):
    number = "number"
    slider = "slider"


class Hidden(enum.StrEnum):
    """Hidden inputs a schema may ask for; `cls.hidden.<name>` holds their values during `execute`."""

    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"
    dynprompt = "DYNPROMPT"


# Input options by their V3 keyword -> the V1 option name ComfyUI's front end reads.
_OPTION_NAMES = {"default": "default", "min": "min", "max": "max", "step": "step", "round": "round",
                 "tooltip": "tooltip", "lazy": "lazy", "multiline": "multiline", "placeholder": "placeholder",
                 "dynamic_prompts": "dynamicPrompts", "force_input": "forceInput", "label_on": "label_on",
                 "label_off": "label_off", "control_after_generate": "control_after_generate",
                 "display_mode": "display", "display_name": "display_name", "upload": "image_upload",
                 "image_upload": "image_upload", "socketless": "socketless", "raw_link": "rawLink",
                 "advanced": "advanced"}


class Input:
    """One declared input of a type (`io.Int.Input("steps", default=20, min=1)`)."""

    io_type = "*"

    def __init__(self, id: str, display_name: str | None = None, optional: bool = False, tooltip: str | None = None,
                 lazy: bool | None = None, **options: Any) -> None:
        self.id = id
        self.optional = optional
        self.options = {"display_name": display_name, "tooltip": tooltip, "lazy": lazy, **options}

    def v1_spec(self) -> tuple[str, dict[str, Any]]:
        config: dict[str, Any] = {}
        for key, value in self.options.items():
            if value is None or key == "options":
                continue
            name = _OPTION_NAMES.get(key)
            if name is None:
                raise TypeError(f"{type(self).__qualname__} '{self.id}': unknown option {key!r}")
            config[name] = value.value if isinstance(value, enum.Enum) else value
        if self.io_type == "COMBO":
            options = self.options.get("options") or []
            if isinstance(options, type) and issubclass(options, enum.Enum):
                options = [o.value for o in options]
            config = {"options": list(options), **config}
        return self.io_type, config


class Output:
    """One declared output (`io.Image.Output(display_name="mask", is_output_list=False)`)."""

    io_type = "*"

    def __init__(self, id: str | None = None, display_name: str | None = None, tooltip: str | None = None,
                 is_output_list: bool = False) -> None:
        self.id = id
        self.display_name = display_name
        self.tooltip = tooltip or ""
        self.is_output_list = is_output_list


def _io_type(name: str, io_type: str) -> type:
    """`io.<Name>`: a namespace with `Input` and `Output` classes of one socket type (and `io_type`; `Type` for
    annotations)."""
    inputs = type("Input", (Input,), {"io_type": io_type, "__qualname__": f"{name}.Input"})
    outputs = type("Output", (Output,), {"io_type": io_type, "__qualname__": f"{name}.Output"})
    return type(name, (), {"io_type": io_type, "Input": inputs, "Output": outputs, "Type": Any,
                           "__module__": __name__})


Int = _io_type("Int", "INT")
Float = _io_type("Float", "FLOAT")
String = _io_type("String", "STRING")
Boolean = _io_type("Boolean", "BOOLEAN")
Combo = _io_type("Combo", "COMBO")
Image = _io_type("Image", "IMAGE")
Mask = _io_type("Mask", "MASK")
Latent = _io_type("Latent", "LATENT")
Conditioning = _io_type("Conditioning", "CONDITIONING")
Model = _io_type("Model", "MODEL")
Clip = _io_type("Clip", "CLIP")
Vae = _io_type("Vae", "VAE")
Sampler = _io_type("Sampler", "SAMPLER")
Sigmas = _io_type("Sigmas", "SIGMAS")
Noise = _io_type("Noise", "NOISE")
Guider = _io_type("Guider", "GUIDER")
ClipVision = _io_type("ClipVision", "CLIP_VISION")
ClipVisionOutput = _io_type("ClipVisionOutput", "CLIP_VISION_OUTPUT")
ControlNet = _io_type("ControlNet", "CONTROL_NET")
UpscaleModel = _io_type("UpscaleModel", "UPSCALE_MODEL")
AnyType = _io_type("AnyType", "*")


def Custom(io_type: str) -> type:
    """A pack's own socket type: `io.Custom("MY_TYPE").Input("x")`."""
    return _io_type(io_type.title().replace("_", ""), io_type)


# ComfyUI's dynamic inputs, which build on the classes above (a module of their own: io_dynamic.py)
from comfy_compat.comfy_api.latest.io_dynamic import AUTOGROW as AUTOGROW  # noqa: E402
from comfy_compat.comfy_api.latest.io_dynamic import DYNAMICCOMBO as DYNAMICCOMBO  # noqa: E402
from comfy_compat.comfy_api.latest.io_dynamic import MATCHTYPE as MATCHTYPE  # noqa: E402
from comfy_compat.comfy_api.latest.io_dynamic import Autogrow as Autogrow  # noqa: E402
from comfy_compat.comfy_api.latest.io_dynamic import DynamicCombo as DynamicCombo  # noqa: E402
from comfy_compat.comfy_api.latest.io_dynamic import DynamicInput as DynamicInput  # noqa: E402
from comfy_compat.comfy_api.latest.io_dynamic import MatchType as MatchType  # noqa: E402


@dataclass
class Schema:
    node_id: str
    display_name: str | None = None
    category: str = "sd"
    inputs: list[Input] = field(default_factory=list)
    outputs: list[Output] = field(default_factory=list)
    hidden: list[Hidden] = field(default_factory=list)
    description: str = ""
    is_output_node: bool = False
    is_input_list: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False
    not_idempotent: bool = False
    search_aliases: list[str] = field(default_factory=list)
    enable_expand: bool = False


class NodeOutput:
    """What `execute` returns: the output values in order, and optionally a `ui` dict for the client."""

    def __init__(self, *args: Any, ui: Any = None, expand: Any = None, block_execution: Any = None) -> None:
        self.args = args
        self.ui = ui
        self.expand = expand

    def as_v1(self) -> dict[str, Any]:
        ui = self.ui.as_dict() if hasattr(self.ui, "as_dict") else self.ui
        result: dict[str, Any] = {"result": self.args}
        if ui is not None:
            result["ui"] = ui
        if self.expand is not None:
            result["expand"] = self.expand
        return result


class HiddenHolder:
    """`cls.hidden` during `execute`: the hidden values the schema asked for (None for the others)."""

    def __init__(self, values: dict[str, Any]) -> None:
        for member in Hidden:
            setattr(self, member.name, values.get(member.name))


class _FromSchema:
    """A V1 attribute computed from the class's schema when read (on the class, as the registry reads it)."""

    def __init__(self, compute: Any) -> None:
        self.compute = compute

    def __get__(self, obj: Any, owner: type) -> Any:
        return self.compute(owner)


def _input_types(cls: type) -> dict[str, Any]:
    schema = cls.define_schema()
    spec: dict[str, Any] = {"required": {}, "optional": {}}
    for item in schema.inputs:
        if isinstance(item, DynamicInput):  # one V1 input per slot or option input ("group.name")
            for name, optional, v1 in item.expand():
                spec["optional" if optional else "required"][name] = v1
            continue
        spec["optional" if item.optional else "required"][item.id] = item.v1_spec()
    if schema.hidden:
        spec["hidden"] = {Hidden(h).name: Hidden(h).value for h in schema.hidden}
    if not spec["optional"]:
        del spec["optional"]
    return spec


def _renamed(name: str) -> Any:
    """V1's VALIDATE_INPUTS / IS_CHANGED: the V3 classmethod of that role, when the node defines one."""
    def compute(owner: type) -> Any:
        method = getattr(owner, name)
        return None if method.__func__ is ComfyNode.__dict__[name].__func__ else method
    return _FromSchema(compute)


class ComfyNode:
    """The base of V3 nodes: override `define_schema` and `execute` (classmethods)."""

    hidden: ClassVar[HiddenHolder | None] = None
    FUNCTION = "_execute_v1"
    INPUT_TYPES = classmethod(_input_types)
    NODE_ID = _FromSchema(lambda c: c.define_schema().node_id)
    DISPLAY_NAME = _FromSchema(lambda c: c.define_schema().display_name)
    CATEGORY = _FromSchema(lambda c: c.define_schema().category)
    DESCRIPTION = _FromSchema(lambda c: c.define_schema().description)
    OUTPUT_NODE = _FromSchema(lambda c: c.define_schema().is_output_node)
    INPUT_IS_LIST = _FromSchema(lambda c: c.define_schema().is_input_list)
    DEPRECATED = _FromSchema(lambda c: c.define_schema().is_deprecated)
    EXPERIMENTAL = _FromSchema(lambda c: c.define_schema().is_experimental)
    NOT_IDEMPOTENT = _FromSchema(lambda c: c.define_schema().not_idempotent)
    RETURN_TYPES = _FromSchema(lambda c: tuple(o.io_type for o in c.define_schema().outputs))
    RETURN_NAMES = _FromSchema(lambda c: tuple(o.display_name or o.id or o.io_type
                                               for o in c.define_schema().outputs))
    OUTPUT_IS_LIST = _FromSchema(lambda c: tuple(o.is_output_list for o in c.define_schema().outputs))
    OUTPUT_TOOLTIPS = _FromSchema(lambda c: tuple(o.tooltip for o in c.define_schema().outputs))
    VALIDATE_INPUTS = _renamed("validate_inputs")
    IS_CHANGED = _renamed("fingerprint_inputs")

    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError(f"{cls.__name__} does not define define_schema")

    @classmethod
    def execute(cls, **kwargs: Any) -> NodeOutput:
        raise NotImplementedError(f"{cls.__name__} does not define execute")

    @classmethod
    def validate_inputs(cls, **kwargs: Any) -> bool | str:
        return True

    @classmethod
    def fingerprint_inputs(cls, **kwargs: Any) -> Any:
        return None

    def _execute_v1(self, **kwargs: Any) -> Any:
        """Run `execute` on a per-call subclass whose `hidden` holds this call's hidden values (as ComfyUI runs
        V3 nodes: their classmethods share no state between calls)."""
        cls = type(self)
        hidden_names = {h.name for h in cls.define_schema().hidden}
        hidden = {name: kwargs.pop(name) for name in list(kwargs) if name in hidden_names}
        for item in cls.define_schema().inputs:
            if isinstance(item, DynamicInput):
                item.collect(kwargs)
        call_cls = type(cls.__name__, (cls,), {"hidden": HiddenHolder(hidden)})
        returned = call_cls.execute(**kwargs)
        if isinstance(returned, NodeOutput):
            return returned.as_v1()
        return returned


class ComfyExtension:
    """What `comfy_entrypoint()` returns: `get_node_list()` lists the pack's ComfyNode classes."""

    async def on_load(self) -> None:
        return None

    async def get_node_list(self) -> list[type[ComfyNode]]:
        raise NotImplementedError(f"{type(self).__name__} does not define get_node_list")
