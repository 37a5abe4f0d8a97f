"""A node pack in ComfyUI's V1 style, written for Latent Loom's tests: every declaration option, lazy and list
inputs, IS_CHANGED, VALIDATE_INPUTS, ui results, progress and interrupt, a route, a web folder."""

from .basic_nodes import BASIC_NODES
from .runtime_nodes import RUNTIME_NODES

NODE_CLASS_MAPPINGS = {**BASIC_NODES, **RUNTIME_NODES}
NODE_DISPLAY_NAME_MAPPINGS = {"V1Options": "V1 Every Option", "V1Lazy": "V1 Lazy Switch"}
WEB_DIRECTORY = "./web"
