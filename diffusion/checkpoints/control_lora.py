"""Stability's Control-LoRA files (control-lora-canny/depth/recolor/sketch, rank 128 and 256, for SDXL; the same
layout exists for SD1.x): a ControlNet stored as low-rank differences to the model it is applied to.

The layout (original ControlNet key names, no prefix):
- `lora_controlnet`: an empty marker tensor;
- the ControlNet's own layers in full: `input_hint_block.*`, `zero_convs.*`, `middle_block_out.*`;
- for the copied UNet encoder (`time_embed`, `label_emb`, `input_blocks`, `middle_block`): every convolution and
  linear layer as a pair `<layer>.up` [out, rank(, 1, 1)] and `<layer>.down` [rank, in(, kh, kw)], whose product
  (flattened to matrices, unscaled: the LoRA alpha is the rank) is added to the base model's `<layer>.weight`;
  norms and biases stored in full, replacing the model's.
A weight the file does not mention is the model's own. So the ControlNet exists only together with a model:
`compose_control_lora` builds it from the model's UNet shape and weights (the MODEL's, with its own patches).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from ..models.controlnet import ControlNet, ControlNetConfig
from ..models.unet import UNetConfig
from .controlnet_files import CONTROL_PREFIX, _hint_shape
from .families import TITLES, config_metadata
from .files import CheckpointError, read_metadata, read_state_dict, strip_prefix
from .loader import fill_module

Tensor = torch.Tensor
BaseWeights = Callable[[str], Tensor | None]

MARKER = "lora_controlnet"
ENCODER_PREFIXES = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.")
# SDXL's ADM width tells base from refiner; the cross-attention width tells SD1 (CLIP-L) from SD2 (OpenCLIP-H).
_ADM_FAMILIES = {2816: "sdxl", 2560: "sdxl_refiner"}
_CONTEXT_FAMILIES = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


@dataclass(frozen=True)
class HintSpec:
    """The hint encoder of a Control-LoRA: what the apply path reads of a ControlNet's config before the network
    exists (its hint channels and how much larger than the latent the hint is)."""

    hint_channels: int
    hint_widths: tuple[int, ...]

    @property
    def hint_downscale(self) -> int:
        return 2 ** (len(self.hint_widths) - 1)


@dataclass(frozen=True)
class ControlLoraInfo:
    """A Control-LoRA file: the family it was made for, its rank and its hint encoder."""

    family: str
    rank: int
    hint: HintSpec

    @property
    def config(self) -> HintSpec:
        """Under the name ControlNetInfo gives its config, for the apply path's hint handling."""
        return self.hint

    @property
    def title(self) -> str:
        return f"{TITLES.get(self.family, self.family)} Control-LoRA"


def is_control_lora(sd: Mapping[str, Tensor]) -> bool:
    return MARKER in sd or CONTROL_PREFIX + MARKER in sd


def _factors(sd: Mapping[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """layer -> (up, down) for every low-rank pair; an error for a half pair."""
    ups = {k[:-3] for k in sd if k.endswith(".up")}
    downs = {k[:-5] for k in sd if k.endswith(".down")}
    if ups != downs:
        odd = sorted(ups ^ downs)
        raise CheckpointError(f"Control-LoRA has {len(odd)} layers with only one of .up/.down, e.g. {odd[:4]}")
    return {layer: (sd[layer + ".up"], sd[layer + ".down"]) for layer in sorted(ups)}


def _family(sd: Mapping[str, Tensor], factors: Mapping[str, tuple[Tensor, Tensor]], metadata: Mapping[str, str]) -> str:
    given = config_metadata(metadata).get("family")
    if given in TITLES:
        return given
    adm = factors.get("label_emb.0.0")
    if adm is not None or "label_emb.0.0.weight" in sd:
        width = int(adm[1].shape[1]) if adm is not None else int(sd["label_emb.0.0.weight"].shape[1])
        if width in _ADM_FAMILIES:
            return _ADM_FAMILIES[width]
    for layer, (_, down) in factors.items():
        if layer.endswith("attn2.to_k") and int(down.shape[1]) in _CONTEXT_FAMILIES:
            return _CONTEXT_FAMILIES[int(down.shape[1])]
    raise CheckpointError("Control-LoRA: cannot tell which model family it was made for (no SDXL ADM layer and no "
                          "cross-attention of a known width)")


def control_lora_state_dict(sd: Mapping[str, Tensor],
                            metadata: Mapping[str, str] | None = None) -> tuple[dict[str, Tensor], ControlLoraInfo]:
    """The file's weights (bare names, without the marker) and what it is."""
    bare = strip_prefix(sd, CONTROL_PREFIX) or dict(sd)
    if MARKER not in bare:
        raise CheckpointError(f"not a Control-LoRA: no {MARKER!r} marker key")
    bare = {k: v for k, v in bare.items() if k != MARKER}
    if "input_hint_block.0.weight" not in bare or "zero_convs.0.0.weight" not in bare:
        raise CheckpointError("Control-LoRA without its ControlNet layers: missing input_hint_block.0.weight or "
                              "zero_convs.0.0.weight")
    factors = _factors(bare)
    if not factors:
        raise CheckpointError("Control-LoRA without low-rank layers (no .up/.down pairs)")
    rank = int(next(iter(factors.values()))[1].shape[0])
    hint_channels, widths = _hint_shape(bare)
    return bare, ControlLoraInfo(_family(bare, factors, metadata or {}), rank, HintSpec(hint_channels, widths))


def read_control_lora(path: str | os.PathLike) -> tuple[dict[str, Tensor], ControlLoraInfo]:
    """A Control-LoRA file's weights (lazy views for safetensors) and what it is."""
    return control_lora_state_dict(read_state_dict(path), read_metadata(path))


def composed_weights(sd: Mapping[str, Tensor], info: ControlLoraInfo, unet: UNetConfig,
                     base: BaseWeights) -> tuple[ControlNetConfig, dict[str, Tensor]]:
    """The full ControlNet weights for a model of `unet`'s shape: the file's full weights, the model's weights
    (`base(key)`, None where it has none) plus up @ down where the file has factors, the model's own elsewhere."""
    config = ControlNetConfig(unet, info.hint.hint_channels, info.hint.hint_widths)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in ControlNet(config).state_dict().items()}
    factors = _factors(sd)
    used = set()
    out: dict[str, Tensor] = {}
    for key, shape in shapes.items():
        layer = key.removesuffix(".weight")
        if key in sd:
            out[key] = sd[key]
            used.add(key)
            continue
        weight = base(key) if key.startswith(ENCODER_PREFIXES) else None
        if weight is None:
            raise CheckpointError(f"{info.title}: {key} is neither in the file nor in the model")
        if tuple(weight.shape) != shape:
            raise CheckpointError(f"{info.title}: the model's {key} is {list(weight.shape)} where the ControlNet "
                                  f"needs {list(shape)}")
        if key.endswith(".weight") and layer in factors:
            up, down = factors[layer]
            delta = up.flatten(1).float() @ down.flatten(1).float()
            if delta.numel() != weight.numel():
                raise CheckpointError(f"{info.title}: {layer}.up @ {layer}.down is {list(delta.shape)}, which does "
                                      f"not fit the model's {key} {list(weight.shape)}: it was made for another "
                                      f"model")
            weight = weight.float().cpu() + delta.reshape(shape)
            used.update((layer + ".up", layer + ".down"))
        out[key] = weight
    unknown = sorted(set(sd) - used)
    if unknown:
        raise CheckpointError(f"{info.title}: {len(unknown)} keys fit no layer of the ControlNet for this model, "
                              f"e.g. {unknown[:4]}")
    return config, out


def compose_control_lora(sd: Mapping[str, Tensor], info: ControlLoraInfo, unet: UNetConfig, base: BaseWeights, *,
                         dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> ControlNet:
    """The ControlNet a Control-LoRA makes of a model (see composed_weights), built on the meta device and filled by
    assignment in `dtype`."""
    config, weights = composed_weights(sd, info, unet, base)
    with torch.device("meta"):
        net = ControlNet(config)
    return fill_module(net, weights, info.title, dtype, torch.device(device))


def is_control_lora_file(path: str | os.PathLike) -> bool:
    """Whether a file is a Control-LoRA (cheap for safetensors: only the header is read)."""
    return is_control_lora(read_state_dict(path))
