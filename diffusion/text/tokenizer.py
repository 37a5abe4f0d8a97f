"""CLIP byte-pair-encoding tokenizer, built offline from the vocabulary shipped in `diffusion/data`.

The same BPE serves CLIP-L (SD1, SDXL), OpenCLIP ViT-H (SD2) and ViT-bigG (SDXL): only the padding
token differs, and that is the prompt chunker's business, not the tokenizer's.
"""

from __future__ import annotations

import gzip
import html
import unicodedata
from importlib import resources

import regex

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
# 49,408 ids in all: 256 bytes, the same with </w>, the merges, then the two special tokens.
NUM_MERGES = 49152 - 256 - 2
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

# CLIP's split: special tokens, English contractions, letter runs, single digits, punctuation runs.
WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
WHITESPACE = regex.compile(r"\s+")


def bytes_to_unicode() -> dict[int, str]:
    """A reversible map from the 256 byte values to printable characters.

    Printable latin-1 bytes map to themselves; the others (controls, space, ...) are shifted past 255
    so that a BPE word never contains whitespace or control characters.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def read_merges() -> list[tuple[str, str]]:
    """The merge rules, in priority order, from the shipped vocabulary file (first line is a header)."""
    data = resources.files("diffusion").joinpath("data", VOCAB_FILE).read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    merges = lines[1 : 1 + NUM_MERGES]
    return [tuple(line.split()) for line in merges]  # type: ignore[misc]


def build_vocab(merges: list[tuple[str, str]]) -> list[str]:
    """Vocabulary in id order: bytes, bytes with `</w>`, one entry per merge, then the two specials."""
    byte_chars = list(bytes_to_unicode().values())
    word_ends = [c + END_OF_WORD for c in byte_chars]
    return [*byte_chars, *word_ends, *(a + b for a, b in merges), BOS_TOKEN, EOS_TOKEN]


def clean_text(text: str) -> str:
    """CLIP's normalisation: html entities (twice, as CLIP does), NFC, whitespace collapsed, lowercase.

    NFC composes accents the way the `tokenizers`-backed CLIP tokenizer does, so that a decomposed
    "é" becomes one letter instead of a letter and a combining mark.
    """
    text = html.unescape(html.unescape(text))
    text = unicodedata.normalize("NFC", text)
    return WHITESPACE.sub(" ", text).strip().lower()


class CLIPTokenizer:
    """CLIP's BPE tokenizer. `encode` gives ids without start/end tokens; callers add them."""

    bos_id = 49406
    eos_id = 49407

    def __init__(self, cache_size: int = 20_000):
        merges = read_merges()
        self.vocab = build_vocab(merges)
        self.token_to_id = {token: i for i, token in enumerate(self.vocab)}
        self.merge_rank = {pair: rank for rank, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.cache_size = cache_size
        self.cache: dict[str, list[str]] = {}

    def __len__(self) -> int:
        return len(self.vocab)

    def bpe(self, word: str) -> list[str]:
        """Split one byte-encoded word into vocabulary entries: repeatedly merge the best-ranked pair."""
        cached = self.cache.get(word)
        if cached is not None:
            return cached
        parts = [*word[:-1], word[-1] + END_OF_WORD]
        while len(parts) > 1:
            pairs = {(parts[i], parts[i + 1]) for i in range(len(parts) - 1)}
            best = min(pairs, key=lambda p: self.merge_rank.get(p, NUM_MERGES))
            if best not in self.merge_rank:
                break
            parts = merge_pair(parts, best)
        if len(self.cache) >= self.cache_size:
            self.cache.clear()
        self.cache[word] = parts
        return parts

    def words(self, text: str) -> list[str]:
        """The pieces CLIP tokenizes independently, after cleaning."""
        return WORD_PATTERN.findall(clean_text(text))

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in self.words(text):
            if word in (BOS_TOKEN, EOS_TOKEN):
                ids.append(self.token_to_id[word])
                continue
            encoded = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.token_to_id[part] for part in self.bpe(encoded))
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; word ends become spaces, start/end tokens are dropped."""
        raw = bytearray()
        for i in ids:
            if i in (self.bos_id, self.eos_id):
                continue
            if not 0 <= i < len(self.vocab):
                raise ValueError(f"token id {i} is outside the CLIP vocabulary (0..{len(self.vocab) - 1})")
            token = self.vocab[i]
            word_end = token.endswith(END_OF_WORD)
            raw.extend(self.byte_decoder[c] for c in token.removesuffix(END_OF_WORD))
            if word_end:
                raw.extend(b" ")
        return raw.decode("utf-8", errors="replace").strip()


def merge_pair(parts: list[str], pair: tuple[str, str]) -> list[str]:
    """Replace every non-overlapping occurrence of `pair` (left to right) by its concatenation."""
    merged = []
    i = 0
    while i < len(parts):
        if i < len(parts) - 1 and (parts[i], parts[i + 1]) == pair:
            merged.append(parts[i] + parts[i + 1])
            i += 2
        else:
            merged.append(parts[i])
            i += 1
    return merged
