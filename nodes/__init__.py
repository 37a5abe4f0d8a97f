"""The built-in typed nodes, one module per family; thin declarations over `diffusion/`."""

from __future__ import annotations

import importlib
import logging

from graph.registry import NodeRegistry
from nodes.environment import Environment

log = logging.getLogger(__name__)

# Modules of built-in nodes; each exposes NODE_CLASSES.
BUILTIN_MODULES: tuple[str, ...] = (
    "nodes.loaders", "nodes.text", "nodes.conditioning", "nodes.latent", "nodes.vae", "nodes.sampling",
    "nodes.sampling_custom", "nodes.image", "nodes.image_io", "nodes.mask", "nodes.utility", "nodes.animation",
    "nodes.training", "nodes.model_patches", "nodes.model_io", "nodes.merging",
    "nodes.image_ops", "nodes.image_filters", "nodes.compositing", "nodes.latent_ops", "nodes.strings",
    "nodes.hypernetwork",
    "nodes.schedulers", "nodes.samplers_custom", "nodes.controlnet",
    "nodes.upscale_models", "nodes.clip_vision",
    "nodes.gligen", "nodes.ip_adapter", "nodes.animatediff", "nodes.acceleration", "nodes.video", "nodes.svd",
)


def build_registry(env: Environment | None = None, plugins: bool = True) -> NodeRegistry:
    """The built-in nodes, then plugins from entry points and from the data directory's custom_nodes/."""
    registry = NodeRegistry()
    for name in BUILTIN_MODULES:
        module = importlib.import_module(name)
        for cls in module.NODE_CLASSES:
            registry.register(cls, builtin=True)
    if plugins:
        registry.discover_entry_points()
        if env is not None:
            registry.discover_folder(env.custom_nodes_dir, env)
    return registry
