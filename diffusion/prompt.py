"""Prompt text → weighted 77-token chunks, with ComfyUI's weight syntax and textual-inversion slots.

Weight syntax: `(text)` multiplies the weight by 1.1 per level, `(text:1.3)` sets it, `\\(` and `\\)` are
literal brackets, square brackets mean nothing. A token slot is an int id, or a tensor (one vector of an
embedding) that the text encoder places directly in its input embeddings.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch

from .embeddings import load_embedding
from .tokenizer import CLIPTokenizer

log = logging.getLogger(__name__)

Slot = int | torch.Tensor
Chunk = list[tuple[Slot, float]]

CHUNK_LENGTH = 77
MAX_WORD_LENGTH = 8  # a word of this many tokens or more may be split across chunks
EMBEDDING_PREFIX = "embedding:"
# Escaped brackets are hidden behind control characters while the brackets are parsed.
ESCAPES = {"\\(": "\0\2", "\\)": "\0\1"}


def split_groups(text: str) -> list[str]:
    """Top-level pieces of `text`: bracketed groups `( … )` (kept with their brackets) and the text between.

    A `)` without an opening bracket drives the depth below zero; until it comes back to zero nothing
    opens or closes a group, so unbalanced text stays literal instead of failing."""
    pieces: list[str] = []
    current = ""
    depth = 0
    for char in text:
        if char == "(" and depth == 0:
            if current:
                pieces.append(current)
            current = "("
            depth = 1
        elif char == "(":
            current += char
            depth += 1
        elif char == ")":
            depth -= 1
            current += char
            if depth == 0:
                pieces.append(current)
                current = ""
        else:
            current += char
    if current:
        pieces.append(current)
    return pieces


def group_weight(inner: str, weight: float) -> tuple[str, float]:
    """Text and weight inside one bracket level: `text:number` (last colon, not first char) sets the
    weight, anything else multiplies it by 1.1."""
    colon = inner.rfind(":")
    if colon > 0:
        try:
            return inner[:colon], float(inner[colon + 1 :])
        except ValueError:
            pass
    return inner, weight * 1.1


def weighted_fragments(text: str, weight: float) -> list[tuple[str, float]]:
    out = []
    for piece in split_groups(text):
        if len(piece) >= 2 and piece[0] == "(" and piece[-1] == ")":
            out += weighted_fragments(*group_weight(piece[1:-1], weight))
        else:
            out.append((piece, weight))
    return out


def parse_prompt_weights(text: str) -> list[tuple[str, float]]:
    """`text` split into (fragment, weight) pairs, escaped brackets turned back into literal ones."""
    for escaped, hidden in ESCAPES.items():
        text = text.replace(escaped, hidden)
    fragments = weighted_fragments(text, 1.0)
    for escaped, hidden in ESCAPES.items():
        fragments = [(t.replace(hidden, escaped[1]), w) for t, w in fragments]
    return fragments


class PromptTokenizer:
    """Turns prompt text into chunks for one text encoder: its pad token and embedding width."""

    def __init__(
        self,
        tokenizer: CLIPTokenizer,
        pad_id: int,
        embedding_width: int,
        embedding_dirs: Sequence[str | os.PathLike] = (),
        embedding_key: str | None = None,
    ):
        self.tokenizer = tokenizer
        self.pad_id = pad_id
        self.embedding_width = embedding_width
        self.embedding_dirs = list(embedding_dirs)
        self.embedding_key = embedding_key  # which entry of an SDXL embedding file ("clip_l"/"clip_g")

    def embedding(self, name: str) -> tuple[torch.Tensor | None, str]:
        """The embedding's vectors and any text left over: `embedding:name,` finds `name` and leaves `,`."""
        vectors = load_embedding(name, self.embedding_dirs, self.embedding_width, self.embedding_key)
        stripped = name.rstrip(",")
        if vectors is None and stripped != name and stripped:
            vectors = load_embedding(stripped, self.embedding_dirs, self.embedding_width, self.embedding_key)
            return vectors, name[len(stripped) :]
        return vectors, ""

    def word_groups(self, text: str) -> list[list[tuple[Slot, float]]]:
        """One group of (slot, weight) per space-separated word; an embedding's vectors form one group."""
        groups: list[list[tuple[Slot, float]]] = []
        for fragment, weight in parse_prompt_weights(text):
            for word in fragment.replace("\n", " ").split(" "):
                if word.startswith(EMBEDDING_PREFIX):
                    vectors, word = self.embedding(word[len(EMBEDDING_PREFIX) :])
                    if vectors is not None:
                        groups.append([(v, weight) for v in vectors])
                ids = self.tokenizer.encode(word) if word else []
                if ids:
                    groups.append([(i, weight) for i in ids])
        return groups

    def __call__(self, text: str) -> list[Chunk]:
        return chunk_groups(self.word_groups(text), self.tokenizer.bos_id, self.tokenizer.eos_id, self.pad_id)


def chunk_groups(groups: list[list[tuple[Slot, float]]], bos: int, eos: int, pad: int) -> list[Chunk]:
    """Pack word groups into chunks of start + ≤75 slots + end, padded to 77.

    A word that does not fit in what is left of a chunk starts the next one, unless it has
    MAX_WORD_LENGTH tokens or more: then it fills this chunk and continues in the next."""
    room = CHUNK_LENGTH - 2
    chunks: list[Chunk] = []
    current: list[tuple[Slot, float]] = []
    for group in groups:
        splittable = len(group) >= MAX_WORD_LENGTH
        while group:
            space = room - len(current)
            if len(group) <= space:
                current, group = current + group, []
                continue
            if splittable:
                current, group = current + group[:space], group[space:]
            chunks.append(close_chunk(current, bos, eos, pad))
            current = []
    chunks.append(close_chunk(current, bos, eos, pad))
    return chunks


def close_chunk(slots: list[tuple[Slot, float]], bos: int, eos: int, pad: int) -> Chunk:
    padding = [(pad, 1.0)] * (CHUNK_LENGTH - 2 - len(slots))
    return [(bos, 1.0), *slots, (eos, 1.0), *padding]
