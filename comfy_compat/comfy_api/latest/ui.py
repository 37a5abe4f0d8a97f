"""`comfy_api.latest.ui`: what a V3 node shows on its node (text previews)."""

from __future__ import annotations

from typing import Any


class PreviewText:
    """Text shown on the node (ComfyUI's `{"text": [...]}` ui entry)."""

    def __init__(self, value: str, **kwargs: Any) -> None:
        self.value = value

    def as_dict(self) -> dict[str, Any]:
        return {"text": [self.value]}
