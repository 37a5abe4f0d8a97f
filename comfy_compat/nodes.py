"""ComfyUI's `nodes` module for packs: `MAX_RESOLUTION`, and the core nodes by name (`NODE_CLASS_MAPPINGS`,
`nodes.KSampler`, ...), each in ComfyUI's V1 shape so that a pack can call one directly.

A pack that calls a core node writes `nodes.VAEDecode().decode(vae, samples)`: our built-in nodes declare one
`execute` and no ComfyUI method name, so any public method name runs `execute`, with positional arguments taken
in the node's declared input order (ComfyUI's functions take them in that order). The call runs in the pack
node's own execution context (progress, interrupt) and returns a tuple, or `{"ui", "result"}` for a node that
shows something.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from comfy_compat._state import STATE, context
from graph.node import NodeOutput

MAX_RESOLUTION = 16384


def _core_classes() -> dict[str, type]:
    registry = STATE.registry
    if registry is None:
        return {}
    return {name: cls for name, cls in registry.items() if registry.is_builtin(name)}


def _adapter(node_cls: type) -> type:
    """A ComfyUI-shaped class for one of our built-in nodes."""

    def input_types(cls: type) -> dict[str, Any]:
        return node_cls.info(STATE.env)["input"]

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        names = [i.name for i in node_cls.inputs]
        if len(args) > len(names):
            raise TypeError(f"{node_cls.node_type} takes {len(names)} inputs ({', '.join(names)}), "
                            f"{len(args)} given")
        values = dict(zip(names, args, strict=False)) | kwargs
        ctx = context()
        hidden = {"context": ctx, "prompt": None, "extra_pnginfo": None,
                  "unique_id": getattr(ctx, "node_id", None)}
        values |= {name: hidden[name] for name in node_cls.hidden}
        returned = node_cls().execute(**values)
        if isinstance(returned, NodeOutput):
            if returned.ui:
                return {"ui": returned.ui, "result": tuple(returned.values)}
            return tuple(returned.values)
        return tuple(returned)

    def method(self: Any, name: str) -> Callable[..., Any]:
        if name.startswith("_"):
            raise AttributeError(name)
        return call.__get__(self)

    return type(node_cls.node_type, (), {
        "INPUT_TYPES": classmethod(input_types),
        "RETURN_TYPES": tuple(o.type for o in node_cls.outputs),
        "RETURN_NAMES": tuple(o.display_name for o in node_cls.outputs),
        "OUTPUT_IS_LIST": tuple(o.is_list for o in node_cls.outputs),
        "FUNCTION": "execute",
        "CATEGORY": node_cls.category,
        "OUTPUT_NODE": node_cls.output_node,
        "execute": call,
        "__getattr__": method,
        "__module__": __name__,
    })


_ADAPTERS: dict[type, type] = {}


def _adapted(node_cls: type) -> type:
    if node_cls not in _ADAPTERS:
        _ADAPTERS[node_cls] = _adapter(node_cls)
    return _ADAPTERS[node_cls]


def __getattr__(name: str) -> Any:
    if name == "NODE_CLASS_MAPPINGS":
        return {n: _adapted(c) for n, c in _core_classes().items()}
    if name == "NODE_DISPLAY_NAME_MAPPINGS":
        return {n: c.display_name or n for n, c in _core_classes().items()}
    core = _core_classes().get(name)
    if core is not None:
        return _adapted(core)
    raise AttributeError(f"module 'nodes' has no attribute {name!r} (Latent Loom has no core node {name!r})")
