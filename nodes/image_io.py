"""Loading and saving images: LoadImage, LoadImageMask, SaveImage, PreviewImage.

SaveImage writes PNGs with the `prompt` and `workflow` text chunks exactly as ComfyUI does, so a saved
image carries the workflow that made it; names come from `filename_prefix` (which may hold subfolders)
plus a counter, and can never leave the output folder. LoadImage's fingerprint is the file's hash, so
replacing the file re-runs the workflow from there.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import string
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, ImageSequence, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from graph.node import Combo, Node, NodeOutput, Output, Socket, String
from graph.types import IMAGE, MASK
from nodes.environment import Environment, UnsafePathError, list_files, message_naming, safe_join
from nodes.image_limits import DEFAULT_MAX_FRAMES, DEFAULT_MAX_PIXELS, ImageLimitError, check_frames, human, limits_of
from nodes.missing_files import InputFiles

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


# LoadImage's options: the input folder's images, then the shipped examples of other names (never a symlink that
# leads out); a missing one is explained in validation's error (nodes/missing_files.py).
list_input_images = InputFiles(IMAGE_EXTENSIONS, "image")


def open_image(path: Path, name: str, max_pixels: int, max_frames: int) -> Image.Image:
    """PIL's open with errors that say which file and why, refusing before any decoding a file whose frames
    together hold more than `max_pixels` pixels, or that has more than `max_frames` frames."""
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise ValueError(f"{path.name}: refused, the image is too large to decode safely ({exc})") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path.name}: not a readable image ({message_naming(exc, path.parent, '')})") from None
    try:
        check_frames(image, path, name, max_pixels, max_frames)
        image.load()
    except ImageLimitError:
        image.close()
        raise
    except Image.DecompressionBombError as exc:
        image.close()
        raise ValueError(f"{path.name}: refused, the image is too large to decode safely ({exc})") from None
    except (OSError, ValueError, SyntaxError, IndexError, struct.error) as exc:
        image.close()
        raise ValueError(f"{path.name}: not a readable image ({message_naming(exc, path.parent, '')})") from None
    return image


def _frame_rgb_and_alpha(frame: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    frame = ImageOps.exif_transpose(frame) or frame
    if frame.mode == "I":
        frame = frame.point(lambda value: value * (1 / 255))
    if frame.mode == "P" and "transparency" in frame.info:
        frame = frame.convert("RGBA")
    alpha = np.asarray(frame.getchannel("A"), dtype=np.float32) / 255 if "A" in frame.getbands() else None
    rgb = np.asarray(frame.convert("RGB"), dtype=np.float32) / 255
    return rgb, alpha


def load_image_file(path: Path, name: str, max_pixels: int = DEFAULT_MAX_PIXELS,
                    max_frames: int = DEFAULT_MAX_FRAMES) -> tuple[torch.Tensor, torch.Tensor]:
    """IMAGE [B, H, W, 3] and MASK [B, H, W] (1 − alpha; 64×64 zeros without alpha). Frames of a
    multi-frame file become the batch; frames of another size than the first are skipped.

    The frames are counted against the limits before decoding (`open_image`), and again while decoding, by
    the sizes Pillow decodes them to: a file whose frames turn out larger than its headers said stops there."""
    image = open_image(path, name, max_pixels, max_frames)
    images, masks = [], []
    size = None
    first = None
    decoded = 0
    for index, frame in enumerate(ImageSequence.Iterator(image)):
        decoded += frame.size[0] * frame.size[1]
        if index >= max_frames:
            raise ImageLimitError(f"image {name!r} has more than {max_frames} frames, over the limit of "
                                  f"{max_frames} frames", "frames")
        if decoded > max_pixels:
            raise ImageLimitError(f"image {name!r} decodes to {human(decoded)} pixels by its frame {index + 1} "
                                  f"({frame.size[0]}x{frame.size[1]}), over the limit of {max_pixels} pixels "
                                  f"({human(max_pixels)})", "pixels")
        if first is None:
            first = frame.size
        elif frame.size != first:  # skipped before it is decoded
            continue
        rgb, alpha = _frame_rgb_and_alpha(frame)
        if size is None:
            size = rgb.shape[:2]
        elif rgb.shape[:2] != size:
            continue
        images.append(torch.from_numpy(rgb.copy()))
        masks.append(torch.from_numpy(1.0 - alpha) if alpha is not None else torch.zeros(64, 64))
    if len({m.shape for m in masks}) > 1:  # some frames had alpha, some not
        masks = [m if m.shape == size else torch.zeros(size) for m in masks]
    return torch.stack(images), torch.stack(masks)


def _input_path(env: Environment, name: str) -> Path:
    """The input folder's file `name`, else the shipped example of that name (Environment.find_input)."""
    return env.find_input(name, IMAGE_EXTENSIONS, "image")


OUTPUT_ANNOTATION = " [output]"


def list_output_images(env: Environment | None) -> list[str]:
    """The output folder's images, subfolders included, named as ComfyUI's front end names them for
    LoadImageOutput: `sub/name.png [output]`."""
    return [name + OUTPUT_ANNOTATION for name in list_files(env.output_dir, IMAGE_EXTENSIONS)] if env else []


def _output_path(env: Environment, name: str) -> Path:
    try:
        path = safe_join(env.output_dir, name.removesuffix(OUTPUT_ANNOTATION))
    except UnsafePathError as exc:
        raise ValueError(f"image {name!r}: {exc}") from None
    if not path.is_file():
        raise ValueError(f"image {name!r} does not exist in the output folder")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def open_input_image(env: Environment, name: str) -> Image.Image:
    """The input folder's image `name`, opened and checked against the environment's limits (not decoded)."""
    return open_image(_input_path(env, name), name, *limits_of(env))


class _InputImageNode(Node):
    """Shared by the nodes that read a file from the input folder: its hash is the fingerprint.

    Validation opens the file's headers, so that a file over the pixel or frame limits (or no image at all) is
    refused with the prompt, naming the node and the file, before anything runs or is decoded."""

    image_path = staticmethod(_input_path)  # (env, name) -> the file; LoadImageOutput reads the output folder

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any], env: Any) -> Any:
        return file_sha256(cls.image_path(env, inputs["image"]))

    @classmethod
    def validate_inputs(cls, inputs: dict[str, Any], env: Any) -> str | None:
        try:
            path = cls.image_path(env, inputs["image"])
            with Image.open(path) as image:
                check_frames(image, path, inputs["image"], *limits_of(env))
        except ImageLimitError as exc:
            return f"Invalid image file: {exc}"
        except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
            return (f"Invalid image file: {inputs['image']!r} is not a readable image "
                    f"({message_naming(exc, env.input_dir, 'input')})")
        except (OSError, ValueError, SyntaxError, IndexError, struct.error) as exc:
            return f"Invalid image file: {message_naming(exc, env.input_dir, 'input')}"
        return None


class LoadImage(_InputImageNode):
    display_name = "Load Image"
    category = "image"
    hidden = ("context",)
    inputs = [Combo("image", list_input_images, extra={"image_upload": True})]
    outputs = [Output(IMAGE), Output(MASK)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        """From the file's header, read without decoding (nodes.estimates)."""
        from nodes.estimates import image_file_estimate  # here, to keep this node's imports as they are

        if context.env is None:
            return None
        try:
            return image_file_estimate(_input_path(context.env, inputs["image"]))
        except ValueError:
            return None

    def execute(self, image, context):
        return load_image_file(_input_path(context.env, image), image, *limits_of(context.env))


class LoadImageOutput(LoadImage):
    """LoadImage over the output folder, so that a workflow can take up what an earlier run saved."""

    display_name = "Load Image (from Outputs)"
    description = "Load an image from the output folder."
    experimental = True
    image_path = staticmethod(_output_path)
    inputs = [Combo("image", list_output_images, extra={
        "image_upload": True, "image_folder": "output",
        # the front end's refresh button re-reads the list from this route (server/routes_files.py)
        "remote": {"control_after_refresh": "first", "refresh_button": True, "route": "/internal/files/output"}})]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        from nodes.estimates import image_file_estimate

        if context.env is None:
            return None
        try:
            return image_file_estimate(_output_path(context.env, inputs["image"]))
        except ValueError:
            return None

    def execute(self, image, context):
        return load_image_file(_output_path(context.env, image), image, *limits_of(context.env))


class LoadImageMask(_InputImageNode):
    display_name = "Load Image (as Mask)"
    category = "mask"
    hidden = ("context",)
    inputs = [Combo("image", list_input_images, extra={"image_upload": True}),
              Combo("channel", ["alpha", "red", "green", "blue"])]
    outputs = [Output(MASK)]

    def execute(self, image, channel, context):
        frame = ImageOps.exif_transpose(open_input_image(context.env, image))
        if channel == "alpha":
            if "A" not in frame.getbands():
                return (torch.zeros(1, 64, 64),)
            alpha = np.asarray(frame.getchannel("A"), dtype=np.float32) / 255
            return (torch.from_numpy(1.0 - alpha).unsqueeze(0),)
        rgb = np.asarray(frame.convert("RGB"), dtype=np.float32) / 255
        return (torch.from_numpy(rgb[..., "rgb".index(channel[0])].copy()).unsqueeze(0),)


def next_counter(folder: Path, name: str, extension: str = "png") -> int:
    """1 + the highest counter among `<name>_<NNNNN>_.<extension>` files in the folder."""
    if not folder.is_dir():
        return 1
    pattern = re.compile(rf"^{re.escape(name)}_(\d{{5,}})_\.{re.escape(extension)}$")
    found = [int(m.group(1)) for p in folder.iterdir() if (m := pattern.match(p.name))]
    return max(found, default=0) + 1


def output_folder(root: Path, filename_prefix: str, kind: str) -> tuple[Path, str, str]:
    """(folder, file name part, subfolder) for a `filename_prefix` that may hold subfolders; the folder is
    created and can never be outside `root`."""
    subfolder, _, name = filename_prefix.replace("\\", "/").rpartition("/")
    if not name:
        raise ValueError(f"filename_prefix {filename_prefix!r} has no file name part")
    try:
        folder = safe_join(root, subfolder) if subfolder else root.resolve()
    except UnsafePathError:
        raise ValueError(f"filename_prefix {filename_prefix!r} would write outside the {kind} folder") from None
    folder.mkdir(parents=True, exist_ok=True)
    return folder, name, subfolder


def save_images(images: torch.Tensor, root: Path, filename_prefix: str, kind: str, metadata: PngInfo | None,
                compress_level: int) -> list[dict[str, str]]:
    """Write each image of the batch as `<prefix>_<counter>_.png` under root; returns ui entries."""
    height, width = int(images.shape[1]), int(images.shape[2])
    prefix = filename_prefix.replace("%width%", str(width)).replace("%height%", str(height))
    folder, name, subfolder = output_folder(root, prefix, kind)
    results = []
    counter = next_counter(folder, name.replace("%batch_num%", "0"))
    for index, image in enumerate(images):
        array = (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        file = f"{name.replace('%batch_num%', str(index))}_{counter:05}_.png"
        Image.fromarray(array).save(folder / file, pnginfo=metadata, compress_level=compress_level)
        results.append({"filename": file, "subfolder": subfolder, "type": kind})
        counter += 1
    return results


def png_metadata(prompt: Any, extra_pnginfo: Any) -> PngInfo:
    """`prompt` and one chunk per extra_pnginfo key (the canvas sends `workflow`), JSON-encoded."""
    info = PngInfo()
    if prompt is not None:
        info.add_text("prompt", json.dumps(prompt))
    if isinstance(extra_pnginfo, dict):
        for key, value in extra_pnginfo.items():
            info.add_text(key, json.dumps(value))
    return info


class SaveImage(Node):
    display_name = "Save Image"
    category = "image"
    output_node = True
    hidden = ("prompt", "extra_pnginfo", "context")
    inputs = [Socket("images", IMAGE, tooltip="The images to save."),
              String("filename_prefix", default="ComfyUI",
                     tooltip="File name prefix; may contain subfolders and %width%, %height%, %batch_num%.")]
    outputs = []

    def execute(self, images, filename_prefix, prompt=None, extra_pnginfo=None, context=None):
        saved = save_images(images, context.env.output_dir, filename_prefix, "output",
                            png_metadata(prompt, extra_pnginfo), compress_level=4)
        return NodeOutput(ui={"images": saved})


class PreviewImage(Node):
    display_name = "Preview Image"
    category = "image"
    output_node = True
    hidden = ("prompt", "extra_pnginfo", "context")
    inputs = [Socket("images", IMAGE)]
    outputs = []

    def execute(self, images, prompt=None, extra_pnginfo=None, context=None):
        suffix = "".join(secrets.choice(string.ascii_lowercase) for _ in range(5))
        saved = save_images(images, context.env.temp_dir, f"LatentLoom_temp_{suffix}", "temp",
                            png_metadata(prompt, extra_pnginfo), compress_level=1)
        return NodeOutput(ui={"images": saved})


class MaskPreview(PreviewImage):
    """A mask shown as a grey image (white = 1), saved to the temp folder like PreviewImage."""

    display_name = ""
    category = "mask"
    inputs = [Socket("mask", MASK)]

    def execute(self, mask, prompt=None, extra_pnginfo=None, context=None):
        mask = mask.unsqueeze(0) if mask.ndim == 2 else mask
        return super().execute(mask.unsqueeze(-1).expand(-1, -1, -1, 3), prompt, extra_pnginfo, context)


class SaveImageWebsocket(Node):
    """Sends each image, as a PNG, to the client that submitted the prompt over its WebSocket, and writes no file:
    a binary frame `[u32 1][u32 2 (PNG)][PNG bytes]` (big-endian; type 4 with metadata for clients that asked for
    it), each with a `progress` event (i of the batch) before it, as ComfyUI's example node sends them through
    its progress bar. It runs every time, even when its input is cached, so every run delivers its images."""

    category = "api/image"
    output_node = True
    hidden = ("context",)
    inputs = [Socket("images", IMAGE)]
    outputs = []

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any], env: Any) -> Any:
        return float("nan")

    def execute(self, images, context):
        total = int(images.shape[0])
        for index, image in enumerate(images):
            array = (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()  # RGB, or RGBA with alpha
            # (format, image, largest side or None for full size): the server encodes it as it encodes previews
            context.progress(index + 1, total, preview=("PNG", Image.fromarray(array), None))
        return NodeOutput()


NODE_CLASSES = [LoadImage, LoadImageOutput, LoadImageMask, SaveImage, PreviewImage, MaskPreview, SaveImageWebsocket]
