"""What a user reads when a workflow names a file that is not there, and the file lists of the loader combos.

A workflow from someone else usually names files this machine lacks. "Value not in list" with the list says
neither where the engine looked nor what to do, so the combos of file inputs carry an explanation that
validation puts in the error's `details` (graph/validation.py asks an options callable for
`explain_missing(env, value)`; the error's `type` stays ComfyUI's `value_not_in_list`), and the loaders'
run-time errors say the same:

    image: 'example.png' not found in data/input/ (empty) or the shipped examples/input/; upload it or put it
    in data/input/
    lora_name: 'x.safetensors' not found in data/models/loras/, the extra model paths (none configured) or the
    shipped models/loras/; files there: a.safetensors, b.safetensors; put it in data/models/loras/

Folders are named as the user knows them: the data directory by its own folder name (`data` by default),
the repository's folders relative to the repository, extra model folders by kind and folder name; never by
absolute path.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from nodes.model_paths import bundled_inputs_dir, bundled_models_dir

if TYPE_CHECKING:
    from nodes.environment import Environment

SHOWN_FILES = 12  # names listed in a message before "and N more"


def data_label(env: Environment) -> str:
    """The data directory as messages name it: its own folder name (`data`), never its absolute path."""
    return Path(env.data_dir).resolve().name or "the data directory"


def shown(names: Iterable[str]) -> str:
    """`a, b, c` (at most SHOWN_FILES names, then `and N more`)."""
    names = list(names)
    head = ", ".join(names[:SHOWN_FILES])
    return head + (f" and {len(names) - SHOWN_FILES} more" if len(names) > SHOWN_FILES else "")


def model_word(kind: str) -> str:
    """A model kind (a folder name) as one item: `loras` -> `lora`, `checkpoints` -> `checkpoint`."""
    return kind[:-1] if kind.endswith("s") else kind


def missing_model_text(env: Environment, kind: str) -> str:
    """Where a model of this kind was looked for, what is there, and where to put it (after "'name' ")."""
    from nodes.environment import LEGACY_MODEL_FOLDERS

    own = f"{data_label(env)}/models/{kind}/"
    if kind in LEGACY_MODEL_FOLDERS:
        own += f" (or {LEGACY_MODEL_FOLDERS[kind]}/)"
    extra = env.extra_model_dirs.get(kind, [])
    extra_text = ", ".join(env.public_name(folder) for folder in extra) if extra else "none configured"
    places = [own, f"the extra model paths ({extra_text})"]
    if (bundled_models_dir() / kind).is_dir():
        places.append(f"the shipped models/{kind}/")
    files = env.list_models(kind)
    there = f"files there: {shown(files)}" if files else "no files there"
    return f"not found in {', '.join(places[:-1])} or {places[-1]}; {there}; put it in {own.split(' ')[0]}"


def missing_input_text(env: Environment, extensions: Iterable[str], what: str = "image") -> str:
    """Where an input file was looked for, what is there, and what to do (after "'name' ")."""
    override = getattr(env, "input_dir_override", None)  # --input-directory
    folder = f"{Path(override).resolve().name}/ (--input-directory)" if override else f"{data_label(env)}/input/"
    own = env.list_input_files(extensions, examples=False)
    places = f"{folder} ({f'files there: {shown(own)}' if own else 'empty'})"
    examples = bundled_inputs_dir()
    if examples.is_dir():
        places += f" or the shipped {examples.parent.name}/{examples.name}/"
    upload = "upload it or " if what == "image" else ""
    return f"not found in {places}; {upload}put it in {folder}"


class ModelFiles:
    """The options of a model-file combo: the files of a kind, read afresh each time; explains a missing one."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __call__(self, env: Environment | None) -> list[str]:
        return env.list_models(self.kind) if env is not None else []

    def explain_missing(self, env: Environment | None, value: str) -> str | None:
        return missing_model_text(env, self.kind) if env is not None else None

    def __repr__(self) -> str:
        return f"ModelFiles({self.kind!r})"


class InputFiles:
    """The options of an input-file combo (LoadImage): the data directory's input files and the shipped
    examples; explains a missing one."""

    def __init__(self, extensions: Iterable[str], what: str = "image") -> None:
        self.extensions = frozenset(extensions)
        self.what = what

    def __call__(self, env: Environment | None) -> list[str]:
        return env.list_input_files(self.extensions) if env is not None else []

    def explain_missing(self, env: Environment | None, value: str) -> str | None:
        return missing_input_text(env, self.extensions, self.what) if env is not None else None

    def __repr__(self) -> str:
        return f"InputFiles({self.what!r})"
