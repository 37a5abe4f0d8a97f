"""ComfyUI's `latent_preview` for packs that run their own sampling loop: a step callback that reports progress
(and checks for an interrupt) and previews the denoised latent through our model's own previewer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from comfy_compat.comfy.utils import ProgressBar

MAX_PREVIEW_RESOLUTION = 512


def prepare_callback(model: Any, steps: int, x0_output_dict: dict[str, Any] | None = None
                     ) -> Callable[[int, Any, Any, int], None]:
    """`callback(step, x0, x, total_steps)` for a sampling loop."""
    bar = ProgressBar(steps)
    preview_image = getattr(model, "preview_image", None)

    def callback(step: int, x0: Any, x: Any, total_steps: int) -> None:
        if x0_output_dict is not None:
            x0_output_dict["x0"] = x0
        preview = None
        if callable(preview_image) and x0 is not None:
            image = preview_image(x0)
            preview = ("JPEG", image, MAX_PREVIEW_RESOLUTION) if image is not None else None
        bar.update_absolute(step + 1, total_steps, preview)

    return callback
