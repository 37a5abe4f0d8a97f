"""The command line's engine and server flags, ComfyUI's names among ours, and how they combine.

People who come from ComfyUI type `--listen`, `--cpu`, `--force-fp32`, `--lowvram`, `--output-directory`, ...;
they mean here what they mean there. Each is resolved into the plain values the Environment and the ServerConfig
take (a device name, precision names, a vram mode, folders); combinations that contradict each other (`--cpu
--cuda-device 1`, `--force-fp32 --force-fp16`, `--listen` with `--host`) are one line, never a silent choice.

This module imports neither torch nor the engine, so that `latentloom --help` answers at once: parsing and
checking the flags needs neither; the device itself is checked once a command runs (server/cli.py).
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PRECISION_CHOICES = ("fp32", "bf16", "fp16")
VRAM_FLAGS = {"lowvram": "low", "novram": "no", "highvram": "high"}
PREVIEW_METHODS = ("none", "auto", "latent2rgb", "taesd")
DEFAULT_HOST = "127.0.0.1"
LISTEN_ALL = "0.0.0.0"  # `--listen` without an address (ComfyUI binds "::" too, which fails without IPv6)


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def _default(suppress: bool, value: Any) -> Any:
    return argparse.SUPPRESS if suppress else value


def cuda_index(value: str) -> int:
    try:
        index = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a GPU number (0, 1, ...), got {value!r}") from None
    if index < 0:
        raise argparse.ArgumentTypeError(f"a GPU number is 0 or more, got {index}")
    return index


def weight_cache_gb(value: str) -> float:
    try:
        gb = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of gigabytes, got {value!r}") from None
    if not math.isfinite(gb) or gb < 0 or gb > 1e6:
        raise argparse.ArgumentTypeError(f"a number of gigabytes from 0 to 1000000, got {value}")
    return gb


def add_engine_options(parser: argparse.ArgumentParser, suppress: bool = False) -> None:
    """Device, precision, memory and folder flags. On the main parser (`suppress` False: with defaults) and again
    on each subcommand (`suppress` True: absent unless typed there), so `latentloom --cpu serve` and `latentloom
    serve --cpu` both work, as --data-dir does."""
    group = parser.add_argument_group("device and precision (ComfyUI's flags mean the same here)")
    group.add_argument("--device", default=_default(suppress, None), metavar="cpu|cuda|cuda:N|mps",
                       help="the compute device (default: CUDA, then MPS, then the CPU)")
    group.add_argument("--cpu", action="store_true", default=_default(suppress, False),
                       help="compute on the CPU (as --device cpu)")
    group.add_argument("--cuda-device", type=cuda_index, default=_default(suppress, None), metavar="N",
                       help="compute on GPU N (as --device cuda:N)")
    group.add_argument("--precision", choices=PRECISION_CHOICES, default=_default(suppress, None),
                       help="weight dtype of every model (default: bf16 where the device computes it natively, "
                            "fp16 on other GPUs, fp32 on other CPUs; a VAE is never fp16)")
    group.add_argument("--force-fp32", action="store_true", default=_default(suppress, False),
                       help="as --precision fp32")
    group.add_argument("--force-fp16", action="store_true", default=_default(suppress, False),
                       help="as --precision fp16 (VAEs stay fp32: fp16 overflows in them)")
    group.add_argument("--bf16-unet", action="store_true", default=_default(suppress, False),
                       help="the diffusion model in bf16, whatever the other models use")
    group.add_argument("--fp32-vae", action="store_true", default=_default(suppress, False),
                       help="the VAE in fp32, whatever the other models use")
    group.add_argument("--weight-cache-gb", type=weight_cache_gb, default=_default(suppress, 8.0), metavar="GB",
                       help="disk kept for weights a load had to cast (fp16 files run in bf16 on a CPU), in "
                            "DATA_DIR/cache/weights, so that the next start maps them (default 8; 0: off)")
    group.add_argument("--compile", action="store_true", default=_default(suppress, False),
                       help="torch.compile the diffusion model and the VAE decoder (the first image of each size "
                            "compiles for minutes, later ones and later runs are faster; compiled kernels are "
                            "cached in DATA_DIR/cache/torchinductor; without a working compiler: one warning, "
                            "then uncompiled)")
    group.add_argument("--lowvram", action="store_true", default=_default(suppress, False),
                       help="stream the layers of a model that does not fit in the device's free memory")
    group.add_argument("--novram", action="store_true", default=_default(suppress, False),
                       help="keep no layer on the device between uses: stream every layer (least memory)")
    group.add_argument("--highvram", action="store_true", default=_default(suppress, False),
                       help="keep models on the device once loaded, never moved back to RAM")
    folders = parser.add_argument_group("folders (default: under the data directory)")
    folders.add_argument("--output-directory", type=Path, default=_default(suppress, None), metavar="DIR",
                         help="where output images go (default DATA_DIR/output)")
    folders.add_argument("--input-directory", type=Path, default=_default(suppress, None), metavar="DIR",
                         help="where LoadImage reads and uploads go (default DATA_DIR/input)")
    folders.add_argument("--temp-directory", type=Path, default=_default(suppress, None), metavar="DIR",
                         help="previews go to DIR/temp, as in ComfyUI (default DATA_DIR/temp)")
    folders.add_argument("--extra-model-paths", "--extra-model-paths-config", dest="extra_model_paths",
                         action="append", type=Path, default=_default(suppress, None), metavar="FILE",
                         help="YAML or TOML file of extra model folders (ComfyUI's extra_model_paths.yaml format); "
                              "repeatable; default: DATA_DIR/extra_model_paths.yaml when present")


def add_memory_option(parser: argparse.ArgumentParser) -> None:
    """`--max-prompt-memory` (server/admission.py reads it); its value is checked by admission's parser, imported
    only when the flag is given, so --help stays free of the engine."""
    parser.add_argument("--max-prompt-memory", type=_memory_limit, default=None, metavar="SIZE|FRACTION|off",
                        help="refuse a workflow whose estimated peak memory is above this: a size (4GB, 512MB), a "
                             "fraction of the device's memory (0.5) or 'off' (default: 0.75 of the device: the "
                             "GPU's memory on a GPU, the RAM on a CPU)")


def _memory_limit(text: str) -> str:
    from server.admission import memory_limit_option

    return memory_limit_option(text)


def add_server_flags(serve: argparse.ArgumentParser) -> None:
    """ComfyUI's server flags that ours lacked: --listen, --user-directory, --preview-method, --auto-launch."""
    serve.add_argument("--listen", nargs="?", const=LISTEN_ALL, default=None, metavar="ADDR",
                       help=f"addresses to bind, comma-separated, as ComfyUI: without ADDR {LISTEN_ALL} (every IPv4 "
                            "interface; ComfyUI adds ::); same rules as --host (a public address without "
                            "--auth-token is warned about)")
    serve.add_argument("--user-directory", type=Path, default=None, metavar="DIR",
                       help="the front end's user files (settings, saved workflows) in DIR/default "
                            "(default DATA_DIR/user)")
    serve.add_argument("--preview-method", choices=PREVIEW_METHODS, default="auto",
                       help="sampler previews: none, latent2rgb (a linear map fitted to the VAE), taesd (a tiny "
                            "decoder; latent2rgb until one is installed), auto (the best there is; default)")
    launch = serve.add_mutually_exclusive_group()
    launch.add_argument("--auto-launch", dest="auto_launch", action="store_true", default=False,
                        help="open the canvas in the default browser once the server listens")
    launch.add_argument("--disable-auto-launch", dest="auto_launch", action="store_false",
                        help="do not open a browser (the default)")


def _given(args: argparse.Namespace, *pairs: tuple[str, str]) -> list[str]:
    """The flags (as typed) among `(attribute, flag)` pairs that the command line set."""
    shown = []
    for name, flag in pairs:
        value = getattr(args, name, None)
        if value not in (None, False):
            shown.append(flag if value is True else f"{flag} {value}")
    return shown


def _one_of(given: list[str], what: str) -> None:
    if len(given) > 1:
        raise CliError(f"{' and '.join(given)} contradict each other: give one {what}")


def resolve_device(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(device name or None for the best present, the flag that named it as typed)."""
    given = _given(args, ("device", "--device"), ("cpu", "--cpu"), ("cuda_device", "--cuda-device"))
    _one_of(given, "device (--device, --cpu or --cuda-device)")
    if getattr(args, "cpu", False):
        return "cpu", given[0]
    if getattr(args, "cuda_device", None) is not None:
        return f"cuda:{args.cuda_device}", given[0]
    device = getattr(args, "device", None)
    if device is not None:
        head, _, index = device.partition(":")
        if head not in ("cpu", "cuda", "mps") or (index and (head != "cuda" or not index.isdigit())):
            raise CliError(f"--device {device}: use cpu, cuda, cuda:N or mps")
    return device, (given[0] if given else None)


def resolve_precision(args: argparse.Namespace) -> dict[str, str | None]:
    """Environment's precision fields: `precision` for every model, `unet_precision`, `vae_precision`."""
    given = _given(args, ("precision", "--precision"), ("force_fp32", "--force-fp32"),
                   ("force_fp16", "--force-fp16"))
    _one_of(given, "precision (--precision, --force-fp32 or --force-fp16)")
    precision = getattr(args, "precision", None)
    if getattr(args, "force_fp32", False):
        precision = "fp32"
    elif getattr(args, "force_fp16", False):
        precision = "fp16"
    return {"precision": precision, "unet_precision": "bf16" if getattr(args, "bf16_unet", False) else None,
            "vae_precision": "fp32" if getattr(args, "fp32_vae", False) else None}


def resolve_vram(args: argparse.Namespace) -> str:
    """The Environment's vram mode: normal, low, no or high."""
    given = _given(args, *((name, f"--{name}") for name in VRAM_FLAGS))
    _one_of(given, "of --lowvram, --novram, --highvram")
    return next((mode for name, mode in VRAM_FLAGS.items() if getattr(args, name, False)), "normal")


def resolve_folders(args: argparse.Namespace) -> dict[str, Path | None]:
    """The Environment's folder overrides. ComfyUI puts its temp files in `--temp-directory`'s temp/ subfolder (it
    empties that folder at start), so DIR/temp here too; `run --output` is ours for --output-directory."""
    output = getattr(args, "output", None)
    output_directory = getattr(args, "output_directory", None)
    if output is not None and output_directory is not None:
        raise CliError(f"--output {output} and --output-directory {output_directory} contradict each other: "
                       "give one")
    temp = getattr(args, "temp_directory", None)
    return {"output_dir_override": output if output is not None else output_directory,
            "input_dir_override": getattr(args, "input_directory", None),
            "temp_dir_override": temp / "temp" if temp is not None else None}


def resolve_hosts(args: argparse.Namespace) -> list[str]:
    """The addresses to bind: --host or --listen (never both; --listen takes ComfyUI's comma-separated list),
    else loopback."""
    host, listen = getattr(args, "host", None), getattr(args, "listen", None)
    if host is not None and listen is not None:
        raise CliError(f"--listen {listen} and --host {host} contradict each other: give one address to bind")
    given = listen if listen is not None else host if host is not None else DEFAULT_HOST
    addresses = [part.strip() for part in given.split(",")]
    if not all(addresses):
        raise CliError(f"--{'listen' if listen is not None else 'host'} {given}: an empty address in the list")
    return list(dict.fromkeys(addresses))  # in order, each once


def preview_method(args: argparse.Namespace) -> str:
    """The preview method the server uses, as given: taesd and auto pick a tiny decoder per checkpoint where one is
    in models/vae_approx/ (Environment.preview_decoder); taesd without one falls back to latent2rgb with a warning
    line, as ComfyUI does when the decoder files are missing, auto silently."""
    return getattr(args, "preview_method", "auto")


def browser_url(host: str, port: int) -> str:
    """The canvas' address for a browser on this machine: an every-interface bind is reached through loopback."""
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{shown}]:{port}/" if ":" in shown else f"http://{shown}:{port}/"
