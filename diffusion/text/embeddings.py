"""Textual-inversion embeddings: finding the file safely and reading the vectors out of it.

An embedding is a handful of vectors in a text encoder's token-embedding space; the prompt
`embedding:name` puts them where the name stands, one token slot per vector.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

log = logging.getLogger(__name__)

EMBEDDING_EXTENSIONS = (".safetensors", ".pt", ".bin")


class EmbeddingError(ValueError):
    """An embedding that exists but cannot be used: unsafe name, unreadable file, unknown layout."""


def is_inside(path: Path, folder: Path) -> bool:
    """Whether `path`, with every symlink resolved, lies inside `folder`."""
    real_path = Path(os.path.realpath(path))
    real_folder = Path(os.path.realpath(folder))
    return real_path == real_folder or real_folder in real_path.parents


def resolve_embedding(name: str, directories: Sequence[str | os.PathLike]) -> Path | None:
    """The file for `name` in the first directory that has one, trying the name as given and then with
    each known extension. A name that would leave its directory (`..`, absolute, symlink) is refused."""
    if not name:
        return None
    if os.path.isabs(name) or Path(name).drive:
        raise EmbeddingError(f"embedding name {name!r} must be a relative name inside the embeddings folder")
    for directory in directories:
        folder = Path(directory)
        for candidate in [folder / name, *(folder / (name + ext) for ext in EMBEDDING_EXTENSIONS)]:
            if not is_inside(candidate, folder):
                raise EmbeddingError(f"embedding name {name!r} resolves outside the folder {folder}")
            if candidate.is_file():
                return candidate
    return None


def read_embedding_file(path: Path) -> object:
    """The file's content: a dict of tensors (or nested dicts), or a bare tensor.

    `.pt`/`.bin` go through torch's weights-only unpickler, so a file that needs code to load is refused
    instead of run."""
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except Exception as err:
            raise EmbeddingError(f"embedding file {path} is not a readable safetensors file: {err}") from err
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise EmbeddingError(
            f"embedding file {path} needs code to unpickle and was refused (only plain tensors are loaded)"
        ) from err
    except Exception as err:
        raise EmbeddingError(f"embedding file {path} could not be read: {err}") from err


def candidate_tensors(content: object, key: str | None = None) -> list[torch.Tensor]:
    """Every tensor an embedding file may keep its vectors in, most specific layout first; `key` (e.g.
    "clip_g") is preferred when the file has one entry per text encoder."""
    if isinstance(content, torch.Tensor):
        return [content]
    if not isinstance(content, Mapping):
        return []
    if "string_to_param" in content:  # A1111 textual inversion
        return [t for t in content["string_to_param"].values() if isinstance(t, torch.Tensor)]
    if "emb_params" in content:  # A1111 safetensors
        return [content["emb_params"]]
    if "clip_l" in content or "clip_g" in content:  # SDXL: one entry per text encoder
        order = [key] if key in ("clip_l", "clip_g") else []
        return [content[k] for k in (*order, "clip_l", "clip_g") if k in content]
    tensors = [t for t in content.values() if isinstance(t, torch.Tensor)]
    return tensors if len(tensors) == 1 else []  # diffusers: {"<token>": tensor}


def embedding_vectors(
    content: object, width: int, source: str = "embedding", key: str | None = None
) -> torch.Tensor | None:
    """The [n, width] vectors for an encoder of this width, or None when the file has none that fit.

    Raises EmbeddingError when the content is in no known layout at all."""
    tensors = candidate_tensors(content, key)
    if not tensors:
        keys = list(content.keys()) if isinstance(content, Mapping) else type(content).__name__
        raise EmbeddingError(f"{source}: no embedding vectors found (keys: {keys})")
    for tensor in tensors:
        vectors = tensor.detach().reshape(-1, tensor.shape[-1]) if tensor.ndim else tensor
        if vectors.ndim == 2 and vectors.shape[-1] == width:
            return vectors
    return None


def load_embedding(
    name: str, directories: Sequence[str | os.PathLike], width: int, key: str | None = None
) -> torch.Tensor | None:
    """The vectors of embedding `name` for a `width`-wide encoder (`key`: its name in SDXL files, e.g.
    "clip_l"); None (with a warning) if there is no such file or it has no vectors of that width."""
    path = resolve_embedding(name, directories)
    if path is None:
        log.warning("embedding %r not found in %s; ignoring it", name, [str(d) for d in directories])
        return None
    vectors = embedding_vectors(read_embedding_file(path), width, source=str(path), key=key)
    if vectors is None:
        log.warning("embedding %r (%s) has no vectors of width %d; ignoring it", name, path, width)
    return vectors
