"""IP-Adapter (Ye et al. 2023, "IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image Diffusion
Models"): a CLIP image embedding projected into a few extra key/value tokens for every cross-attention.

An IP-Adapter file holds two parts, and attribute names here equal its keys:

- `image_proj.*`, the image projection, in one of three variants told apart by their keys:
  plain (`proj.weight`, `norm.*`: one Linear to num_tokens x cross_attention_dim, then a LayerNorm per token,
  fed the projected `image_embeds`), "plus" (a perceiver resampler: learnt `latents` queries attending over the
  CLIP tower's penultimate hidden states: `proj_in`, `layers.{i}.0` attention with `norm1`, `norm2`, `to_q`,
  `to_kv`, `to_out`, `layers.{i}.1.{0,1,3}` feed-forward, `proj_out`, `norm_out`) and "full" (an MLP
  `proj.{0,2}` with a LayerNorm `proj.3`, one output token per penultimate hidden state);
- `ip_adapter.{n}.to_k_ip.weight` / `to_v_ip.weight`: the key and value projections of the image tokens for
  the UNet's cross-attentions. n = 2m + 1 for the m-th cross-attention in diffusers' processor order (down
  blocks, then up blocks, then the middle block; within a block its transformer blocks in order): the original
  training code numbered all attention processors, self-attentions taking the even numbers.

Files are `.safetensors` with those keys, or a `.bin` torch pickle `{"image_proj": {...}, "ip_adapter":
{...}}`, read only through the safe readers of checkpoints/files.py (a pickle that needs code is refused).
The variant, the CLIP embedding width it expects and the family (text context 768: SD1.x, 2048: SDXL) are read
from the shapes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoints.files import CheckpointError, key_prefixes, read_pickle, read_state_dict, write_safetensors

log = logging.getLogger(__name__)

FAMILIES = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
FAMILY_TITLES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "sdxl_refiner": "SDXL refiner"}
RESAMPLER_HEAD_WIDTH = 64  # the released resamplers' heads are 64 wide (heads = width / 64), as diffusers reads them


class IPAdapterError(CheckpointError):
    """A file that is not an IP-Adapter, or one that does not fit the model it is applied to."""


class ImageProjModel(nn.Module):
    """Plain IP-Adapter: the projected image embedding [B, D] -> [B, num_tokens, C] tokens."""

    def __init__(self, clip_dim: int, cross_attention_dim: int, num_tokens: int) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.proj = nn.Linear(clip_dim, num_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, embeds: Tensor) -> Tensor:
        return self.norm(self.proj(embeds).reshape(embeds.shape[0], self.num_tokens, -1))


class MLPProjModel(nn.Module):
    """IP-Adapter "full": every penultimate hidden state [B, N, D] -> one token [B, N, C] through an MLP."""

    def __init__(self, clip_dim: int, cross_attention_dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(clip_dim, clip_dim), nn.GELU(), nn.Linear(clip_dim, cross_attention_dim),
                                  nn.LayerNorm(cross_attention_dim))

    def forward(self, embeds: Tensor) -> Tensor:
        return self.proj(embeds)


class PerceiverAttention(nn.Module):
    """The resampler's attention: its latent queries attend over the image features and themselves."""

    def __init__(self, dim: int, heads: int, dim_head: int = RESAMPLER_HEAD_WIDTH) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: Tensor, latents: Tensor) -> Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        b, n, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.view(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


def _feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    """LayerNorm, Linear up, GELU, Linear down (indices 0, 1, 3 are the file's keys; 2 is the GELU)."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class Resampler(nn.Module):
    """IP-Adapter "plus": `latents` [1, Q, W] queries refined by perceiver layers over the projected
    penultimate hidden states [B, N, D]; out: [B, Q, C]."""

    def __init__(self, clip_dim: int, width: int, cross_attention_dim: int, queries: int, depth: int,
                 heads: int, ff_mult: int = 4) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(1, queries, width))
        self.proj_in = nn.Linear(clip_dim, width)
        self.proj_out = nn.Linear(width, cross_attention_dim)
        self.norm_out = nn.LayerNorm(cross_attention_dim)
        self.layers = nn.ModuleList(nn.ModuleList([PerceiverAttention(width, heads), _feed_forward(width, ff_mult)])
                                    for _ in range(depth))

    def forward(self, embeds: Tensor) -> Tensor:
        latents = self.latents.expand(embeds.shape[0], -1, -1)
        x = self.proj_in(embeds)
        for attention, ff in self.layers:
            latents = attention(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class IPKV(nn.Module):
    """The key and value projections of the image tokens for one cross-attention."""

    def __init__(self, cross_attention_dim: int, width: int) -> None:
        super().__init__()
        self.to_k_ip = nn.Linear(cross_attention_dim, width, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, width, bias=False)


@dataclass(frozen=True)
class IPAdapterInfo:
    """What a file is: `variant` ("plain" | "plus" | "full"), the CLIP width it takes (`clip_dim`), the text
    context width it targets (`cross_attention_dim`), how many tokens one image gives, and which CLIP vision
    output it projects (`embeds`: "image_embeds" or "penultimate_hidden_states")."""

    variant: str
    clip_dim: int
    cross_attention_dim: int
    tokens: int
    width: int = 0
    depth: int = 0
    heads: int = 0

    @property
    def embeds(self) -> str:
        return "image_embeds" if self.variant == "plain" else "penultimate_hidden_states"

    @property
    def family(self) -> str | None:
        return FAMILIES.get(self.cross_attention_dim)

    @property
    def title(self) -> str:
        family = FAMILY_TITLES.get(self.family or "", f"{self.cross_attention_dim}-wide text context")
        return f"{self.variant} IP-Adapter for {family}"


class IPAdapterModel(nn.Module):
    """`image_proj` (the variant's projection) and `ip_adapter` ({"1": IPKV, "3": IPKV, ...})."""

    def __init__(self, info: IPAdapterInfo, widths: Mapping[int, int]) -> None:
        super().__init__()
        self.info = info
        if info.variant == "plain":
            self.image_proj: nn.Module = ImageProjModel(info.clip_dim, info.cross_attention_dim, info.tokens)
        elif info.variant == "full":
            self.image_proj = MLPProjModel(info.clip_dim, info.cross_attention_dim)
        else:
            self.image_proj = Resampler(info.clip_dim, info.width, info.cross_attention_dim, info.tokens,
                                        info.depth, info.heads)
        self.ip_adapter = nn.ModuleDict({str(n): IPKV(info.cross_attention_dim, w) for n, w in sorted(widths.items())})

    def project(self, embeds: Tensor) -> Tensor:
        """Image tokens [B, T, C] of CLIP vision embeddings ([B, D] plain; [B, N, D] plus and full)."""
        param = next(self.image_proj.parameters())
        want = 2 if self.info.variant == "plain" else 3
        if embeds.ndim != want or embeds.shape[-1] != self.info.clip_dim:
            shape = "[images, width]" if want == 2 else "[images, tokens, width]"
            raise IPAdapterError(f"the {self.info.title} takes {self.info.embeds} {shape} {self.info.clip_dim} wide; "
                                 f"got {list(embeds.shape)} (is the CLIP vision model the one it was trained with?)")
        return self.image_proj(embeds.to(param.device, param.dtype))


def detect(sd: Mapping[str, Tensor], name: str = "file") -> tuple[IPAdapterInfo, dict[int, int]]:
    """The variant and sizes of an IP-Adapter state dict (keys `image_proj.*`, `ip_adapter.*`) and the width of
    each numbered cross-attention; a clear error for anything else."""
    proj = {k[len("image_proj."):]: v for k, v in sd.items() if k.startswith("image_proj.")}
    kv = {k[len("ip_adapter."):]: v for k, v in sd.items() if k.startswith("ip_adapter.")}
    if not proj or not kv:
        found = ", ".join(f"{p} ({n})" for p, n in sorted(key_prefixes(sd).items())[:6]) or "no tensors"
        raise IPAdapterError(f"{name}: not an IP-Adapter (expected image_proj.* and ip_adapter.* keys; found {found})")
    widths: dict[int, int] = {}
    for key, value in kv.items():
        index, _, rest = key.partition(".")
        if not index.isdigit() or rest not in ("to_k_ip.weight", "to_v_ip.weight") or value.ndim != 2:
            raise IPAdapterError(f"{name}: unexpected IP-Adapter key ip_adapter.{key} {list(value.shape)}")
        widths[int(index)] = value.shape[0]
    if "latents" in proj:
        latents = proj["latents"]
        depth = len({k.split(".")[1] for k in proj if k.startswith("layers.")})
        if "perceiver_resampler.proj_in.weight" in proj or depth == 0 or "layers.0.0.to_q.weight" not in proj:
            raise IPAdapterError(f"{name}: an IP-Adapter resampler of a kind not supported (FaceID/Kolors variants "
                                 f"are not): keys {sorted(proj)[:4]}")
        info = IPAdapterInfo("plus", proj["proj_in.weight"].shape[1], proj["proj_out.weight"].shape[0],
                             latents.shape[1], latents.shape[2], depth,
                             proj["layers.0.0.to_q.weight"].shape[0] // RESAMPLER_HEAD_WIDTH)
    elif "proj.3.weight" in proj and "proj.0.weight" in proj:
        info = IPAdapterInfo("full", proj["proj.0.weight"].shape[1], proj["proj.3.weight"].shape[0], 0)
    elif "proj.weight" in proj and "norm.weight" in proj:
        cross = proj["norm.weight"].shape[0]
        if proj["proj.weight"].shape[0] % cross:
            raise IPAdapterError(f"{name}: image_proj.proj is {list(proj['proj.weight'].shape)}: not a whole number "
                                 f"of {cross}-wide tokens")
        info = IPAdapterInfo("plain", proj["proj.weight"].shape[1], cross, proj["proj.weight"].shape[0] // cross)
    else:
        raise IPAdapterError(f"{name}: an IP-Adapter image projection of an unknown kind (FaceID and other variants "
                             f"are not supported): keys {sorted(proj)[:6]}")
    return info, widths


def ip_adapter_from_state_dict(sd: Mapping[str, Tensor], name: str = "file",
                               dtype: torch.dtype | None = None) -> IPAdapterModel:
    """The model of a flat state dict; its parameters are the file's tensors (built on meta, assigned)."""
    info, widths = detect(sd, name)
    with torch.device("meta"):
        model = IPAdapterModel(info, widths)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise IPAdapterError(f"{name}: {info.title} with missing keys {missing[:4]} and unexpected keys "
                             f"{unexpected[:4]}")
    for key, value in model.state_dict().items():
        if tuple(sd[key].shape) != tuple(value.shape):
            raise IPAdapterError(f"{name}: {key} is {list(sd[key].shape)}, expected {list(value.shape)}")
    model.load_state_dict({k: sd[k] if dtype is None else sd[k].to(dtype) for k in expected}, assign=True)
    return model.eval().requires_grad_(False)


def flatten_parts(loaded: object, name: str) -> dict[str, Tensor]:
    """A pickled `{"image_proj": {...}, "ip_adapter": {...}}` (or an already flat dict) as flat keys."""
    if not isinstance(loaded, dict):
        raise IPAdapterError(f"{name}: not an IP-Adapter: the pickle holds a {type(loaded).__name__}, not a dict")
    flat: dict[str, Tensor] = {}
    for key, value in loaded.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items() if isinstance(v, Tensor)})
        elif isinstance(value, Tensor):
            flat[str(key)] = value
    return flat


def read_ip_adapter_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The flat state dict of a `.safetensors` or pickled (`.bin`, `.pt`, `.pth`, `.ckpt`) IP-Adapter file."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        return read_state_dict(path)
    return flatten_parts(read_pickle(path), path.name)


def load_ip_adapter(path: str | os.PathLike, dtype: torch.dtype | None = None) -> IPAdapterModel:
    """An IP-Adapter file, read safely (no pickled code runs)."""
    path = Path(path)
    model = ip_adapter_from_state_dict(read_ip_adapter_state_dict(path), path.name, dtype)
    log.info("IP-Adapter %s: %s, %d cross-attentions, %d-wide CLIP input", path.name, model.info.title,
             len(model.ip_adapter), model.info.clip_dim)
    return model


# -- where the numbered projections go in a UNet ---------------------------------------------------------------

Where = tuple[str, int, int]  # ("input" | "middle" | "output", block index, transformer index)


def cross_attention_numbers(unet: nn.Module) -> dict[Where, tuple[int, int]]:
    """(number n of `ip_adapter.{n}`, query width) of every cross-attention of a UNet in the original layout
    (`input_blocks`, `middle_block`, `output_blocks`), numbered in diffusers' processor order: down blocks, up
    blocks, then the middle block, n = 1, 3, 5, ..."""
    order: list[tuple[str, int, nn.Module]] = [("input", i, b) for i, b in enumerate(unet.input_blocks)]
    order += [("output", i, b) for i, b in enumerate(unet.output_blocks)]
    order.append(("middle", 0, unet.middle_block))
    numbers: dict[Where, tuple[int, int]] = {}
    for kind, index, block in order:
        for layer in block:
            for k, transformer in enumerate(getattr(layer, "transformer_blocks", ())):
                numbers[(kind, index, k)] = (2 * len(numbers) + 1, transformer.attn2.to_q.out_features)
    return numbers


# -- random-weight files for tests -------------------------------------------------------------------------------


def random_ip_adapter(unet: nn.Module, variant: str = "plain", clip_dim: int = 32, tokens: int = 4, width: int = 64,
                      depth: int = 2, seed: int = 0) -> IPAdapterModel:
    """An IP-Adapter with random weights for every cross-attention of `unet` (tokens as wide as its text context).
    Plus: `tokens` queries, `width` wide (heads of 64), `depth` layers; full: one token per input token."""
    numbers = cross_attention_numbers(unet)
    if not numbers:
        raise ValueError("random_ip_adapter: the UNet has no cross-attention")
    first = next(m for m in unet.modules() if hasattr(m, "transformer_blocks")).transformer_blocks[0]
    cross = first.attn2.to_k.in_features
    heads = max(1, width // RESAMPLER_HEAD_WIDTH)
    info = IPAdapterInfo(variant, clip_dim, cross, 0 if variant == "full" else tokens,
                         *((width, depth, heads) if variant == "plus" else (0, 0, 0)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = IPAdapterModel(info, dict(numbers.values()))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("latents"):
                    param.normal_(0, width ** -0.5)
                elif param.ndim == 1:
                    param.normal_(1.0 if ".norm" in name and name.endswith("weight") else 0.0, 0.1)
                else:
                    param.normal_(0, param.shape[1] ** -0.5)
    return model.eval().requires_grad_(False)


def write_random_ip_adapter(path: str | os.PathLike, unet: nn.Module, variant: str = "plain", *, file_format: str = "",
                            seed: int = 0, dtype: torch.dtype = torch.float32, **sizes: int) -> IPAdapterModel:
    """`random_ip_adapter` saved as the released files are: flat `image_proj.*`/`ip_adapter.*` keys in a
    `.safetensors`, or (`file_format="bin"`, or a `.bin` name) a torch pickle of the two dicts."""
    model = random_ip_adapter(unet, variant, seed=seed, **sizes).to(dtype)
    sd = model.state_dict()
    if (file_format or Path(path).suffix.lstrip(".")) == "safetensors":
        write_safetensors(path, {k: (v.dtype, tuple(v.shape)) for k, v in sd.items()}, sd.__getitem__)
    else:
        parts: dict[str, dict[str, Tensor]] = {"image_proj": {}, "ip_adapter": {}}
        for key, value in sd.items():
            part, _, rest = key.partition(".")
            parts[part][rest] = value.clone()
        torch.save(parts, path)
    return model
