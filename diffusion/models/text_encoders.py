"""CLIP text encoders (our plain torch CLIP, clip_text.py) with ComfyUI's encoding behaviour.

One `ClipTextEncoder` wraps one CLIP text model plus its options (which hidden layer, whether the final layer norm
is applied to it, pad token); `TextEncoders` is a family's set of them (SD1: CLIP-L; SD2: OpenCLIP ViT-H; SDXL:
CLIP-L + bigG; SDXL refiner: bigG) that turns prompt text into `(cond [1, 77·k, dim], pooled [1, dim_pooled])`.
Nothing here imports transformers.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..checkpoints.clip_keys import PROJECTION, TEXT, text_encoder_state_dict
from ..text.prompt import Chunk, PromptTokenizer
from ..text.tokenizer import CLIPTokenizer
from .clip_text import ClipTextConfig, ClipTextModel

if TYPE_CHECKING:  # only the trainer asks for a transformers config (train/recipe.py)
    from transformers import CLIPTextConfig

log = logging.getLogger(__name__)

Tensor = torch.Tensor


@dataclass(frozen=True)
class TextEncoderConfig:
    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    vocab_size: int = 49408
    max_positions: int = 77
    projection_dim: int | None = None  # None: no text projection (CLIP-L in SD1/SDXL checkpoints)
    hidden_act: str = "quick_gelu"  # OpenAI CLIP-L; OpenCLIP ViT-H and bigG use "gelu"

    @classmethod
    def from_state_dict(
        cls, sd: Mapping[str, Tensor], *, num_heads: int | None = None, hidden_act: str = "quick_gelu"
    ) -> TextEncoderConfig:
        """Sizes read from the shapes of a state dict in our layout (see clip_keys). Heads are not in the
        shapes: real CLIPs use 64 channels per head; tiny test models pass `num_heads`."""
        token = require(sd, TEXT + "embeddings.token_embedding.weight")
        positions = require(sd, TEXT + "embeddings.position_embedding.weight")
        fc1 = require(sd, TEXT + "encoder.layers.0.mlp.fc1.weight")
        prefix = TEXT + "encoder.layers."
        layers = {int(k[len(prefix) :].split(".")[0]) for k in sd if k.startswith(prefix)}
        hidden = token.shape[1]
        projection = sd.get(PROJECTION)
        return cls(
            hidden_size=hidden,
            num_layers=max(layers) + 1,
            intermediate_size=fc1.shape[0],
            num_heads=num_heads or max(hidden // 64, 1),
            vocab_size=token.shape[0],
            max_positions=positions.shape[0],
            projection_dim=None if projection is None else projection.shape[0],
            hidden_act=hidden_act,
        )

    def clip_config(self) -> ClipTextConfig:
        return ClipTextConfig(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            vocab_size=self.vocab_size,
            max_position_embeddings=self.max_positions,
            projection_dim=self.projection_dim,
            hidden_act=self.hidden_act,
            eos_token_id=CLIPTokenizer.eos_id,
        )

    def transformers_config(self, pad_id: int) -> CLIPTextConfig:
        """The same model as a transformers CLIPTextConfig, for the trainer (train/recipe.py), which trains
        through transformers' CLIPTextModel. Imports transformers (3-5 s); the engine never calls this."""
        from .transformers_clip import clip_classes

        fields = dataclasses.asdict(self.clip_config())  # ClipTextConfig spells transformers' names
        fields["projection_dim"] = self.projection_dim or self.hidden_size  # transformers wants a number
        return clip_classes().CLIPTextConfig(**fields, bos_token_id=CLIPTokenizer.bos_id, pad_token_id=pad_id,
                                             attn_implementation="sdpa")


def require(sd: Mapping[str, Tensor], key: str) -> Tensor:
    if key not in sd:
        raise KeyError(f"text encoder state dict has no {key!r}; is it a CLIP text model in our layout?")
    return sd[key]


def build_clip_model(sd: Mapping[str, Tensor], config: TextEncoderConfig) -> ClipTextModel:
    """A CLIP text model holding exactly the tensors of `sd` (our layout): built on the meta device and filled
    with `assign=True`, so no second copy of the weights is ever allocated."""
    with torch.device("meta"):
        model = ClipTextModel(config.clip_config())
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise ValueError(
            f"text encoder weights do not fit a CLIP text model of {config}: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}"
        )
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)


@dataclass(frozen=True)
class ClipTextEncoder:
    """One CLIP text model and the options ComfyUI sets on it.

    layer: None for the last layer's output with the final layer norm; -k for the model's
    hidden_states[-k] (-1 the last layer, -2 the penultimate, …), with the final layer norm applied
    only when `layer_norm_hidden` (SD1/SD2 yes; SDXL's two encoders no)."""

    model: ClipTextModel
    pad_id: int
    layer: int | None = None
    layer_norm_hidden: bool = True

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    def with_layer(self, layer: int | None) -> ClipTextEncoder:
        """The same model (shared, not copied) with another layer choice."""
        if layer is not None and layer >= 0:
            raise ValueError(f"clip layer must be negative (-1 last, -2 penultimate, …), got {layer}")
        if layer is not None and -layer > self.num_layers:
            log.warning(
                "clip layer %d is beyond the %d layers of the model; using the last", layer, self.num_layers
            )
            layer = None
        return dataclasses.replace(self, layer=layer)

    def empty_chunk(self) -> Chunk:
        return [(CLIPTokenizer.bos_id, 1.0), (CLIPTokenizer.eos_id, 1.0)] + [(self.pad_id, 1.0)] * 75

    def encode(self, chunks: Sequence[Chunk]) -> tuple[Tensor, Tensor]:
        """Chunks → (hidden [1, 77·k, width], pooled [1, dim] from the first chunk), float32.

        A token of weight w ≠ 1 becomes z_empty + (z − z_empty)·w, with z_empty the same position of
        the empty prompt's encoding: the weight scales how far the token moves the output from "nothing"."""
        weights = torch.tensor([[w for _, w in chunk] for chunk in chunks], dtype=torch.float32)
        weighted = bool((weights != 1.0).any())
        batch = [*chunks, self.empty_chunk()] if weighted else list(chunks)
        hidden, pooled = self.forward(batch)
        hidden, pooled = hidden.float(), pooled.float()
        z = hidden[: len(chunks)]
        if weighted:
            z_empty = hidden[-1:]
            w = weights.to(z.device)[..., None]
            z = torch.where(w != 1.0, z_empty + (z - z_empty) * w, z)
        return z.reshape(1, -1, z.shape[-1]), pooled[:1]

    @torch.no_grad()
    def forward(self, chunks: Sequence[Chunk]) -> tuple[Tensor, Tensor]:
        """Run the model on a batch of chunks; embedding slots (tensors) replace their rows of the token
        embedding through a forward hook, their ids standing in as 0 (never the end token, so pooling at
        the first end token is unaffected)."""
        token_embedding = self.model.text_model.embeddings.token_embedding
        device = token_embedding.weight.device
        ids = torch.tensor([[s if isinstance(s, int) else 0 for s, _ in c] for c in chunks], device=device)
        slots = [(b, j, s) for b, c in enumerate(chunks) for j, (s, _) in enumerate(c) if torch.is_tensor(s)]

        def place_slots(module: torch.nn.Module, args: tuple, out: Tensor) -> Tensor:
            out = out.clone()
            for b, j, vector in slots:
                out[b, j] = vector.to(out.device, out.dtype)
            return out

        hook = token_embedding.register_forward_hook(place_slots) if slots else None
        try:
            output = self.model(input_ids=ids, output_hidden_states=self.layer is not None)
        finally:
            if hook is not None:
                hook.remove()
        pooled = output.pooler_output if output.text_embeds is None else output.text_embeds
        if self.layer is None:
            return output.last_hidden_state, pooled
        hidden = output.hidden_states[self.layer]
        if self.layer_norm_hidden:
            hidden = self.model.text_model.final_layer_norm(hidden)
        return hidden, pooled


@dataclass(frozen=True)
class EncoderSpec:
    """Where a family keeps one text encoder and how ComfyUI runs it."""

    name: str  # "l", "h" or "g"
    prefixes: tuple[str, ...]  # checkpoint key prefixes, first found wins
    hidden_act: str
    pad_id: int
    layer: int | None  # default layer (None: last, with final layer norm)
    layer_norm_hidden: bool


CLIP_L = ("quick_gelu", CLIPTokenizer.eos_id)  # OpenAI CLIP pads with the end token
OPEN_CLIP = ("gelu", 0)  # OpenCLIP pads with 0
FAMILIES: dict[str, tuple[EncoderSpec, ...]] = {
    "sd1": (EncoderSpec("l", ("cond_stage_model.transformer.",), *CLIP_L, None, True),),
    "sd2": (
        EncoderSpec("h", ("cond_stage_model.model.", "conditioner.embedders.0.model."), *OPEN_CLIP, -2, True),
    ),
    "sdxl": (
        EncoderSpec("l", ("conditioner.embedders.0.transformer.",), *CLIP_L, -2, False),
        EncoderSpec("g", ("conditioner.embedders.1.model.",), *OPEN_CLIP, -2, False),
    ),
    "sdxl_refiner": (EncoderSpec("g", ("conditioner.embedders.0.model.",), *OPEN_CLIP, -2, False),),
}


def find_prefix(sd: Mapping[str, Tensor], spec: EncoderSpec, family: str) -> str:
    for prefix in spec.prefixes:
        if any(key.startswith(prefix) for key in sd):
            return prefix
    raise KeyError(
        f"{family} checkpoint has no clip_{spec.name} text encoder (looked under {list(spec.prefixes)})"
    )


@dataclass
class TextEncoders:
    """A family's text encoders. Clones share the models and differ only in options (the clip skip)."""

    family: str
    encoders: dict[str, ClipTextEncoder]
    tokenizer: CLIPTokenizer
    embedding_dirs: list[str | os.PathLike] = dataclasses.field(default_factory=list)
    clip_skip: int | None = None  # None: the family's default layer

    @classmethod
    def from_state_dict(
        cls,
        sd: Mapping[str, Tensor],
        family: str,
        *,
        embedding_dirs: Sequence[str | os.PathLike] = (),
        tokenizer: CLIPTokenizer | None = None,
        num_heads: int | None = None,
    ) -> TextEncoders:
        """The text encoders of a full checkpoint `sd` of `family` ("sd1", "sd2", "sdxl", "sdxl_refiner")."""
        if family not in FAMILIES:
            raise ValueError(f"unknown model family {family!r}; known: {sorted(FAMILIES)}")
        encoders = {}
        for spec in FAMILIES[family]:
            weights = text_encoder_state_dict(sd, find_prefix(sd, spec, family))
            config = TextEncoderConfig.from_state_dict(
                weights, num_heads=num_heads, hidden_act=spec.hidden_act
            )
            model = build_clip_model(weights, config)
            encoders[spec.name] = ClipTextEncoder(model, spec.pad_id, spec.layer, spec.layer_norm_hidden)
        return cls(family, encoders, tokenizer or CLIPTokenizer(), list(embedding_dirs))

    def clone(self) -> TextEncoders:
        return dataclasses.replace(
            self, encoders=dict(self.encoders), embedding_dirs=list(self.embedding_dirs)
        )

    def configured(self, clip_skip: int | None) -> dict[str, ClipTextEncoder]:
        """Encoders with the clip skip applied (-1 last layer, -2 penultimate, …; None: family default)."""
        if clip_skip is None:
            return self.encoders
        return {name: encoder.with_layer(clip_skip) for name, encoder in self.encoders.items()}

    def tokenize(self, text: str) -> dict[str, list[Chunk]]:
        """Chunks per encoder: the pad token and the embedding width differ between encoders."""
        chunks = {}
        for name, enc in self.encoders.items():
            key = f"clip_{name}"  # SDXL embedding files keep one entry per encoder under this name
            prompt = PromptTokenizer(self.tokenizer, enc.pad_id, enc.width, self.embedding_dirs, key)
            chunks[name] = prompt(text)
        return chunks

    def encode(self, text: str, clip_skip: int | None = None) -> tuple[Tensor, Tensor]:
        """Prompt text → (cond [1, 77·k, dim], pooled [1, dim_pooled])."""
        return self.encode_chunks(self.tokenize(text), clip_skip)

    def encode_chunks(
        self, chunks: Mapping[str, list[Chunk]], clip_skip: int | None = None
    ) -> tuple[Tensor, Tensor]:
        encoders = self.configured(self.clip_skip if clip_skip is None else clip_skip)
        outputs = {name: encoder.encode(chunks[name]) for name, encoder in encoders.items()}
        if set(outputs) == {"l", "g"}:  # SDXL: both hidden states side by side, pooled from bigG
            (l_hidden, _), (g_hidden, g_pooled) = outputs["l"], outputs["g"]
            tokens = min(l_hidden.shape[1], g_hidden.shape[1])
            return torch.cat([l_hidden[:, :tokens], g_hidden[:, :tokens]], dim=-1), g_pooled
        (only,) = outputs.values()
        return only
