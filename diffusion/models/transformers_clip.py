"""transformers' CLIP classes, imported on first use, or in a background thread ahead of it.

Importing transformers' CLIP modelling code costs 3-5 s on a small CPU (transformers pulls in
torch.distributed.tensor, torch._dynamo, scipy and sympy), about twice torch's own import. The text encoders no
longer need it (they are our own plain torch CLIP, clip_text.py), so a text-to-image run never imports
transformers. What still asks `clip_classes()` when it builds a model: the CLIP vision towers (clip_vision.py,
for CLIPVisionLoader, unCLIP checkpoints and SVD) and the trainer's text model (TextEncoderConfig's
`transformers_config`, train/recipe.py). Nothing imports transformers at module level; `start_import()` runs the
import in a daemon thread for a caller that knows it will need the classes soon.

Only one thread ever imports transformers here: `clip_classes()` waits for a started background import instead
of importing concurrently (two threads importing one package can see each other's half-initialised modules).
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from types import SimpleNamespace

log = logging.getLogger(__name__)

MODULES = ("transformers.models.clip.configuration_clip", "transformers.models.clip.modeling_clip")
NAMES = ("CLIPTextConfig", "CLIPTextModel", "CLIPTextModelWithProjection", "CLIPVisionConfig",
         "CLIPVisionModelWithProjection")

_lock = threading.Lock()
_thread: threading.Thread | None = None
_error: BaseException | None = None
_classes: SimpleNamespace | None = None


def _import() -> None:
    global _error
    started = time.perf_counter()
    try:
        for name in MODULES:
            importlib.import_module(name)
    except BaseException as exc:  # re-raised in the thread that asks for the classes
        _error = exc
    log.debug("transformers' CLIP imported in %.2f s", time.perf_counter() - started)


def start_import() -> None:
    """Import transformers' CLIP modules in a daemon thread unless that has started already (or is done)."""
    global _thread
    with _lock:
        if _thread is None and _classes is None:
            _thread = threading.Thread(target=_import, name="import-transformers", daemon=True)
            _thread.start()


def clip_classes() -> SimpleNamespace:
    """transformers' CLIP config and model classes (NAMES), waiting for a background import if one runs."""
    global _classes
    if _classes is not None:
        return _classes
    start_import()
    assert _thread is not None
    _thread.join()
    if _error is not None:
        raise ImportError(f"transformers' CLIP models cannot be imported: {_error}") from _error
    modules = [importlib.import_module(name) for name in MODULES]
    found = {name: getattr(module, name) for module in modules for name in NAMES if hasattr(module, name)}
    _classes = SimpleNamespace(**found)
    return _classes
