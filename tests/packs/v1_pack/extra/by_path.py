"""Loaded by the pack with spec_from_file_location (as ComfyUI-Custom-Scripts loads its files)."""

import nodes
from server import PromptServer

RESOLVED = [nodes.__name__, type(PromptServer.instance).__module__]
