"""ControlNet files: which layout and family a file holds, loading it, and random ones for tests.

Layouts read (`.safetensors` memory-mapped, `.pth`/`.ckpt`/`.pt`/`.bin` through the safe pickle reader):
- the original release's: `input_blocks…`, `input_hint_block…`, `zero_convs…`, `middle_block_out…`, bare or
  under `control_model.` (as the `.pth` files of the ControlNet paper's release);
- diffusers' ControlNetModel: `controlnet_cond_embedding…`, `down_blocks…`, `controlnet_down_blocks…`,
  `controlnet_mid_block…` (renamed by controlnet_keys.py);
- "diff" ControlNets: an original-layout file with a `difference` key, whose encoder weights are differences to
  a base model's UNet; they load only with that model's weights added (DiffControlNetLoader).

The family comes from shapes as for checkpoints (an ADM input: SDXL; linear transformer projections: SD2; else
SD1) or from the file's `latentloom.config` metadata, which tiny test files carry with the head layout.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from ..models.controlnet import ControlNet, ControlNetConfig
from ..models.controlnet_union import UNION_KEYS, UnionConfig, UnionControlNet, is_union
from ..models.unet import UNetConfig
from .controlnet_keys import diffusers_to_original, original_to_diffusers
from .families import CONFIG_METADATA_KEY, TITLES, config_metadata
from .files import CheckpointError, key_prefixes, read_metadata, read_state_dict, strip_prefix, write_safetensors
from .loader import _stored_dtype, fill_module
from .random_checkpoints import checkpoint_spec, random_tensor

Tensor = torch.Tensor

CONTROL_PREFIX = "control_model."
DIFF_MARKER = "difference"  # the key that marks a diff ControlNet (as ComfyUI reads them)
LAYOUTS = ("original", "diffusers")


@dataclass(frozen=True)
class ControlNetInfo:
    """What a ControlNet file holds: its family ("sd1", "sd2", "sdxl"), the layout it was stored in, whether
    its encoder weights are differences to a base model, and the network's shape."""

    family: str
    layout: str
    diff: bool
    config: ControlNetConfig
    union: UnionConfig | None = None  # a union ControlNet's extra parts (models/controlnet_union.py)

    @property
    def title(self) -> str:
        return TITLES.get(self.family, self.family)


def _found(sd: Mapping[str, Tensor]) -> str:
    shown = dict(sorted(key_prefixes(sd).items(), key=lambda kv: -kv[1])[:8])
    return f"found {len(sd)} keys with prefixes {shown}"


def _not_a_controlnet(sd: Mapping[str, Tensor]) -> str:
    """An error naming what the file seems to be instead."""
    keys = set(sd)
    prefixes = key_prefixes(sd)
    if any(k.startswith("model.diffusion_model.") for k in keys):
        what = "a full Stable Diffusion checkpoint (load it with a checkpoint loader)"
    elif "lora_controlnet" in keys:
        what = "a Control-LoRA (read by control_lora.py, which composes it with a model)"
    elif any(k.startswith(("task_embedding", "control_add_embedding")) for k in keys):
        what = "a union ControlNet without its hint encoder"
    elif any(k.startswith(("adapter.", "body.", "conv_in.weight")) for k in keys) and "input_blocks" not in prefixes \
            and not any(k.startswith("down_blocks.") for k in keys):
        what = "a T2I-Adapter (not supported yet)"
    elif {"encoder", "decoder"} <= prefixes.keys():
        what = "a VAE"
    elif "input_blocks" in prefixes and "output_blocks" in prefixes:
        what = "a UNet (diffusion model)"
    elif any(k.startswith(("lora_unet_", "lora_te")) or ".lora_" in k for k in keys):
        what = "a LoRA"
    elif "down_blocks" in prefixes and "up_blocks" in prefixes:
        what = "a diffusers UNet"
    else:
        what = "no ControlNet"
    return (f"not a ControlNet: {_found(sd)}; this looks like {what}. A ControlNet has input_hint_block.* and "
            f"zero_convs.* (original layout, optionally under {CONTROL_PREFIX}) or controlnet_cond_embedding.* "
            f"(diffusers layout)")


def controlnet_state_dict(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], str, bool]:
    """(the weights under our names, the layout they were stored in, whether they are a diff ControlNet)."""
    diff = DIFF_MARKER in sd
    if "lora_controlnet" in sd or CONTROL_PREFIX + "lora_controlnet" in sd:
        raise CheckpointError("this is a Control-LoRA (low-rank differences to a model's UNet): ControlNetLoader "
                              "composes it with the model it is applied to (checkpoints/control_lora.py)")
    prefixed = strip_prefix(sd, CONTROL_PREFIX)
    bare = prefixed or {k: v for k, v in sd.items() if k != DIFF_MARKER}
    if "input_hint_block.0.weight" in bare and "zero_convs.0.0.weight" in bare:
        return bare, "original", diff
    if "controlnet_cond_embedding.conv_in.weight" in bare:  # a union file's own keys have one name in both layouts
        union = {k: v for k, v in bare.items() if k.startswith(UNION_KEYS)}
        rest = {k: v for k, v in bare.items() if k not in union}
        return {**diffusers_to_original(rest), **union}, "diffusers", diff
    raise CheckpointError(_not_a_controlnet(sd))


def _hint_shape(sd: Mapping[str, Tensor]) -> tuple[int, tuple[int, ...]]:
    """(hint channels, hint encoder widths) from the hint convs: conv 0 into w0, then per width a conv keeping
    it and one into the next, then the last conv into the UNet's width."""
    convs = sorted(int(k.split(".")[1]) for k in sd if k.startswith("input_hint_block.") and k.endswith(".weight"))
    if len(convs) < 2 or len(convs) % 2 or convs != list(range(0, 2 * len(convs), 2)):
        raise CheckpointError(f"ControlNet hint encoder has an unexpected layout: convs at input_hint_block.{convs}")
    outs = [int(sd[f"input_hint_block.{i}.weight"].shape[0]) for i in convs]
    widths = (outs[0], *outs[2:-1:2])
    return int(sd["input_hint_block.0.weight"].shape[1]), widths


def _family(unet: UNetConfig, config: dict) -> str:
    if config.get("family") in TITLES:
        return config["family"]
    if unet.adm_in_channels is not None:
        return "sdxl_refiner" if unet.adm_in_channels == 2560 else "sdxl"
    return "sd2" if unet.use_linear_in_transformer else "sd1"


def controlnet_info(sd: Mapping[str, Tensor], layout: str, diff: bool,
                    metadata: Mapping[str, str] | None = None) -> ControlNetInfo:
    """The family and shape of a ControlNet state dict under our names."""
    config = config_metadata(metadata)
    heads = config.get("unet", {})
    if "input_blocks.0.0.weight" not in sd:
        raise CheckpointError(f"ControlNet without its encoder: missing input_blocks.0.0.weight ({_found(sd)})")
    # The encoder copy reads like a UNet; a stand-in output conv gives from_state_dict the out width it asks for.
    stand_in = {**sd, "out.2.weight": torch.empty(sd["input_blocks.0.0.weight"].shape[1], 0, device="meta")}
    try:
        unet = UNetConfig.from_state_dict(stand_in, num_heads=heads.get("num_heads"),
                                          num_head_channels=heads.get("num_head_channels"),
                                          norm_groups=heads.get("norm_groups"))
    except ValueError as e:
        raise CheckpointError(f"ControlNet encoder cannot be read: {e}") from None
    hint_channels, widths = _hint_shape(sd)
    cn = ControlNetConfig(unet, hint_channels, widths)
    try:
        union = UnionConfig.from_state_dict(sd) if is_union(sd) else None
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"union ControlNet cannot be read: {e}") from None
    return ControlNetInfo(_family(unet, config), layout, diff, cn, union)


def read_controlnet(path: str | os.PathLike) -> tuple[dict[str, Tensor], ControlNetInfo]:
    """A ControlNet file's weights (our names; lazy views for safetensors) and what it is."""
    sd = read_state_dict(path)
    ours, layout, diff = controlnet_state_dict(sd)
    return ours, controlnet_info(ours, layout, diff, read_metadata(path))


BaseWeights = Callable[[str], Tensor | None]


def is_diff_controlnet(path: str | os.PathLike) -> bool:
    """Whether a file is marked as a diff ControlNet (cheap for safetensors: only the header is read)."""
    return DIFF_MARKER in read_state_dict(path)


def build_controlnet(sd: Mapping[str, Tensor], info: ControlNetInfo, *, dtype: torch.dtype | None = None,
                     device: str | torch.device = "cpu", base: BaseWeights | None = None) -> ControlNet:
    """The ControlNet of `read_controlnet`'s weights, built on the meta device and filled by assignment. A diff
    ControlNet needs `base(key)`: the base model's UNet weight of that name (None where the UNet has none), added
    to the stored difference; a plain ControlNet ignores `base`."""
    if info.diff:
        if base is None:
            raise CheckpointError("this is a diff ControlNet (its weights are differences to a base model): load it "
                                  "with DiffControlNetLoader, which adds the model's weights")
        sd = _add_base(dict(sd), base)
    dtype = dtype or _stored_dtype(sd)
    with torch.device("meta"):
        net = ControlNet(info.config) if info.union is None else UnionControlNet(info.config, info.union)
    fill_module(net, sd, f"{info.title} {'union ' if info.union else ''}ControlNet", dtype, torch.device(device))
    return net


def load_controlnet(path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    base: BaseWeights | None = None) -> tuple[ControlNet, ControlNetInfo]:
    """`read_controlnet` then `build_controlnet`."""
    sd, info = read_controlnet(path)
    return build_controlnet(sd, info, dtype=dtype, device=device, base=base), info


def _add_base(sd: dict[str, Tensor], base: BaseWeights) -> dict[str, Tensor]:
    out = {}
    for key, value in sd.items():
        weight = base(key) if key.startswith(("time_embed.", "label_emb.", "input_blocks.", "middle_block.")) else None
        if weight is not None and tuple(weight.shape) != tuple(value.shape):
            raise CheckpointError(f"diff ControlNet weight {key} is {list(value.shape)} but the model's is "
                                  f"{list(weight.shape)}: the ControlNet was made for another model family")
        out[key] = value if weight is None else (value.float() + weight.float().cpu()).to(value.dtype)
    return out


# --- writing (tests, benchmarks) ----------------------------------------------------------------------------


def _metadata(family: str, unet: UNetConfig) -> dict[str, str]:
    heads = {"num_heads": unet.num_heads} if unet.num_heads > 0 else {"num_head_channels": unet.num_head_channels}
    config = {"family": family, "unet": {**heads, "norm_groups": unet.norm_groups}}
    return {CONFIG_METADATA_KEY: json.dumps(config, sort_keys=True)}


def write_controlnet_file(path: str | os.PathLike, sd: Mapping[str, Tensor], info: ControlNetInfo, *,
                          layout: str = "original", prefix: bool = False, diff: bool = False,
                          dtype: torch.dtype = torch.float32) -> None:
    """Write weights under our names as a `.safetensors` ControlNet file in `layout` (under `control_model.` when
    `prefix`, original layout only), marked as a diff ControlNet when `diff`, with the head layout in metadata."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if prefix and layout != "original":
        raise ValueError("the control_model. prefix exists in the original layout only")
    union = {k: v for k, v in sd.items() if k.startswith(UNION_KEYS)}
    rest = {k: v for k, v in sd.items() if k not in union}
    named = {**(rest if layout == "original" else original_to_diffusers(rest, info.config)), **union}
    if prefix:
        named = {CONTROL_PREFIX + k: v for k, v in named.items()}
    if diff:
        named[DIFF_MARKER] = torch.zeros(0)
    shapes = {k: (dtype if v.dtype.is_floating_point else v.dtype, tuple(v.shape)) for k, v in named.items()}
    write_safetensors(path, shapes, lambda k: named[k].detach().to(shapes[k][0]).contiguous(),
                      {"format": "pt", **_metadata(info.family, info.config.unet)})


def random_controlnet(family: str, *, size: str = "tiny", seed: int = 0,
                      unet: UNetConfig | None = None) -> tuple[dict[str, Tensor], ControlNetInfo]:
    """Random weights (our names) of a ControlNet for the `family` checkpoints random_checkpoints.py writes at
    `size` (or for `unet`), scaled as random checkpoints are (zero convs random too, so outputs are not zero)."""
    unet = unet or checkpoint_spec(family, size).unet
    info = ControlNetInfo(family, "original", False, ControlNetConfig(unet))
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in ControlNet(info.config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    return {k: random_tensor(k, shape, gen) for k, shape in sorted(shapes.items())}, info


def write_random_controlnet(path: str | os.PathLike, family: str, *, size: str = "tiny", seed: int = 0,
                            layout: str = "original", prefix: bool = False) -> ControlNetInfo:
    """A random ControlNet file fitting the random `family` checkpoints of `size` (see random_controlnet)."""
    sd, info = random_controlnet(family, size=size, seed=seed)
    write_controlnet_file(path, sd, info, layout=layout, prefix=prefix)
    return info
