"""Hypernetworks: NovelAI's style modules in the file layout AUTOMATIC1111's web UI trains and saves.

A hypernetwork is a pair of small MLPs per attention width: one transforms what an attention's keys are
projected from, the other what its values are projected from, each as a residual, x + mlp(x) * strength, so
strength 0 is the plain model. A width matches every attention whose key input has that many features: the
text context (768 in SD1, 1024 in SD2) for the cross-attentions, and the block widths (320, 640, 1280) for the
self-attentions, whose keys come from the image tokens; A1111 trains all four widths by default. Several
hypernetworks chain, each transforming the previous one's output.

The `.pt` file is a torch pickle of a dict: integer keys (widths) -> [k_layers, v_layers], each a layer state
dict `linear.{i}.weight/bias` (2-D weights: Linear; 1-D: LayerNorm; parameter-free activations and dropouts
take indices without keys), plus metadata: `activation_func`, `activate_output` (whether the last Linear gets
the activation too), `layer_structure`, `is_layer_norm`, `use_dropout`, `name`, `step`, `sd_checkpoint`...
NovelAI's original files name their two Linears `linear1`, `linear2`. Files are read with
`checkpoints.files.read_pickle`: tensors and plain containers only, never code.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoints.files import CheckpointError, read_pickle
from .unet_patches import Site, UNetPatches

log = logging.getLogger(__name__)

# A1111's activation names: its own five plus torch's activations by lower-cased class name. Only those that
# keep the shape and have no weights are taken (a PReLU's weight would be read as a layer).
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "linear": nn.Identity, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU, "swish": nn.Hardswish,
    "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU, "silu": nn.SiLU, "mish": nn.Mish,
    "softsign": nn.Softsign, "softplus": nn.Softplus, "hardswish": nn.Hardswish, "hardsigmoid": nn.Hardsigmoid,
    "hardtanh": nn.Hardtanh, "relu6": nn.ReLU6, "selu": nn.SELU, "celu": nn.CELU, "logsigmoid": nn.LogSigmoid,
    "tanhshrink": nn.Tanhshrink, "softshrink": nn.Softshrink, "hardshrink": nn.Hardshrink, "rrelu": nn.RReLU,
}
_LAYER_KEY = re.compile(r"linear\.(\d+)\.(weight|bias)")
_NOVELAI_KEYS = {"linear1": 0, "linear2": 1}


@dataclass
class Hypernetwork:
    """The MLP pairs of one file by width; `mlps[width] = (for keys, for values)`, on the CPU in float32."""

    name: str
    mlps: dict[int, tuple[nn.Sequential, nn.Sequential]]
    metadata: dict[str, object] = field(default_factory=dict)
    _placed: dict[str, dict[int, tuple[nn.Sequential, nn.Sequential]]] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def widths(self) -> list[int]:
        return sorted(self.mlps)

    def on(self, device: torch.device) -> dict[int, tuple[nn.Sequential, nn.Sequential]]:
        """The MLPs on `device` (copied there once, then kept: they are small next to the UNet)."""
        key = str(device)
        with self._lock:
            if key not in self._placed:
                self._placed[key] = self.mlps if device.type == "cpu" else {
                    width: (k.to(device), v.to(device)) for width, (k, v) in self.mlps.items()}
            return self._placed[key]


def load_hypernetwork(path: str | Path, name: str | None = None) -> Hypernetwork:
    """The hypernetwork of an A1111 `.pt` file; errors name the file and what in it is wrong."""
    path = Path(path)
    loaded = read_pickle(path)
    return build_hypernetwork(loaded, name or path.stem, source=str(path))


def build_hypernetwork(loaded: object, name: str, source: str = "hypernetwork") -> Hypernetwork:
    """Rebuilds the MLPs from the pickled dict (see the module docstring for its layout)."""
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{source}: not a hypernetwork: the file holds a {type(loaded).__name__}, not a dict")
    activation = str(loaded.get("activation_func") or "linear").lower()
    if activation not in ACTIVATIONS:
        raise CheckpointError(f"{source}: activation_func {activation!r} is not supported; supported: "
                              f"{', '.join(ACTIVATIONS)}")
    activate_output = bool(loaded.get("activate_output", False))
    structure = loaded.get("layer_structure")
    mlps: dict[int, tuple[nn.Sequential, nn.Sequential]] = {}
    for key, value in loaded.items():
        width = _width(key)
        if width is None:
            continue
        if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(isinstance(v, Mapping) for v in value):
            raise CheckpointError(f"{source}: width {width}: expected a pair of layer dicts (keys, values), "
                                  f"got {type(value).__name__}")
        where = f"{source}: width {width}"
        mlps[width] = (_mlp(value[0], width, activation, activate_output, structure, f"{where}, keys"),
                       _mlp(value[1], width, activation, activate_output, structure, f"{where}, values"))
    if not mlps:
        raise CheckpointError(f"{source}: not a hypernetwork: no integer (attention width) keys with layers; "
                              f"keys are {sorted(map(str, loaded))[:10]}")
    metadata = {k: v for k, v in loaded.items() if _width(k) is None and not isinstance(v, Tensor)}
    return Hypernetwork(name=name, mlps=mlps, metadata=metadata)


def _width(key: object) -> int | None:
    """An attention width key (A1111 saves ints; a str of digits is accepted too)."""
    if isinstance(key, bool):
        return None
    if isinstance(key, int):
        return key
    if isinstance(key, str) and key.isdigit():
        return int(key)
    return None


def _mlp(state: Mapping[str, object], width: int, activation: str, activate_output: bool,
         structure: object, where: str) -> nn.Sequential:
    """Linear and LayerNorm layers in index order, the activation after every Linear but the last (after the
    last too with `activate_output`), dropout left out (inference)."""
    params: dict[int, dict[str, Tensor]] = {}
    for key, tensor in state.items():
        if key in ("linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"):
            stem, kind = key.split(".")
            index = _NOVELAI_KEYS[stem]
        else:
            match = _LAYER_KEY.fullmatch(str(key))
            if match is None:
                raise CheckpointError(f"{where}: unexpected key {key!r} (expected linear.N.weight / linear.N.bias)")
            index, kind = int(match.group(1)), match.group(2)
        if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
            raise CheckpointError(f"{where}: {key} is not a floating-point tensor")
        params.setdefault(index, {})[kind] = tensor
    linears = [i for i in sorted(params) if params[i].get("weight") is not None and params[i]["weight"].ndim == 2]
    if not linears:
        raise CheckpointError(f"{where}: no Linear layers")
    layers: list[nn.Module] = []
    features = width
    for i in sorted(params):
        entry = params[i]
        weight, bias = entry.get("weight"), entry.get("bias")
        if weight is None or bias is None:
            raise CheckpointError(f"{where}: layer linear.{i} lacks its {'weight' if weight is None else 'bias'}")
        if weight.ndim == 2:
            if weight.shape[1] != features or tuple(bias.shape) != (weight.shape[0],):
                raise CheckpointError(f"{where}: linear.{i} maps {weight.shape[1]} -> {weight.shape[0]} features "
                                      f"(bias {tuple(bias.shape)}), but {features} come in")
            layer = nn.Linear(weight.shape[1], weight.shape[0])
            features = weight.shape[0]
            layers.append(_loaded(layer, weight, bias))
            if activation != "linear" and (i != linears[-1] or activate_output):
                layers.append(ACTIVATIONS[activation]())
        elif weight.ndim == 1 and tuple(weight.shape) == tuple(bias.shape) == (features,):
            layers.append(_loaded(nn.LayerNorm(features), weight, bias))
        else:
            raise CheckpointError(f"{where}: linear.{i} has weight {tuple(weight.shape)} and bias "
                                  f"{tuple(bias.shape)}: neither a Linear nor a LayerNorm of {features} features")
    if features != width:
        raise CheckpointError(f"{where}: the layers end with {features} features, not the width {width}")
    _check_structure(structure, width, [params[i]["weight"].shape[0] for i in linears], where)
    return nn.Sequential(*layers).eval().requires_grad_(False)


def _loaded(layer: nn.Module, weight: Tensor, bias: Tensor) -> nn.Module:
    layer.load_state_dict({"weight": weight.float(), "bias": bias.float()})
    return layer


def _check_structure(structure: object, width: int, outs: list[int], where: str) -> None:
    """`layer_structure` (e.g. [1, 2, 1]: widths as multiples of the input's) must agree with the layers."""
    if not isinstance(structure, (list, tuple)) or not structure:
        return
    expected = [int(width * float(m)) for m in structure[1:]]
    if expected != outs:
        raise CheckpointError(f"{where}: layer_structure {list(structure)} means output widths {expected}, but "
                              f"the layers have {outs}")


def attention_input_widths(unet: nn.Module) -> set[int]:
    """The feature counts every attention of `unet` projects its keys from (block widths and context dims)."""
    return {m.in_features for name, m in unet.named_modules() if name.endswith(".to_k") and isinstance(m, nn.Linear)}


def check_hypernetwork_fits(hypernetwork: Hypernetwork, widths: Iterable[int], model_title: str) -> None:
    """Refuses a hypernetwork with a width no attention of the model has: it was trained for another family
    (SD2's 1024-wide context on SD1, whose context is 768), and applying the rest would be a partial patch."""
    widths = set(widths)
    foreign = [w for w in hypernetwork.widths if w not in widths]
    if foreign:
        raise ValueError(f"hypernetwork {hypernetwork.name!r} has layers for attention widths {hypernetwork.widths}; "
                         f"{model_title} has no attention input of width {', '.join(map(str, foreign))} (its are "
                         f"{sorted(widths)}): the hypernetwork was trained for another model family")


def hypernetwork_patches(hypernetwork: Hypernetwork, strength: float) -> UNetPatches:
    """UNet patches adding `strength` * the hypernetwork's MLP output to each attention's key and value inputs
    of a matching width; none at strength 0. The MLPs run in float32 whatever the UNet's dtype."""
    if strength == 0:
        return UNetPatches()

    def hook(k_in: Tensor, v_in: Tensor, site: Site) -> tuple[Tensor, Tensor]:
        pair = hypernetwork.on(k_in.device).get(k_in.shape[-1])
        if pair is None:
            return k_in, v_in
        mlp_k, mlp_v = pair
        k = (k_in.float() + mlp_k(k_in.float()) * strength).to(k_in.dtype)
        v = (v_in.float() + mlp_v(v_in.float()) * strength).to(v_in.dtype)
        return k, v

    return UNetPatches(attention_kv=(hook,))
