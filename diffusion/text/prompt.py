"""Prompt text → weighted 77-token chunks, with ComfyUI's weight syntax and textual-inversion slots.

Weight syntax: `(text)` multiplies the weight by 1.1 per level, `(text:1.3)` sets it, `\\(` and `\\)` are
literal brackets, square brackets mean nothing. A token slot is an int id, or a tensor (one vector of an
embedding) that the text encoder places directly in its input embeddings.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence

import torch

from .embeddings import load_embedding, resolve_embedding
from .tokenizer import CLIPTokenizer

log = logging.getLogger(__name__)

Slot = int | torch.Tensor
Chunk = list[tuple[Slot, float]]

CHUNK_LENGTH = 77
MAX_WORD_LENGTH = 8  # a group of this many tokens or more may be split across chunks
EMBEDDING_PREFIX = "embedding:"
EMBEDDING_BOUNDARY = re.compile(r"[ \n]embedding:")
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
        split_words: bool = False,
    ):
        self.tokenizer = tokenizer
        self.pad_id = pad_id
        self.embedding_width = embedding_width
        self.embedding_dirs = list(embedding_dirs)
        self.embedding_key = embedding_key  # which entry of an SDXL embedding file ("clip_l"/"clip_g")
        self.split_words = split_words

    def embedding(self, name: str) -> tuple[torch.Tensor | None, str]:
        """The embedding's vectors and any text left over: `embedding:name,` finds `name` and leaves `,`."""
        stripped = name.rstrip(",")
        dirs = self.embedding_dirs
        for candidate in (name, stripped):
            if candidate and resolve_embedding(candidate, dirs) is not None:
                vectors = load_embedding(candidate, dirs, self.embedding_width, self.embedding_key)
                return vectors, name[len(candidate) :]
        log.warning("embedding %r not found in %s; ignoring it", name, [str(d) for d in dirs])
        return None, name[len(stripped) :]

    def pieces(self, fragment: str) -> list[str]:
        """The units of one weighted fragment that keep their tokens together in a chunk.

        As ComfyUI does today: the text between embeddings is one piece (an embedding starts at the
        fragment's start or after a space or newline). With `split_words`, every space-separated word is a
        piece, as older ComfyUI versions did."""
        if self.split_words:
            return [word for word in fragment.replace("\n", " ").split(" ") if word]
        first, *rest = EMBEDDING_BOUNDARY.split(fragment)
        return [piece for piece in [first, *(EMBEDDING_PREFIX + p for p in rest)] if piece]

    def word_groups(self, text: str) -> list[list[tuple[Slot, float]]]:
        """Groups of (slot, weight): one per piece of text, one per embedding (its vectors)."""
        groups: list[list[tuple[Slot, float]]] = []
        for fragment, weight in parse_prompt_weights(text):
            for piece in self.pieces(fragment):
                text_part = piece
                if piece.startswith(EMBEDDING_PREFIX):
                    words = piece[len(EMBEDDING_PREFIX) :].split()
                    vectors, leftover = self.embedding(words[0] if words else "")
                    if vectors is not None:
                        groups.append([(v, weight) for v in vectors])
                    text_part = " ".join([leftover, *words[1:]])
                ids = self.tokenizer.encode(text_part)
                if ids:
                    groups.append([(i, weight) for i in ids])
        return groups

    def __call__(self, text: str) -> list[Chunk]:
        return chunk_groups(self.word_groups(text), self.tokenizer.bos_id, self.tokenizer.eos_id, self.pad_id)


def chunk_groups(groups: list[list[tuple[Slot, float]]], bos: int, eos: int, pad: int) -> list[Chunk]:
    """Pack groups (see PromptTokenizer.pieces) into chunks of start + ≤75 slots + end, padded to 77.

    A group that does not fit in what is left of a chunk starts the next one, unless it has
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
