"""IP-Adapter weight types: how strongly each of the UNet's attention layers gets the image attention.

The ComfyUI_IPAdapter_plus node pack, whose nodes people's workflows use, names fifteen weight types; each
is a rule giving every attention layer a multiplier of the image attention's contribution (and, for the two
"precise" types, which layers see the reference image on the negative rows only). A layer is one
SpatialTransformer, numbered in the order the UNet runs them, as ComfyUI's `transformer_index` counts them:
input blocks, middle block, output blocks. Every transformer block of a layer (SDXL's 2 or 10) gets the
layer's multiplier. L is the number of layers: 16 for SD1.x/SD2.x (input blocks 1, 2, 4, 5, 7, 8 → 0-5,
middle → 6, output blocks 3-11 → 7-15), 11 for SDXL (input blocks 4, 5, 7, 8 → 0-3, middle → 4, output
blocks 0-5 → 5-10). Layers a rule does not list get nothing (their output is the plain cross-attention's).

w = the node's weight, wc = the composition weight (1.0 on the pack's IPAdapterAdvanced/IPAdapterEmbeds,
which have no such input: the pack passes its default 1.0 there, whatever `weight` is), t = the layer index:

| weight type            | SD1.x / SD2.x (L = 16)                      | SDXL (L = 11)                       |
|------------------------|---------------------------------------------|-------------------------------------|
| linear                 | every layer w                               | every layer w                       |
| ease in                | w (0.05 + 0.95 (1 - t/L))                   | same                                |
| ease out               | w (0.05 + 0.95 t/L)                         | same                                |
| ease in-out            | w (0.05 + 0.95 (1 - abs(t - L/2) / (L/2)))  | same                                |
| reverse in-out         | w (0.05 + 0.95 abs(t - L/2) / (L/2))        | same                                |
| weak input             | input layers 0.2 w, others w                | same                                |
| weak output            | output layers 0.2 w, others w               | same                                |
| weak middle            | middle layer 0.2 w, others w                | same                                |
| strong middle          | input and output layers 0.2 w, middle w     | same                                |
| style transfer         | 0-3, 9-15: w                                | 6 (output block 1): w               |
| composition            | 4: 0.25 w, 5: w                             | 3 (input block 8): w                |
| strong style transfer  | 0-3, 6-15: w                                | 0-2, 4-10: w                        |
| style and composition  | 0-3, 9-15: w; 4: 0.25 wc; 5: wc             | 3: wc, 6: w                         |
| style transfer precise | 0-3, 9-15: w; 4: 0.25 w*; 5: w*             | 3: w*, 6: w                         |
| composition precise    | 0-3, 9-15: w*; 4: 0.25 w; 5: w; 6-8: 0.1 w* | 3: w; 6: w*; 0-2, 4-5, 7-10: 0.1 w* |

`*`: a "flipped" layer: its positive rows get no image attention and its negative rows attend to the
reference image's tokens instead of the negative ones (the pack's precise types swap them so, to push the
composition, or for composition precise the style, away from the reference's under CFG). The simple
IPAdapter node's types are these rules: "standard" = linear, "prompt is more important" = ease out,
"style transfer" = style transfer.

Facts: the layer numbers and factors are those the pack's README, changelog, issues (#629, PR #797) and
InstantStyle (style: SDXL `up_blocks.0.attentions.1`, layout: `down_blocks.2.attentions.1`) give. Assumed:
which table applies is chosen by the MODEL's family (the pack reads it from the adapter's 2048-wide text
context; the same on every real model), and L is the number of SpatialTransformers of the UNet (the pack
takes 11 when the adapter has a projection numbered 101, else 16; the same on every real UNet).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

WEIGHT_TYPES = ("linear", "ease in", "ease out", "ease in-out", "reverse in-out", "weak input", "weak output",
                "weak middle", "strong middle", "style transfer", "composition", "strong style transfer",
                "style and composition", "style transfer precise", "composition precise")
# The simple IPAdapter node's types and the rule each one is.
SIMPLE_WEIGHT_TYPES = {"standard": "linear", "prompt is more important": "ease out", "style transfer": "style transfer"}

Block = tuple[str, int]  # ("input" | "middle" | "output", block index)


@dataclass(frozen=True)
class LayerWeight:
    """The image attention's multiplier at one layer; `flipped`: the negative rows attend to the reference image
    and the positive rows get nothing (the precise types)."""

    scale: float
    flipped: bool = False


def transformer_layers(unet: nn.Module) -> list[tuple[Block, str]]:
    """The blocks holding a SpatialTransformer in the order the UNet runs them (input, middle, output) — the
    layer index t of the module doc is the position in this list — each with its kind."""
    order: list[tuple[str, int, nn.Module]] = [("input", i, b) for i, b in enumerate(unet.input_blocks)]
    order.append(("middle", 0, unet.middle_block))
    order += [("output", i, b) for i, b in enumerate(unet.output_blocks)]
    return [((kind, index), kind) for kind, index, block in order
            if any(hasattr(layer, "transformer_blocks") for layer in block)]


def _ease(weight_type: str, t: int, layers: int) -> float:
    half = layers / 2
    return {"ease in": 0.05 + 0.95 * (1 - t / layers), "ease out": 0.05 + 0.95 * (t / layers),
            "ease in-out": 0.05 + 0.95 * (1 - abs(t - half) / half),
            "reverse in-out": 0.05 + 0.95 * (abs(t - half) / half)}[weight_type]


_WEAK = {"weak input": ("input",), "weak output": ("output",), "weak middle": ("middle",),
         "strong middle": ("input", "output")}


def _table(weight_type: str, w: float, wc: float, sdxl: bool) -> dict[int, LayerWeight]:
    """The layer-selecting types' tables (see the module doc)."""
    def same(layers, scale: float, flipped: bool = False) -> dict[int, LayerWeight]:
        return {t: LayerWeight(scale, flipped) for t in layers}

    sd1_style = [*range(0, 4), *range(9, 16)]
    if weight_type == "style transfer":
        return same([6], w) if sdxl else same(sd1_style, w)
    if weight_type == "composition":
        return same([3], w) if sdxl else {4: LayerWeight(w * 0.25), 5: LayerWeight(w)}
    if weight_type == "strong style transfer":
        return same([0, 1, 2, *range(4, 11)], w) if sdxl else same([*range(0, 4), *range(6, 16)], w)
    if weight_type == "style and composition":
        if sdxl:
            return {3: LayerWeight(wc), 6: LayerWeight(w)}
        return {**same(sd1_style, w), 4: LayerWeight(wc * 0.25), 5: LayerWeight(wc)}
    if weight_type == "style transfer precise":
        if sdxl:
            return {3: LayerWeight(w, True), 6: LayerWeight(w)}
        return {**same(sd1_style, w), 4: LayerWeight(w * 0.25, True), 5: LayerWeight(w, True)}
    if weight_type == "composition precise":
        if sdxl:
            return {**same([0, 1, 2, 4, 5, 7, 8, 9, 10], w * 0.1, True), 3: LayerWeight(w), 6: LayerWeight(w, True)}
        return {**same(sd1_style, w, True), 4: LayerWeight(w * 0.25), 5: LayerWeight(w),
                **same([6, 7, 8], w * 0.1, True)}
    raise ValueError(f"weight_type {weight_type!r} is not one of {', '.join(WEIGHT_TYPES)}")


def layer_weights(weight_type: str, weight: float, kinds: list[str], sdxl: bool,
                  weight_composition: float = 1.0) -> dict[int, LayerWeight]:
    """Layer index → its LayerWeight under `weight_type` for a UNet whose layers are of `kinds` ("input",
    "middle", "output", in run order); layers left out get no image attention. "linear" gives every layer
    exactly `weight`."""
    layers = len(kinds)
    if weight_type == "linear":
        return {t: LayerWeight(weight) for t in range(layers)}
    if weight_type in ("ease in", "ease out", "ease in-out", "reverse in-out"):
        return {t: LayerWeight(weight * _ease(weight_type, t, layers)) for t in range(layers)}
    if weight_type in _WEAK:
        return {t: LayerWeight(weight * 0.2 if kind in _WEAK[weight_type] else weight)
                for t, kind in enumerate(kinds)}
    return {t: rule for t, rule in _table(weight_type, weight, weight_composition, sdxl).items() if t < layers}


def block_weights(unet: nn.Module, weight_type: str, weight: float, sdxl: bool,
                  weight_composition: float = 1.0) -> dict[Block, LayerWeight]:
    """(block kind, block index) → LayerWeight for every block of `unet` that gets image attention."""
    layers = transformer_layers(unet)
    rules = layer_weights(weight_type, weight, [kind for _, kind in layers], sdxl, weight_composition)
    return {block: rules[t] for t, (block, _) in enumerate(layers) if t in rules}
