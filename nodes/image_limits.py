"""What decoding an image file will cost, known before decoding it: the pixels of every frame, and how many.

A header can announce a small canvas while its frames multiply it: a 269-byte GIF with a 4096×4096 canvas and
ten 1×1 frames decodes every frame to the whole canvas, and LoadImage keeps each as float32 (16 bytes a pixel
with its mask): 4 GB. So the pixel limit applies to the sum over the frames, each counted at the size it will
decode to, and frames are counted from their headers, never by decoding them. Counting stops one frame past
the frame limit, so a file of a million empty frames costs no more to refuse than one just over the limit.

Used by the upload check (server/uploads.py) and by LoadImage/LoadImageMask (nodes/image_io.py), which also
applies the same budget while it decodes, in case a file's frames turn out larger than its headers said.
"""

from __future__ import annotations

import contextlib
import io
import re
import struct
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image

DEFAULT_MAX_PIXELS = 64 << 20  # the server's --max-image-pixels default
DEFAULT_MAX_FRAMES = 1024  # the server's --max-image-frames default
# Formats whose header states the frame count and whose every frame decodes to the full canvas. Seeking in them
# decodes the frames before (they are drawn on one another), so their frames are not counted by seeking.
CANVAS_FORMATS = frozenset({"PNG", "WEBP", "FLI"})
_GIF_BLOCK_START = re.compile(rb"[!,;]")


class ImageLimitError(ValueError):
    """The file would decode to more pixels or frames than allowed. `limit` is "pixels" or "frames"."""

    def __init__(self, message: str, limit: str) -> None:
        super().__init__(message)
        self.limit = limit


def limits_of(env: Any) -> tuple[int, int]:
    """(max pixels, max frames) for the nodes: an environment may carry the server's limits as attributes
    `max_image_pixels` and `max_image_frames`; without them, the server's defaults."""
    return (int(getattr(env, "max_image_pixels", None) or DEFAULT_MAX_PIXELS),
            int(getattr(env, "max_image_frames", None) or DEFAULT_MAX_FRAMES))


def human(count: float) -> str:
    """12345678 → '12.3 M' (decimal prefixes: these are counts, not bytes)."""
    for prefix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {prefix}"
    return f"{count:g}"


def frame_sizes(image: Image.Image, source: bytes | Path, max_frames: int) -> list[tuple[int, int]]:
    """The size each frame will decode to, frame by frame; at most `max_frames + 1` entries (the last one then
    only says that there are too many). `source` is the file `image` was opened from, read again for GIFs."""
    if image.format == "GIF":
        with (io.BytesIO(source) if isinstance(source, bytes) else source.open("rb")) as stream:
            return _gif_frame_sizes(stream, max_frames) or [image.size]
    if image.format in CANVAS_FORMATS:
        return [image.size] * min(getattr(image, "n_frames", 1), max_frames + 1)
    # TIFF pages, MPO, PSD layers, DCX...: seeking reads a frame's header, and each frame has its own size.
    sizes = []
    start = image.tell()
    try:
        for index in range(max_frames + 1):
            try:
                image.seek(index)
            except EOFError:
                break
            sizes.append(image.size)
    finally:
        with contextlib.suppress(EOFError, OSError, ValueError):
            image.seek(start)
    return sizes or [image.size]


def check_frames(image: Image.Image, source: bytes | Path, name: str, max_pixels: int, max_frames: int,
                 first_only: bool = False) -> list[tuple[int, int]]:
    """The frames' sizes, or ImageLimitError naming the file when there are more frames than `max_frames` or
    more pixels in all of them together than `max_pixels`. `first_only`: for a reader that decodes no other."""
    sizes = [image.size] if first_only else frame_sizes(image, source, max_frames)
    if len(sizes) > max_frames:
        raise ImageLimitError(f"image {name!r} has more than {max_frames} frames, over the limit of "
                              f"{max_frames} frames", "frames")
    total = sum(width * height for width, height in sizes)
    if total > max_pixels:
        raise ImageLimitError(f"image {name!r} {describe(sizes)} = {human(total)} pixels, over the limit of "
                              f"{max_pixels} pixels ({human(max_pixels)})", "pixels")
    return sizes


def check_clip(name: str, frames: int, width: int, height: int, max_pixels: int, max_frames: int,
               what: str = "video") -> None:
    """ImageLimitError naming the file when `frames` frames of width×height (a video's, all of one size, counted
    from its container's headers) are more frames than `max_frames` or more pixels than `max_pixels`."""
    if frames > max_frames:
        raise ImageLimitError(f"{what} {name!r} has {frames} frames, over the limit of {max_frames} frames",
                              "frames")
    total = frames * width * height
    if total > max_pixels:
        raise ImageLimitError(f"{what} {name!r} has {frames} frames of {width}x{height} = {human(total)} pixels, "
                              f"over the limit of {max_pixels} pixels ({human(max_pixels)})", "pixels")


def describe(sizes: list[tuple[int, int]]) -> str:
    """'is 100x80', 'has 3 frames of 100x80' or 'has 3 frames, the largest 100x80'."""
    if len(sizes) == 1:
        return f"is {sizes[0][0]}x{sizes[0][1]}"
    largest = max(sizes, key=lambda size: size[0] * size[1])
    same = all(size == largest for size in sizes)
    return f"has {len(sizes)} frames" + (" of " if same else ", the largest ") + f"{largest[0]}x{largest[1]}"


def _gif_frame_sizes(stream: BinaryIO, max_frames: int) -> list[tuple[int, int]]:
    """Each frame's decoded size, read from the block headers as Pillow's GIF reader reads them (so that a file
    cannot show this count fewer frames than Pillow will decode): a frame reaching past the canvas grows the
    canvas for it and every later frame, and bytes that start no block are skipped, as Pillow skips them."""
    def data() -> bytes | None:  # one sub-block, None at a terminator (Pillow's GifImageFile.data)
        length = stream.read(1)
        return stream.read(length[0]) if length and length[0] else None

    header = stream.read(13)
    if len(header) < 13 or header[:3] != b"GIF":
        return []
    width, height = struct.unpack_from("<HH", header, 6)
    if header[10] & 128:
        stream.read(3 << ((header[10] & 7) + 1))  # global palette
    sizes: list[tuple[int, int]] = []
    while len(sizes) <= max_frames:
        if sizes:
            while data():  # the previous frame's image data
                pass
        kind = stream.read(1)
        found = False
        while kind and kind != b";":
            if kind == b"!":
                label = stream.read(1)
                if not label:
                    break
                block = data()
                if label[0] == 254:  # comment: its blocks end at the first terminator
                    while block:
                        block = data()
                    kind = stream.read(1)
                    continue
                if label[0] == 255 and not sizes and block is not None and block.startswith(b"NETSCAPE2.0"):
                    data()
                while data():
                    pass
            elif kind == b",":
                descriptor = stream.read(9)
                if len(descriptor) < 9:
                    break
                left, top, frame_width, frame_height = struct.unpack_from("<HHHH", descriptor)
                width, height = max(width, left + frame_width), max(height, top + frame_height)
                if descriptor[8] & 128:
                    stream.read(3 << ((descriptor[8] & 7) + 1))  # local palette
                stream.read(1)  # LZW minimum code size
                found = True
                break
            else:
                _skip_to_block(stream)
            kind = stream.read(1)
        if not found:
            break
        sizes.append((width, height))
    return sizes


def _skip_to_block(stream: BinaryIO) -> None:
    """Move to the next byte that starts a block ('!', ',' or ';'), or to the end: Pillow skips every other byte
    one at a time, which would make a file of padding slow to walk here byte by byte."""
    while chunk := stream.read(1 << 16):
        match = _GIF_BLOCK_START.search(chunk)
        if match:
            stream.seek(match.start() - len(chunk), io.SEEK_CUR)
            return
