"""ComfyUI's `folder_paths` for packs, over our environment's data directory.

`folder_names_and_paths` maps a model kind to `([folders], {extensions})` as in ComfyUI; it starts from our
environment's model folders (extra model paths included) and packs may add kinds or folders to it. Names from
workflows go through our safe path checks: one that leaves its folder is never found. The module attributes
`models_dir`, `base_path`, `input_directory`, `output_directory`, `temp_directory` and `user_directory` are read
from the environment when asked (PEP 562), so they follow the data directory the engine runs with.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from comfy_compat._state import environment
from nodes.environment import MODEL_EXTENSIONS, MODEL_FOLDERS, UnsafePathError, list_files, safe_join

log = logging.getLogger(__name__)

supported_pt_extensions: set[str] = set(MODEL_EXTENSIONS) | {".pkl", ".sft"}
folder_names_and_paths: dict[str, tuple[list[str], set[str]]] = {}
_added: dict[str, list[str]] = {}  # folders packs added, kept across refreshes
_ANNOTATION = re.compile(r"^(.*) \[(input|output|temp)\]$")


def refresh() -> None:
    """Rebuild the model folders from the environment (called when packs are loaded)."""
    folder_names_and_paths.clear()
    try:
        env = environment()
    except RuntimeError:
        return
    for kind in MODEL_FOLDERS:
        folder_names_and_paths[kind] = ([str(p) for p in env.model_dirs(kind)], set(supported_pt_extensions))
    for kind, folders in _added.items():
        paths, _ = folder_names_and_paths.setdefault(kind, ([], set(supported_pt_extensions)))
        paths.extend(f for f in folders if f not in paths)


def __getattr__(name: str) -> Any:
    readers = {"models_dir": lambda e: e.models_dir, "base_path": lambda e: e.data_dir,
               "input_directory": lambda e: e.input_dir, "output_directory": lambda e: e.output_dir,
               "temp_directory": lambda e: e.temp_dir, "user_directory": lambda e: e.data_dir / "user"}
    if name in readers:
        return str(readers[name](environment()))
    raise AttributeError(f"module 'folder_paths' has no attribute {name!r} (not offered by Latent Loom)")


def get_input_directory() -> str:
    return str(environment().input_dir)


def get_output_directory() -> str:
    return str(environment().output_dir)


def get_temp_directory() -> str:
    return str(environment().temp_dir)


def get_user_directory() -> str:
    return str(environment().data_dir / "user")


def get_directory_by_type(type_name: str) -> str | None:
    return {"input": get_input_directory, "output": get_output_directory,
            "temp": get_temp_directory}.get(type_name, lambda: None)()


def annotated_filepath(name: str) -> tuple[str, str | None]:
    """`"a.png [output]"` -> ("a.png", the output folder); no annotation -> (name, None)."""
    match = _ANNOTATION.match(name)
    if match is None:
        return name, None
    return match.group(1), get_directory_by_type(match.group(2))


def get_annotated_filepath(name: str, default_dir: str | None = None) -> str:
    name, folder = annotated_filepath(name)
    folder = folder or default_dir or get_input_directory()
    return str(safe_join(Path(folder), name))


def exists_annotated_filepath(name: str) -> bool:
    try:
        return os.path.exists(get_annotated_filepath(name))
    except UnsafePathError:
        return False


def add_model_folder_path(folder_name: str, full_folder_path: str, is_default: bool = False) -> None:
    """A pack's own model folder (or another folder for a known kind); `is_default` puts it first."""
    folders = _added.setdefault(folder_name, [])
    if full_folder_path not in folders:
        folders.insert(0, full_folder_path) if is_default else folders.append(full_folder_path)
    paths, _ = folder_names_and_paths.setdefault(folder_name, ([], set(supported_pt_extensions)))
    if full_folder_path in paths:
        paths.remove(full_folder_path)
    paths.insert(0, full_folder_path) if is_default else paths.append(full_folder_path)


def get_folder_paths(folder_name: str) -> list[str]:
    return list(_kind(folder_name)[0])


def _kind(folder_name: str) -> tuple[list[str], set[str]]:
    if folder_name not in folder_names_and_paths and folder_name in _LEGACY:
        folder_name = _LEGACY[folder_name]
    if folder_name not in folder_names_and_paths:
        raise KeyError(f"folder_paths: unknown model folder {folder_name!r}; known: "
                       f"{sorted(folder_names_and_paths)}")
    return folder_names_and_paths[folder_name]


_LEGACY = {"unet": "diffusion_models", "clip": "text_encoders"}


def get_filename_list(folder_name: str) -> list[str]:
    """Files of a model kind, relative to their folder with "/", sorted; links that leave a folder are left out."""
    folders, extensions = _kind(folder_name)
    names: set[str] = set()
    for folder in folders:
        names.update(list_files(Path(folder), extensions if extensions else {""}))
    return sorted(names)


def filter_files_extensions(files: list[str], extensions: set[str] | list[str]) -> list[str]:
    wanted = {e.lower() for e in extensions}
    return sorted(f for f in files if not wanted or os.path.splitext(f)[1].lower() in wanted)


def get_full_path(folder_name: str, filename: str) -> str | None:
    """The file's path in the first folder of the kind that has it; None when absent or when the name would
    leave its folder."""
    try:
        folders, _ = _kind(folder_name)
    except KeyError:
        return None
    for folder in folders:
        try:
            path = safe_join(Path(folder), *filename.replace("\\", "/").split("/"))
        except UnsafePathError as exc:
            log.warning("folder_paths: refused %r in %s: %s", filename, folder_name, exc)
            return None
        if path.is_file():
            return str(path)
    return None


def get_full_path_or_raise(folder_name: str, filename: str) -> str:
    path = get_full_path(folder_name, filename)
    if path is None:
        raise FileNotFoundError(f"model in folder '{folder_name}' with filename '{filename}' not found")
    return path


def get_save_image_path(filename_prefix: str, output_dir: str, image_width: int = 0,
                        image_height: int = 0) -> tuple[str, str, int, str, str]:
    """(folder, file name prefix, next counter, subfolder, prefix) for saving `<prefix>_<counter:05>_.png`, as
    ComfyUI's SaveImage names files: %width%/%height% in the prefix are replaced, the counter continues after
    the highest one present, and a prefix that leaves the output folder is refused."""
    filename_prefix = filename_prefix.replace("%width%", str(image_width)).replace("%height%", str(image_height))
    subfolder, filename = os.path.split(os.path.normpath(filename_prefix))
    full_output_folder = os.path.join(output_dir, subfolder)
    root = os.path.realpath(output_dir)
    real = os.path.realpath(full_output_folder)
    if real != root and not real.startswith(root + os.sep):
        raise UnsafePathError(f"filename_prefix {filename_prefix!r} would save outside the output folder")
    pattern = re.compile(re.escape(filename) + r"_(\d+)_?")
    counter = 1
    if os.path.isdir(full_output_folder):
        found = [int(m.group(1)) for f in os.listdir(full_output_folder) if (m := pattern.match(f))]
        counter = max(found, default=0) + 1
    return full_output_folder, filename, counter, subfolder, filename_prefix
