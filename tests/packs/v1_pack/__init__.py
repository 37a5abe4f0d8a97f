"""A node pack in ComfyUI's V1 style, written for Latent Loom's tests: every declaration option, lazy and list
inputs, IS_CHANGED, VALIDATE_INPUTS, ui results, progress and interrupt, a route, a web folder."""

import importlib.util
import os
import sys

from .basic_nodes import BASIC_NODES
from .runtime_nodes import RUNTIME_NODES

_HERE = os.path.join(os.path.dirname(__file__), "extra")
_spec = importlib.util.spec_from_file_location("v1_pack_by_path", os.path.join(_HERE, "by_path.py"))
by_path = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(by_path)
sys.path.insert(0, _HERE)
try:
    import on_sys_path
finally:
    sys.path.remove(_HERE)
    sys.modules.pop("on_sys_path", None)


class V1WhereFrom:
    """What `nodes` and `server` were in the pack's files loaded by path and from sys.path."""

    CATEGORY = "v1 pack"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "where"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def where(self):
        return {"ui": {"by_path": by_path.RESOLVED, "on_sys_path": on_sys_path.RESOLVED}}


NODE_CLASS_MAPPINGS = {**BASIC_NODES, **RUNTIME_NODES, "V1WhereFrom": V1WhereFrom}
NODE_DISPLAY_NAME_MAPPINGS = {"V1Options": "V1 Every Option", "V1Lazy": "V1 Lazy Switch"}
WEB_DIRECTORY = "./web"
