"""ComfyUI's `comfy.comfy_types` for packs: the typing helpers of node declarations (node_typing)."""

from comfy_compat.comfy.comfy_types.node_typing import IO, ComfyNodeABC, InputTypeDict

__all__ = ["IO", "ComfyNodeABC", "InputTypeDict"]
