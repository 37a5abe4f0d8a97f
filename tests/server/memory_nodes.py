"""A node that fails the way a device out of memory does, loaded as a plugin by the admission tests."""

from __future__ import annotations

import torch

from graph.node import Node, Socket
from graph.types import LATENT


class RaiseOutOfMemory(Node):
    """Raises torch.OutOfMemoryError (what torch.cuda raises) where a real run would allocate too much: the
    tests simulate an out-of-memory error instead of causing one."""

    category = "test"
    output_node = True
    inputs = [Socket("samples", LATENT)]
    outputs = []

    def execute(self, samples):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB (GPU 0; 8.00 GiB total capacity)")


NODE_CLASSES = [RaiseOutOfMemory]
