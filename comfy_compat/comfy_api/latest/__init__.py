"""`comfy_api.latest`: `io` (ComfyNode, Schema, the types) and `ComfyExtension`, as ComfyUI's public
documentation describes them (docs.comfy.org, "custom nodes", V3)."""

from __future__ import annotations

from comfy_compat.comfy_api.latest import io, ui
from comfy_compat.comfy_api.latest.io import ComfyExtension

__all__ = ["ComfyExtension", "io", "ui"]
