"""Optional accelerations as model patches, off unless a workflow adds their node.

DeepCache has the interface of the DeepCache node ComfyUI users know (the ComfyUI-deepcache pack: class
"DeepCache", category "loaders", the same inputs, defaults and ranges), so their workflows run unchanged; the
work is diffusion/patches/deep_cache.py.
"""

from __future__ import annotations

from diffusion.handles import DiffusionModel
from diffusion.patches.deep_cache import DeepCache as DeepCacheWrapper
from graph.node import Int, Node, Output, Socket
from graph.types import MODEL


class DeepCache(Node):
    display_name = "Deep Cache"
    category = "loaders"
    description = ("Reuses the UNet's deep features for cache_interval - 1 of every cache_interval steps (DeepCache): "
                   "faster sampling at a small cost in detail. cache_depth is the last input block still run on a "
                   "cached step; start_step and end_step bound where it applies on the 0..1000 scale of steps done.")
    inputs = [Socket("model", MODEL),
              Int("cache_interval", default=5, min=1, max=1000, step=1, extra={"display": "number"}),
              Int("cache_depth", default=3, min=0, max=12, step=1, extra={"display": "number"}),
              Int("start_step", default=0, min=0, max=1000, step=1, extra={"display": "number"}),
              Int("end_step", default=1000, min=0, max=1000, step=1)]
    outputs = [Output(MODEL)]

    def execute(self, model: DiffusionModel, cache_interval: int, cache_depth: int, start_step: int, end_step: int):
        if start_step > end_step:
            raise ValueError(f"DeepCache: start_step {start_step} is after end_step {end_step}")
        return (model.with_unet_wrapper(DeepCacheWrapper(cache_interval, cache_depth, start_step, end_step)),)


NODE_CLASSES = [DeepCache]
