"""Where a running engine keeps its files: the data directory and the folders under it.

`data/models/{checkpoints,vae,loras,embeddings,...}`, `data/input`, `data/output`, `data/temp` and
`data/custom_nodes`. Nodes receive the environment explicitly (as the executor's `env`), never through
global state. Every name that comes from a workflow is resolved with `safe_join`, so it cannot escape
its folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nodes.model_paths import bundled_models_dir

MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
MODEL_FOLDERS = ("checkpoints", "vae", "loras", "embeddings", "text_encoders", "diffusion_models",
                 "upscale_models", "vae_approx", "configs")


class UnsafePathError(ValueError):
    """A name from a request or a workflow that would leave its folder."""


def safe_join(root: Path, *parts: str) -> Path:
    """`root/parts...`, refusing absolute parts, `..`, and symlinks that resolve outside `root`."""
    for part in parts:
        if not isinstance(part, str) or "\0" in part:
            raise UnsafePathError(f"invalid path component {part!r}")
        if Path(part).is_absolute() or part.startswith(("/", "\\")) or ".." in Path(part.replace("\\", "/")).parts:
            raise UnsafePathError(f"path {part!r} may not leave its folder")
    root_resolved = root.resolve()
    path = root_resolved.joinpath(*parts).resolve()
    if path != root_resolved and root_resolved not in path.parents:
        raise UnsafePathError(f"path {'/'.join(parts)!r} resolves outside {root}")
    return path


@dataclass
class Environment:
    data_dir: Path
    output_dir_override: Path | None = None
    extra_model_dirs: dict[str, list[Path]] = field(default_factory=dict)
    # Loaded models by (kind, path, options), shared by the loader nodes across prompts; /free empties it.
    model_cache: dict[Any, Any] = field(default_factory=dict)
    device: str | None = None  # "cuda", "cuda:1", "mps", "cpu"; None picks the best available
    low_memory: bool = False  # stream layers of models larger than the device's free memory
    _manager: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)

    def model_manager(self) -> Any:
        """The `diffusion.memory.ModelManager` of this environment's compute device (made on first use)."""
        if self._manager is None:
            from diffusion.devices import pick_device
            from diffusion.memory import ModelManager

            device = pick_device(self.device)
            self._manager = ModelManager(device, "cpu", low_memory=self.low_memory)
        return self._manager

    def list_models(self, kind: str) -> list[str]:
        """Model files of a kind, as names relative to their folder (subfolders with "/"), read afresh
        each time so that files added or removed show up at once."""
        names: set[str] = set()
        for folder in self.model_dirs(kind):
            if not folder.is_dir():
                continue
            for path in folder.rglob("*"):
                if path.suffix.lower() in MODEL_EXTENSIONS and path.is_file():
                    names.add(path.relative_to(folder).as_posix())
        return sorted(names)

    def find_model(self, kind: str, name: str) -> Path:
        """The file for a model name from a workflow; never outside the model folders."""
        for folder in self.model_dirs(kind):
            try:
                path = safe_join(folder, name)
            except UnsafePathError as exc:
                raise ValueError(f"{kind} model {name!r}: {exc}") from None
            if path.is_file():
                return path
        raise ValueError(f"{kind} model {name!r} not found in {', '.join(str(d) for d in self.model_dirs(kind))}")

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def input_dir(self) -> Path:
        return self.data_dir / "input"

    @property
    def output_dir(self) -> Path:
        return self.output_dir_override or self.data_dir / "output"

    @property
    def temp_dir(self) -> Path:
        return self.data_dir / "temp"

    @property
    def custom_nodes_dir(self) -> Path:
        return self.data_dir / "custom_nodes"

    def model_dirs(self, kind: str) -> list[Path]:
        """The folders searched for models of a kind: the data directory's, the configured extra folders,
        then the repository's own (the demo model)."""
        return [self.models_dir / kind, *self.extra_model_dirs.get(kind, []), bundled_models_dir() / kind]

    def ensure_dirs(self) -> None:
        for path in (self.input_dir, self.output_dir, self.temp_dir, self.custom_nodes_dir):
            path.mkdir(parents=True, exist_ok=True)
        for kind in MODEL_FOLDERS:
            (self.models_dir / kind).mkdir(parents=True, exist_ok=True)

    def unload_models(self) -> int:
        """Forget every loaded model (they are freed once no cached node output holds them)."""
        count = len(self.model_cache)
        self.model_cache.clear()
        if self._manager is not None:
            self._manager.unload_all()
        return count

    def device_stats(self) -> list[dict[str, Any]]:
        """The compute devices in /system_stats' shape (bytes)."""
        devices = []
        if torch.cuda.is_available():
            for index in range(torch.cuda.device_count()):
                free, total = torch.cuda.mem_get_info(index)
                devices.append({"name": torch.cuda.get_device_name(index), "type": "cuda", "index": index,
                                "vram_total": total, "vram_free": free,
                                "torch_vram_total": torch.cuda.memory_reserved(index),
                                "torch_vram_free": torch.cuda.memory_reserved(index)
                                - torch.cuda.memory_allocated(index)})
        if not devices:
            total, free = ram_bytes()
            devices.append({"name": "cpu", "type": "cpu", "index": None, "vram_total": total, "vram_free": free,
                            "torch_vram_total": 0, "torch_vram_free": 0})
        return devices


def ram_bytes() -> tuple[int, int]:
    """(total, available) physical memory in bytes, from /proc/meminfo where present."""
    try:
        fields = {}
        with open("/proc/meminfo") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                fields[key] = int(rest.split()[0]) * 1024
        return fields["MemTotal"], fields.get("MemAvailable", fields.get("MemFree", 0))
    except (OSError, KeyError, ValueError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return total, total
