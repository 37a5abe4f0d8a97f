"""Where a running engine keeps its files: the data directory and the folders under it.

`data/models/{checkpoints,vae,loras,embeddings,...}`, `data/input`, `data/output`, `data/temp` and
`data/custom_nodes`. Nodes receive the environment explicitly (as the executor's `env`), never through
global state. Every name that comes from a workflow is resolved with `safe_join`, so it cannot escape
its folder.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nodes.missing_files import missing_input_text, missing_model_text, model_word
from nodes.model_cache import ModelCache
from nodes.model_paths import bundled_inputs_dir, bundled_models_dir

log = logging.getLogger(__name__)

MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
MODEL_FOLDERS = ("checkpoints", "vae", "loras", "embeddings", "text_encoders", "diffusion_models",
                 "upscale_models", "vae_approx", "configs", "unet", "clip", "controlnet", "clip_vision",
                 "style_models", "gligen", "hypernetworks", "ipadapter", "animatediff_models",
                 "animatediff_motion_lora")
# ComfyUI's older folder names, still searched after the new ones (its diffusion_models and text_encoders).
LEGACY_MODEL_FOLDERS = {"diffusion_models": "unet", "text_encoders": "clip"}


class UnsafePathError(ValueError):
    """A name from a request or a workflow that would leave its folder."""


def check_name_parts(*parts: str) -> None:
    """Refuse names that leave their folder as written: absolute, `..`, NUL (symlinks are safe_join's)."""
    for part in parts:
        if not isinstance(part, str) or "\0" in part:
            raise UnsafePathError(f"invalid path component {part!r}")
        if Path(part).is_absolute() or part.startswith(("/", "\\")) or ".." in Path(part.replace("\\", "/")).parts:
            raise UnsafePathError(f"path {part!r} may not leave its folder")


def is_inside(path: str | Path, root_real: str) -> bool:
    """Whether `path`, every symlink resolved, is `root_real` (a realpath) or lies under it."""
    real = os.path.realpath(path)
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


def safe_join(root: Path, *parts: str) -> Path:
    """`root/parts...`, refusing absolute parts, `..`, and symlinks that resolve outside `root`. Messages name
    the parts, never the folder's absolute path."""
    check_name_parts(*parts)
    root_resolved = root.resolve()
    path = root_resolved.joinpath(*parts).resolve()
    if path != root_resolved and root_resolved not in path.parents:
        raise UnsafePathError(f"path {'/'.join(parts)!r} resolves outside its folder")
    return path


def list_files(root: Path, extensions: Iterable[str], recursive: bool = True) -> list[str]:
    """Names of the files under `root` with one of the extensions, relative to it with "/", sorted. An entry that
    resolves outside `root` (a symlink to /etc/passwd or ~/.ssh, a linked folder elsewhere) is neither listed nor
    entered; symlinks that stay inside are followed, except into a folder they are already in (a cycle)."""
    suffixes = {e.lower() for e in extensions}
    root_real = os.path.realpath(root)
    if not os.path.isdir(root_real):
        return []
    names: list[str] = []
    pending: list[tuple[str, str, frozenset[str]]] = [(str(root), "", frozenset({root_real}))]
    while pending:
        folder, prefix, chain = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_symlink() and not is_inside(entry.path, root_real):
                    log.debug("not listed: %s%s leads outside its folder", prefix, entry.name)
                    continue
                if entry.is_dir():
                    real = os.path.realpath(entry.path)
                    if recursive and real not in chain:
                        pending.append((entry.path, f"{prefix}{entry.name}/", chain | {real}))
                elif entry.is_file() and os.path.splitext(entry.name)[1].lower() in suffixes:
                    names.append(prefix + entry.name)
            except OSError:
                continue
    return sorted(names)


# How messages name a folder: (absolute path, prefix for paths under it, the folder's own name), longest first.
FolderNames = Sequence[tuple[str, str, str]]


def folder_names(labels: Iterable[tuple[str | Path, str]]) -> list[tuple[str, str, str]]:
    """FolderNames for (folder, label) pairs: `folder/x` becomes `label/x` (just `x` for an empty label), both as
    given (made absolute) and with symlinks resolved."""
    names: dict[str, tuple[str, str]] = {}
    for folder, label in labels:
        for form in (os.path.abspath(folder), os.path.realpath(folder)):
            if len(form.rstrip(os.sep)) > 1:
                names.setdefault(form.rstrip(os.sep), (f"{label}/" if label else "", label or "<data directory>"))
    return [(folder, prefix, bare) for folder, (prefix, bare) in sorted(names.items(), key=lambda kv: -len(kv[0]))]


def name_paths(text: str, names: FolderNames) -> str:
    """`text` with every absolute path under the named folders replaced by its public name."""
    for folder, prefix, bare in names:
        pattern = re.escape(folder) + r"(?:[/\\]|(?![\w.\-]))"
        text = re.sub(pattern, lambda m, p=prefix, b=bare: p if m.group().endswith(("/", "\\")) else b, text)
    return text


def _chain_texts(exc: BaseException) -> Iterator[str]:
    """The messages and notes that a traceback of `exc` shows: its own and those of its causes and contexts."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield str(current)
        yield from (str(note) for note in getattr(current, "__notes__", ()))
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)


def renamed_error(exc: BaseException, names: FolderNames) -> BaseException:
    """`exc` itself when neither it nor its chain names a path under the folders; else an exception of the same
    type (ValueError if that cannot be made from a message) whose message and notes name the files publicly,
    its chain dropped (the original goes to the debug log)."""
    if not any(name_paths(text, names) != text for text in _chain_texts(exc)):
        return exc
    message = name_paths(str(exc), names)
    try:
        renamed = type(exc)(message)
    except Exception:
        renamed = ValueError(message)
    if str(renamed) != message:
        renamed = ValueError(message)
    for note in getattr(exc, "__notes__", ()):
        renamed.add_note(name_paths(str(note), names))
    log.debug("error renamed for users: %s", message, exc_info=exc)
    return renamed


def message_naming(exc: BaseException, folder: str | Path, label: str) -> str:
    """str(exc) naming the files in `folder` as `label/name` (just `name` for an empty label), never by absolute
    path: PIL and the OS put the paths they were given in their messages."""
    return name_paths(str(exc), folder_names([(folder, label)]))


@contextmanager
def naming_files(names: FolderNames) -> Iterator[None]:
    """Errors raised inside name files relative to the folders (see renamed_error), never by absolute path."""
    try:
        yield
    except Exception as exc:
        renamed = renamed_error(exc, names)
        if renamed is exc:
            raise
        raise renamed from None



def embedding_file_names(clip: Any) -> Any:
    """A context in which errors name a CLIP handle's embedding files inside their folder (`embeddings/x.pt`),
    never by absolute path (text encoding reads them)."""
    dirs = getattr(getattr(clip, "text", None), "embedding_dirs", None) or ()
    return naming_files(folder_names((folder, "embeddings") for folder in dirs))


@dataclass
class Environment:
    data_dir: Path
    output_dir_override: Path | None = None
    extra_model_dirs: dict[str, list[Path]] = field(default_factory=dict)
    # Loaded models by (kind, path, options), shared by the loader nodes across prompts; /free empties it.
    model_cache: ModelCache = field(default_factory=ModelCache)  # each file loaded once, even by threads at once
    device: str | None = None  # "cuda", "cuda:1", "mps", "cpu"; None picks the best available
    # "normal"; "low" (--lowvram): stream layers of models larger than the device's free memory; "no" (--novram):
    # stream every layer; "high" (--highvram): models rest on the compute device, never moved back to RAM.
    vram: str = "normal"
    # Weight dtypes (diffusion.devices.model_dtype): `precision` for every model ("fp32", "bf16", "fp16"; None: the
    # device's rule), `unet_precision` and `vae_precision` for the diffusion model and the VAE alone.
    precision: str | None = None
    unet_precision: str | None = None
    vae_precision: str | None = None
    input_dir_override: Path | None = None  # --input-directory
    temp_dir_override: Path | None = None  # --temp-directory (its temp/ folder, as ComfyUI)
    max_image_pixels: int | None = None  # all frames of an image together; None: nodes/image_limits.py's default
    max_image_frames: int | None = None
    # Sampler previews (--preview-method): "auto" and "taesd" use a tiny decoder where one is found for the model
    # (preview_decoder), "latent2rgb" the linear map, "none" none at all (the server then asks for none).
    preview_method: str = "auto"
    # --compile: the checkpoint loaders route the UNet's and the VAE decoder's forward through torch.compile
    # (diffusion/patches/compile.py), its cache in DATA_DIR/cache/torchinductor.
    compile_models: bool = False
    # --weight-cache-gb: the bytes DATA_DIR/cache/weights may hold (diffusion/checkpoints/cast_cache.py); 0: off.
    weight_cache_bytes: int = 8 << 30
    _manager: Any = field(default=None, init=False, repr=False)
    _manager_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)

    def cast_cache_options(self) -> dict[str, Any]:
        """load_checkpoint's cast-cache arguments: the folder that keeps cast weights and its limit (none when
        --weight-cache-gb 0)."""
        if self.weight_cache_bytes <= 0:
            return {"cast_cache": None}
        return {"cast_cache": self.data_dir / "cache" / "weights", "cast_cache_limit": self.weight_cache_bytes}

    def model_manager(self) -> Any:
        """The `diffusion.memory.ModelManager` of this environment's compute device (made on first use)."""
        with self._manager_lock:  # one manager, even when worker threads ask for it at once
            if self._manager is None:
                from diffusion.devices import pick_device
                from diffusion.memory import ModelManager

                device = pick_device(self.device)
                self._manager = ModelManager(device, **manager_options(self.vram, device))
        return self._manager

    def model_dtype(self, role: str = "model") -> Any:
        """The torch dtype a loader gives a model of `role` ("unet", "text", "vae", "image", "model") on this
        environment's device: the forced precisions when set, else the device's rule (diffusion.devices)."""
        from diffusion.devices import model_dtype

        return model_dtype(self.model_manager().device, role, precision=self.precision,
                           unet_precision=self.unet_precision, vae_precision=self.vae_precision)

    def list_models(self, kind: str) -> list[str]:
        """Model files of a kind, as names relative to their folder (subfolders with "/"), read afresh
        each time so that files added or removed show up at once; never a symlink leading out of its folder."""
        names: set[str] = set()
        for folder in self.model_dirs(kind):
            names.update(list_files(folder, MODEL_EXTENSIONS))
        return sorted(names)

    def list_input_files(self, extensions: Iterable[str], examples: bool = True) -> list[str]:
        """Files of the input folder (not its subfolders) with one of the extensions, then (`examples`) the
        repository's example inputs of other names; never a symlink leading out."""
        names = set(list_files(self.input_dir, extensions, recursive=False))
        if examples:
            names.update(list_files(bundled_inputs_dir(), extensions, recursive=False))
        return sorted(names)

    def input_file(self, name: str, extensions: Iterable[str]) -> Path | None:
        """The data directory's `input/name`, else the shipped example of that name (one of the extensions);
        None when neither exists. Raises UnsafePathError for a name that would leave its folder."""
        path = safe_join(self.input_dir, name)
        if path.is_file():
            return path
        if Path(name).suffix.lower() in {e.lower() for e in extensions}:
            shipped = safe_join(bundled_inputs_dir(), name)
            if shipped.is_file():
                return shipped
        return None

    def find_input(self, name: str, extensions: Iterable[str], what: str = "image") -> Path:
        """The input file for a name from a workflow (see input_file). A missing file's error says where it was
        looked for and what to do (nodes/missing_files.py)."""
        try:
            path = self.input_file(name, extensions)
        except UnsafePathError as exc:
            raise ValueError(f"{what} {name!r}: {exc}") from None
        if path is None:
            raise ValueError(f"{what} {name!r} {missing_input_text(self, extensions, what)}")
        return path

    def find_model(self, kind: str, name: str) -> Path:
        """The file for a model name from a workflow, from the first folder that has it; never outside the
        model folders (a symlink there that leads out is skipped). Errors name folders publicly."""
        try:
            check_name_parts(name)
        except UnsafePathError as exc:
            raise ValueError(f"{kind} model {name!r}: {exc}") from None
        refused: UnsafePathError | None = None
        for folder in self.model_dirs(kind):
            try:
                path = safe_join(folder, name)
            except UnsafePathError as exc:
                refused = exc
                continue
            if path.is_file():
                return path
        if refused is not None:
            raise ValueError(f"{kind} model {name!r}: {refused}")
        raise ValueError(f"{model_word(kind)} {name!r} {missing_model_text(self, kind)}")

    def folder_names(self) -> list[tuple[str, str, str]]:
        """How messages name this environment's folders: the data directory's files relative to it
        (`models/checkpoints/x.safetensors`, `input/a.png`), extra model folders by kind and folder name
        (`<extra checkpoints: Stable-diffusion>/x.safetensors`), the repository's models as `<bundled models>`."""
        labels: list[tuple[str | Path, str]] = [(self.data_dir, ""), (bundled_models_dir(), "<bundled models>"),
                                                (bundled_inputs_dir(), "<shipped examples>")]
        if self.output_dir_override is not None:
            labels.append((self.output_dir_override, "output"))
        labels += [(folder, label) for folder, label in ((self.input_dir_override, "input"),
                                                         (self.temp_dir_override, "temp")) if folder is not None]
        for kind, folders in self.extra_model_dirs.items():
            labels += [(folder, f"<extra {kind}: {Path(folder).name}>") for folder in folders]
        return folder_names(labels)

    def public_name(self, path: str | Path) -> str:
        """A path as messages may show it (see folder_names); a path outside every folder by its name only."""
        text = os.path.abspath(path)
        named = name_paths(text, self.folder_names())
        return Path(text).name if named == text else named

    def public_text(self, text: str) -> str:
        """`text` with the paths under this environment's folders named as messages may show them."""
        return name_paths(text, self.folder_names())

    def naming_files(self) -> Any:
        """A context in which errors name this environment's files publicly (see naming_files)."""
        return naming_files(self.folder_names())

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def input_dir(self) -> Path:
        return self.input_dir_override or self.data_dir / "input"

    @property
    def output_dir(self) -> Path:
        return self.output_dir_override or self.data_dir / "output"

    @property
    def temp_dir(self) -> Path:
        return self.temp_dir_override or self.data_dir / "temp"

    @property
    def custom_nodes_dir(self) -> Path:
        return self.data_dir / "custom_nodes"

    def model_dirs(self, kind: str) -> list[Path]:
        """The folders searched for models of a kind: the data directory's, the configured extra folders,
        then the repository's own (the demo model)."""
        legacy = [self.models_dir / LEGACY_MODEL_FOLDERS[kind]] if kind in LEGACY_MODEL_FOLDERS else []
        return [self.models_dir / kind, *legacy, *self.extra_model_dirs.get(kind, []), bundled_models_dir() / kind]

    def preview_decoder(self, family: str, checkpoint: str) -> Any:
        """A loader (no arguments) of the tiny preview decoder for a checkpoint (its stem) of `family` under the
        preview method, from the vae_approx folders (names: diffusion.preview.tiny_decoder_names); None for the
        linear map. `taesd` without a decoder file says so once per checkpoint and falls back to the linear map."""
        from diffusion.preview import tiny_decoder_names

        if self.preview_method not in ("auto", "taesd"):
            return None
        names = tiny_decoder_names(family, checkpoint)
        for name in names:
            for folder in self.model_dirs("vae_approx"):
                path = folder / name
                if path.is_file():
                    def load(path: Path = path) -> Any:
                        from diffusion.models.taesd import load_tiny_decoder

                        with self.naming_files():
                            return load_tiny_decoder(path)
                    return load
        if self.preview_method == "taesd":
            log.warning("--preview-method taesd: no tiny decoder for %r (%s) in models/vae_approx/ (looked for %s); "
                        "its previews use latent2rgb", checkpoint, family, ", ".join(names[::2]) or "nothing")
        return None

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
        chosen = torch.device(self.device) if self.device else None  # --device: that device's workers alone
        if torch.cuda.is_available() and (chosen is None or chosen.type == "cuda"):
            indices = range(torch.cuda.device_count()) if chosen is None or chosen.index is None else [chosen.index]
            for index in indices:
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


VRAM_MODES = ("normal", "low", "no", "high")


def manager_options(vram: str, device: Any) -> dict[str, Any]:
    """ModelManager's arguments for a --lowvram/--novram/--highvram choice on `device`: low streams the layers
    that do not fit; no keeps no layer resident (a budget of 0 bytes); high makes the compute device the offload
    device too, so a model once there is never moved back to RAM."""
    if vram not in VRAM_MODES:
        raise ValueError(f"unknown vram mode {vram!r}; one of {', '.join(VRAM_MODES)}")
    return {"offload_device": device if vram == "high" else "cpu", "low_memory": vram in ("low", "no"),
            "budget_bytes": 0 if vram == "no" else None}


def model_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` strings of a safetensors model file ({} for other formats), from its header alone:
    diffusion/checkpoints/files.py's reader, so no tensor is read and no pickle is ever loaded. A corrupt header
    raises its CheckpointError (a ValueError) naming the file."""
    from diffusion.checkpoints.files import read_metadata

    return read_metadata(path)


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
