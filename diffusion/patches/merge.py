"""Model merging as weight patches: weighted sums of two models' weights, per key or per UNet block.

A merge never writes weights. It adds `ModelWeight` patches (patcher.py) to a clone of the first model: for
each parameter `k` the second model also has, with the same shape,

    W'_k = a_k · W1_k + b_k · W2_k

where W1_k is the first model's weight with the patches it already carries (a LoRA loaded before the merge)
and W2_k the second model's weight with *its* patches, both read when the merged model is patched. The three
operations ComfyUI offers are choices of (a, b):

- interpolation (ModelMergeSimple, per block in ModelMergeBlocks/SD1/SD2/SDXL, CLIPMergeSimple):
  a = r, b = 1 - r, so r = 1 keeps the first model and r = 0 takes the second;
- difference (ModelMergeSubtract, CLIPMergeSubtract): a = m, b = -m, i.e. m · (W1 - W2);
- sum (ModelMergeAdd, CLIPMergeAdd): a = b = 1.

Both inputs stay as they were: the clone has its own patch list, and the shared modules are patched only
while a model runs (or is saved), then restored bit-exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from .patcher import ModelPatcher, ModelWeight

log = logging.getLogger(__name__)

# Text-encoder entries that are not weights to blend (ComfyUI skips them too); buffers, in our modules.
CLIP_SKIPPED_SUFFIXES = (".position_ids", ".logit_scale")


class MergeError(ValueError):
    """Two models that cannot be merged (nothing in common), or ratios that name no block."""


def merge_patches(
    target: ModelPatcher,
    source: ModelPatcher,
    coefficients: Callable[[str], tuple[float, float]],
    *,
    what: str = "model",
    skip_suffixes: tuple[str, ...] = (),
) -> list[str]:
    """Queue W'_k = a · W1_k + b · W2_k on `target` (a clone: it is changed) for every parameter `k` that both
    have with equal shapes, (a, b) = coefficients(k). Returns the keys of `source` that were left out because
    `target` lacks them or their shapes differ (ComfyUI leaves them out too, which is what lets an inpainting
    model take a normal model's difference). Raises MergeError when no key at all can be merged."""
    target_params = {name: tuple(p.shape) for name, p in target.model.named_parameters()}
    skipped, merged = [], 0
    by_strength: dict[float, dict[str, ModelWeight]] = {}  # add_patches takes one strength per call
    for key, param in source.model.named_parameters():
        if key.endswith(skip_suffixes):
            continue
        shape = tuple(param.shape)
        if target_params.get(key) != shape:
            skipped.append(key)
            continue
        a, b = coefficients(key)
        by_strength.setdefault(b, {})[key] = ModelWeight(source, key, shape, model_scale=a)
        merged += 1
    for b, patches in by_strength.items():
        target.add_patches(patches, b)
    if merged == 0:
        raise MergeError(
            f"the two {what}s have no weight in common ({len(skipped)} of the second's weights are missing from "
            f"the first or shaped differently, e.g. {skipped[:3]}); are they of the same family?"
        )
    if skipped:
        log.warning("%s merge: %d weights of the second model are missing from the first or shaped differently, "
                    "left as the first's (e.g. %s)", what, len(skipped), ", ".join(skipped[:3]))
    return skipped


def interpolation(ratio: float) -> Callable[[str], tuple[float, float]]:
    """a = ratio, b = 1 - ratio for every key."""
    return lambda key: (ratio, 1.0 - ratio)


def difference(multiplier: float) -> Callable[[str], tuple[float, float]]:
    """multiplier · (W1 - W2)."""
    return lambda key: (multiplier, -multiplier)


def addition() -> Callable[[str], tuple[float, float]]:
    """W1 + W2."""
    return lambda key: (1.0, 1.0)


def block_ratio(ratios: Mapping[str, float], key: str) -> float:
    """The ratio of the longest prefix in `ratios` that `key` (a UNet parameter name) starts with; a key that
    no prefix matches takes the first ratio given (ComfyUI's rule, with ratios in declared input order).

    Prefixes are plain string prefixes, as in ComfyUI: "out" matches `output_blocks.*` and `out.*`, and SD1's
    node spells "input_blocks.1." with its dot so that it does not also match `input_blocks.10`."""
    if not ratios:
        raise MergeError("a block merge needs at least one ratio")
    best, ratio = -1, next(iter(ratios.values()))
    for prefix, value in ratios.items():
        if key.startswith(prefix) and len(prefix) > best:
            best, ratio = len(prefix), value
    return ratio


def block_interpolation(ratios: Mapping[str, float]) -> Callable[[str], tuple[float, float]]:
    """Interpolation with the ratio of each key's block (see `block_ratio`)."""
    ordered = dict(ratios)

    def coefficients(key: str) -> tuple[float, float]:
        r = block_ratio(ordered, key)
        return r, 1.0 - r

    return coefficients
