"""Extra model folders from a config file, so users can point at the models they already have.

The format is ComfyUI's `extra_model_paths.yaml` (TOML with the same structure works too): named sections,
each with an optional `base_path` and, per model kind, one folder or several on separate lines, relative
to `base_path`:

    a111:
        base_path: ~/stable-diffusion-webui/
        checkpoints: models/Stable-diffusion
        vae: models/VAE
        loras: |
            models/Lora
            models/LyCORIS
        embeddings: embeddings

A1111's folder names map to ours as in that example; keys of other kinds are taken as they are.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import yaml

# Other names the same kind of model goes by in ComfyUI's and A1111's configs.
KIND_ALIASES = {"unet": "diffusion_models", "clip": "text_encoders", "lora": "loras", "lycoris": "loras",
                "checkpoint": "checkpoints", "embedding": "embeddings"}
SECTION_OPTIONS = {"base_path", "is_default"}


class ModelPathsError(ValueError):
    pass


def bundled_models_dir() -> Path:
    """The repository's own `models/` folder (the project's small demo model lives there)."""
    return Path(__file__).resolve().parent.parent / "models"


def bundled_inputs_dir() -> Path:
    """The repository's example inputs (`examples/input/`, the image the img2img, inpaint and outpaint workflows
    load), searched after the data directory's `input/` as `models/` is after its models: a fresh clone's
    workflows find them, and a user's own file of the same name wins."""
    return Path(__file__).resolve().parent.parent / "examples" / "input"


def read_extra_model_paths(path: str | Path) -> dict[str, list[Path]]:
    """Folders per model kind from a YAML or TOML config; relative paths are relative to `base_path`, which is
    itself relative to the config file's folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelPathsError(f"cannot read model paths config {path}: {exc.strerror or exc}") from None
    try:
        data: Any = tomllib.loads(text) if path.suffix.lower() == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ModelPathsError(f"{path} is not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ModelPathsError(f"{path}: expected named sections of model folders")
    folders: dict[str, list[Path]] = {}
    for name, section in data.items():
        if not isinstance(section, dict):
            raise ModelPathsError(f"{path}: section {name!r} must map model kinds to folders")
        base = (path.parent / Path(str(section.get("base_path", "."))).expanduser()).resolve()
        for kind, value in section.items():
            if kind in SECTION_OPTIONS:
                continue
            if not isinstance(value, str):
                raise ModelPathsError(f"{path}: {name}.{kind} must be a folder or lines of folders")
            kind = KIND_ALIASES.get(kind.lower(), kind.lower())
            for line in value.splitlines():
                if line.strip():
                    folders.setdefault(kind, []).append((base / Path(line.strip()).expanduser()).resolve())
    return folders
