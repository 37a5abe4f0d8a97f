"""GLIGEN (Li et al. 2023, "GLIGEN: Open-Set Grounded Text-to-Image Generation"), text-box variant.

A GLIGEN file adds two things to a frozen SD1.x UNet:

- the *position net* (`position_net.*`), which turns each grounding object, a phrase's pooled CLIP embedding
  and its box (x0, y0, x1, y1 as fractions of the image), into one token: the box goes through a Fourier
  embedding (8 frequencies 100^(k/8), sin and cos of each coordinate), is concatenated to the phrase
  embedding, and an MLP (Linear-SiLU-Linear-SiLU-Linear) maps it to the text context width. Unused object
  slots (GLIGEN has 30) take learnt null features instead of the phrase and the box embedding;
- one *fuser* per UNet transformer block (`input_blocks.N.1.transformer_blocks.K.fuser.*`, `middle_block.1...`,
  `output_blocks.N.1...`): a gated self-attention over the visual tokens followed by the grounding tokens,
  of which only the visual outputs are kept, then a gated feed-forward, each gate tanh(alpha) with alpha
  learnt (0 at initialisation, so a fresh fuser is the identity).

Attribute names equal the file's keys: `GLIGENModel` nests plain containers named like the UNet's blocks,
so `load_state_dict` is a name match. The fusers' head count is not stored in the file; GLIGEN uses the head
layout of the transformer block the fuser sits in, and so does `GatedSelfAttentionDense.forward`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoints.files import CheckpointError, read_state_dict, write_safetensors
from .unet_blocks import CrossAttention, FeedForward, SpatialTransformer

log = logging.getLogger(__name__)

MAX_OBJECTS = 30  # grounding token slots, as GLIGEN trains and runs them
FOURIER_FREQS = 8
FOURIER_TEMPERATURE = 100.0
POSITION_HIDDEN = 512

# `<block path>.1.transformer_blocks.<k>.fuser.<rest>`, with anything (e.g. "model.diffusion_model.") before it
_FUSER_KEY = re.compile(
    r"(?:^|\.)((?:input_blocks\.\d+|middle_block|output_blocks\.\d+)\.1\.transformer_blocks\.\d+)\.fuser\.(.+)$")
_POSITION_KEY = re.compile(r"(?:^|\.)position_net\.(.+)$")


def fourier_box_embedding(boxes: Tensor, freqs: int = FOURIER_FREQS,
                          temperature: float = FOURIER_TEMPERATURE) -> Tensor:
    """[B, N, 4] boxes -> [B, N, freqs * 2 * 4]: for each frequency f_k = temperature^(k / freqs), the sines of
    the four coordinates times f_k, then their cosines (GLIGEN's order, which its MLP weights expect)."""
    bands = temperature ** (torch.arange(freqs, device=boxes.device, dtype=torch.float32) / freqs)
    angles = boxes.float()[..., None, :] * bands[:, None]  # [B, N, freqs, 4]
    emb = torch.stack([angles.sin(), angles.cos()], dim=-2)  # [B, N, freqs, 2, 4]
    return emb.flatten(-3).to(boxes.dtype)


class PositionNet(nn.Module):
    """Grounding tokenizer of the text-box GLIGEN: (boxes [B, N, 4], masks [B, N], phrase embeddings
    [B, N, in_dim]) -> tokens [B, N, out_dim]. Where mask is 0 the learnt null features replace both inputs,
    which is also how the unconditional prediction is grounded on nothing."""

    def __init__(self, in_dim: int, out_dim: int, freqs: int = FOURIER_FREQS, hidden: int = POSITION_HIDDEN):
        super().__init__()
        self.freqs = freqs
        position_dim = freqs * 2 * 4
        self.linears = nn.Sequential(
            nn.Linear(in_dim + position_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, out_dim),
        )
        self.null_positive_feature = nn.Parameter(torch.zeros(in_dim))
        self.null_position_feature = nn.Parameter(torch.zeros(position_dim))

    @property
    def in_dim(self) -> int:
        return self.null_positive_feature.shape[0]

    @property
    def out_dim(self) -> int:
        return self.linears[4].out_features

    def forward(self, boxes: Tensor, masks: Tensor, embeddings: Tensor) -> Tensor:
        m = masks[..., None].to(embeddings.dtype)
        position = fourier_box_embedding(boxes, self.freqs).to(embeddings.dtype)
        position = position * m + (1 - m) * self.null_position_feature
        phrase = embeddings * m + (1 - m) * self.null_positive_feature
        return self.linears(torch.cat([phrase, position], dim=-1))


class GatedSelfAttentionDense(nn.Module):
    """The fuser of one transformer block: x + tanh(alpha_attn) * SelfAttn(norm1([x, linear(objs)]))[:visual],
    then x + tanh(alpha_dense) * FF(norm2(x)). Keys: linear, attn.to_q/to_k/to_v/to_out.0, ff.net.0.proj,
    ff.net.2, norm1, norm2, alpha_attn, alpha_dense."""

    def __init__(self, query_dim: int, context_dim: int, heads: int = 8):
        super().__init__()
        self.linear = nn.Linear(context_dim, query_dim)
        self.attn = CrossAttention(query_dim, heads, query_dim // heads)
        self.ff = FeedForward(query_dim)
        self.norm1 = nn.LayerNorm(query_dim)
        self.norm2 = nn.LayerNorm(query_dim)
        self.alpha_attn = nn.Parameter(torch.tensor(0.0))
        self.alpha_dense = nn.Parameter(torch.tensor(0.0))

    @property
    def query_dim(self) -> int:
        return self.linear.out_features

    @property
    def context_dim(self) -> int:
        return self.linear.in_features

    def forward(self, x: Tensor, objs: Tensor, heads: int | None = None) -> Tensor:
        """x [B, N, query_dim], objs [B, M, context_dim]; `heads` those of the block the fuser sits in (the
        file does not store them; default: the ones it was built with)."""
        heads = self.attn.heads if heads is None else heads
        visual = x.shape[1]
        tokens = self.norm1(torch.cat([x, self.linear(objs)], dim=1))
        b, n, _ = tokens.shape
        q, k, v = (t.view(b, n, heads, -1).transpose(1, 2)
                   for t in (self.attn.to_q(tokens), self.attn.to_k(tokens), self.attn.to_v(tokens)))
        attended = self.attn.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1))
        x = x + self.alpha_attn.tanh() * attended[:, :visual]
        return x + self.alpha_dense.tanh() * self.ff(self.norm2(x))


class _Container(nn.Module):
    """A named level of the key path (`input_blocks`, `4`, `1`, `transformer_blocks`, ...); holds children only."""


class GLIGENModel(nn.Module):
    """The position net and the fusers of a GLIGEN file, addressed by the UNet block they belong to."""

    def __init__(self, position_net: PositionNet, fusers: dict[str, GatedSelfAttentionDense]):
        super().__init__()
        self.position_net = position_net
        self._paths: dict[tuple[str, int, int], str] = {}
        for path, fuser in fusers.items():
            parent: nn.Module = self
            *levels, last = (path + ".fuser").split(".")
            for name in levels:
                child = getattr(parent, name, None) if name in parent._modules else None
                if child is None:
                    child = _Container()
                    parent.add_module(name, child)
                parent = child
            parent.add_module(last, fuser)
            self._paths[block_site(path)] = path + ".fuser"

    @property
    def sites(self) -> list[tuple[str, int, int]]:
        """(block kind, block index, transformer index) of every fuser, in file order."""
        return list(self._paths)

    @property
    def context_dim(self) -> int:
        return self.position_net.out_dim

    def fuser(self, kind: str, index: int, transformer: int) -> GatedSelfAttentionDense | None:
        path = self._paths.get((kind, index, transformer))
        return None if path is None else self.get_submodule(path)

    def fusers(self) -> Iterator[GatedSelfAttentionDense]:
        for path in self._paths.values():
            yield self.get_submodule(path)


def block_site(path: str) -> tuple[str, int, int]:
    """`input_blocks.4.1.transformer_blocks.0` -> ("input", 4, 0); `middle_block.1...` -> ("middle", 0, k)."""
    parts = path.split(".")
    transformer = int(parts[-1])
    if parts[0] == "middle_block":
        return "middle", 0, transformer
    return parts[0].split("_")[0], int(parts[1]), transformer


def transformer_paths(unet: nn.Module) -> dict[str, int]:
    """Key path of every transformer block of a UNet (`input_blocks.1.1.transformer_blocks.0`) -> its width."""
    paths = {}
    for name, module in unet.named_modules():
        if isinstance(module, SpatialTransformer):
            for k, block in enumerate(module.transformer_blocks):
                paths[f"{name}.transformer_blocks.{k}"] = block.attn1.to_q.in_features
    return paths


def split_gligen_state_dict(sd: dict[str, Tensor], name: str) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    """(position net tensors, {block path: fuser tensors}) of a GLIGEN state dict, prefixes dropped."""
    position: dict[str, Tensor] = {}
    fusers: dict[str, dict[str, Tensor]] = {}
    for key, value in sd.items():
        if m := _FUSER_KEY.search(key):
            fusers.setdefault(m.group(1), {})[m.group(2)] = value
        elif m := _POSITION_KEY.search(key):
            position[m.group(1)] = value
    if "null_positive_feature" not in position or not fusers:
        if "null_text_feature" in position:
            raise CheckpointError(f"{name}: a text-and-image GLIGEN file; only the text-box GLIGEN is supported")
        raise CheckpointError(f"{name}: not a GLIGEN text-box file (no position_net.null_positive_feature or no "
                              f"'...transformer_blocks.K.fuser.*' weights); found keys like {sorted(sd)[:3]}")
    return position, fusers


def gligen_from_state_dict(sd: dict[str, Tensor], name: str = "GLIGEN") -> GLIGENModel:
    """Build a GLIGENModel shaped like `sd` and load it (strict); every shape error names the file and key."""
    position, fuser_sds = split_gligen_state_dict(sd, name)
    try:
        in_dim = position["null_positive_feature"].shape[0]
        freqs, rem = divmod(position["null_position_feature"].shape[0], 8)
        hidden, out_dim = position["linears.0.weight"].shape[0], position["linears.4.weight"].shape[0]
        if rem:
            raise CheckpointError(f"{name}: position_net.null_position_feature must be a multiple of 8 wide")
        net = PositionNet(in_dim, out_dim, freqs, hidden)
        fusers = {path: GatedSelfAttentionDense(*f["linear.weight"].shape) for path, f in fuser_sds.items()}
    except KeyError as exc:
        raise CheckpointError(f"{name}: GLIGEN weight {exc.args[0]!r} is missing") from None
    model = GLIGENModel(net, fusers)
    flat = {f"position_net.{k}": v for k, v in position.items()}
    flat.update({f"{path}.fuser.{k}": v for path, f in fuser_sds.items() for k, v in f.items()})
    try:
        model.load_state_dict(flat, strict=True)
    except RuntimeError as exc:
        detail = str(exc).split("\n", 1)[-1].strip()
        raise CheckpointError(f"{name}: GLIGEN weights do not fit the text-box layout: {detail[:400]}") from None
    return model


def load_gligen(path: str | Path, dtype: torch.dtype | None = None) -> GLIGENModel:
    """A GLIGEN text-box model from a .safetensors or pickle file (read safely, no code executed)."""
    path = Path(path)
    model = gligen_from_state_dict(read_state_dict(path), path.name)
    if dtype is not None:
        model.to(dtype)
    log.info("GLIGEN %s: %d fusers, %d-wide phrases -> %d-wide tokens", path.name, len(model.sites),
             model.position_net.in_dim, model.context_dim)
    return model.eval().requires_grad_(False)


def random_gligen(unet: nn.Module, phrase_dim: int, seed: int = 0, alpha: float = 0.5) -> GLIGENModel:
    """A GLIGEN with random weights for every transformer block of `unet` (for tests; the gates `alpha` are
    nonzero so that the fusers change the output). Phrase embeddings are `phrase_dim` wide (the CLIP's pooled
    width), tokens as wide as the UNet's text context."""
    paths = transformer_paths(unet)
    blocks = [m for m in unet.modules() if isinstance(m, SpatialTransformer)]
    if not blocks:
        raise ValueError("random_gligen: the UNet has no transformer blocks")
    context = blocks[0].transformer_blocks[0].attn2.to_k.in_features
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GLIGENModel(PositionNet(phrase_dim, context),
                            {p: GatedSelfAttentionDense(width, context) for p, width in paths.items()})
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(("alpha_attn", "alpha_dense")):
                    param.fill_(alpha)
                elif name.endswith(("null_positive_feature", "null_position_feature")) or param.ndim == 1:
                    param.normal_(0, 0.1)
    return model.eval().requires_grad_(False)


def write_random_gligen(path: str | Path, unet: nn.Module, phrase_dim: int, seed: int = 0,
                        alpha: float = 0.5) -> GLIGENModel:
    """`random_gligen` saved under `path` in the layout of the GLIGEN files users have (bare keys)."""
    model = random_gligen(unet, phrase_dim, seed, alpha)
    sd = model.state_dict()
    write_safetensors(path, {k: (v.dtype, tuple(v.shape)) for k, v in sd.items()}, sd.__getitem__)
    return model
