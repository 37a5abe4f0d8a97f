"""CLIP's text transformer in plain torch: the model behind SD1's CLIP-L, SD2's OpenCLIP ViT-H and SDXL's bigG.

    x = token_embedding(ids) + position_embedding(0 … T-1)
    for every layer:  x = x + out_proj(causal_attention(q_proj, k_proj, v_proj of layer_norm1(x)))
                      x = x + fc2(act(fc1(layer_norm2(x))))
    last = final_layer_norm(x);  pooled = last at the first end token;  text_embeds = text_projection(pooled)

act is quick_gelu, x·sigmoid(1.702·x), for OpenAI's CLIP-L and the exact gelu for OpenCLIP's encoders; every layer
norm has eps 1e-5. The attribute names are the keys of our text-encoder layout (checkpoints/clip_keys.py), which are
also transformers 4's CLIPTextModelWithProjection names, so `load_state_dict(sd, strict=True, assign=True)` fills a
meta-device build from a converted checkpoint as it is, and LoRA files' text-encoder names map onto it directly.
The outputs are those of transformers' CLIPTextModel / CLIPTextModelWithProjection that we use (parity is tested on
the same random weights); importing this costs nothing beyond torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

END_TOKEN = 49407  # CLIP's <|endoftext|>; pooling reads the first one of each row


@dataclass(frozen=True)
class ClipTextConfig:
    """The sizes of a CLIP text transformer, by transformers' names (saving and merging read `num_attention_heads`)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    projection_dim: int | None = None  # None: no text projection (CLIP-L in SD1/SDXL checkpoints)
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = END_TOKEN


def quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


@dataclass
class ClipTextOutput:
    """last_hidden_state [B, T, W] (final layer norm applied); pooler_output [B, W]; text_embeds [B, P] for models
    with a projection (else None); hidden_states: the embeddings and every layer's output (no final norm), when
    asked for."""

    last_hidden_state: Tensor
    pooler_output: Tensor
    text_embeds: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None


class Embeddings(nn.Module):
    def __init__(self, config: ClipTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, ids: Tensor) -> Tensor:
        length, limit = ids.shape[-1], self.position_embedding.num_embeddings
        if length > limit:
            raise ValueError(f"{length} tokens is more than the {limit} positions of the text encoder")
        positions = torch.arange(length, device=ids.device)
        return self.token_embedding(ids) + self.position_embedding(positions)


class SelfAttention(nn.Module):
    """Multi-head causal self-attention: each token sees itself and the tokens before it."""

    def __init__(self, config: ClipTextConfig):
        super().__init__()
        width, self.heads = config.hidden_size, config.num_attention_heads
        if width % self.heads:
            raise ValueError(f"hidden size {width} is not a multiple of {self.heads} heads")
        # registered in transformers' order, so state dicts and parameter lists come out in the same order
        self.k_proj, self.v_proj, self.q_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, t, width = x.shape
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # softmax(q·kᵀ/√d + causal mask)·v
        return self.out_proj(out.transpose(1, 2).reshape(b, t, width))


class MLP(nn.Module):
    def __init__(self, config: ClipTextConfig):
        super().__init__()
        if config.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {config.hidden_act!r}; known: {sorted(ACTIVATIONS)}")
        self.act = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, config: ClipTextConfig):
        super().__init__()
        self.self_attn = SelfAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, config: ClipTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: Tensor) -> list[Tensor]:
        """The input and every layer's output."""
        states = [x]
        for layer in self.layers:
            states.append(layer(states[-1]))
        return states


class TextTransformer(nn.Module):
    """Embeddings, the encoder layers and the final layer norm (`text_model.` in our layout)."""

    def __init__(self, config: ClipTextConfig):
        super().__init__()
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, ids: Tensor) -> tuple[Tensor, list[Tensor]]:
        """(last hidden state with the final layer norm, [embeddings output, every layer's output])."""
        states = self.encoder(self.embeddings(ids))
        return self.final_layer_norm(states[-1]), states


class ClipTextModel(nn.Module):
    """A CLIP text encoder: `text_model` (the transformer) and, when the config has a projection_dim, the bias-free
    `text_projection` that turns the pooled state into CLIP's text embedding."""

    def __init__(self, config: ClipTextConfig):
        super().__init__()
        self.config = config
        self.text_model = TextTransformer(config)
        if config.projection_dim is not None:
            self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.text_model.final_layer_norm.weight.dtype

    def forward(self, input_ids: Tensor, output_hidden_states: bool = False) -> ClipTextOutput:
        """input_ids [B, T] (T ≤ max_position_embeddings), every row holding the end token somewhere."""
        last, states = self.text_model(input_ids)
        first_end = (input_ids == self.config.eos_token_id).int().argmax(dim=-1).to(last.device)
        pooled = last[torch.arange(last.shape[0], device=last.device), first_end]
        projection = getattr(self, "text_projection", None)
        return ClipTextOutput(
            last_hidden_state=last,
            pooler_output=pooled,
            text_embeds=None if projection is None else projection(pooled),
            hidden_states=tuple(states) if output_hidden_states else None,
        )
