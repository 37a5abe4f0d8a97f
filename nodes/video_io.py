"""Video files through PyAV: what a file holds (read from its headers), decoding it within the image limits, and
encoding frames (and sound) into MP4 or WebM.

PyAV is an optional extra (`pip install 'latentloom[video]'`): its wheels bundle FFmpeg with the encoders used
here (x264, libvpx-vp9, SVT-AV1, AAC, Opus). It is imported on first use, so the video nodes register without it
and fail with one line that says how to install it.

A video is checked before any frame is decoded, as images are (nodes/image_limits.py): frames × width × height
against --max-image-pixels and the frame count against --max-image-frames, from the container's and the codec's
headers. A tiny file can announce 12000×12000 frames (an MJPEG frame's header is four bytes to edit) and
FFmpeg would allocate each one; a header can claim a hundred million frames. The headers' frame count is then
compared with the packets the file really holds (demuxing reads packets, it decodes nothing), so a file cut short
is refused as truncated rather than half decoded. Decoding counts again, in case a stream lied about its size.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nodes.image_limits import DEFAULT_MAX_FRAMES, DEFAULT_MAX_PIXELS, ImageLimitError, check_clip, human

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'latentloom[video]'"
VIDEO_EXTENSIONS = frozenset({".mp4", ".webm", ".mkv", ".mov", ".m4v", ".avi"})
# The FFmpeg encoders tried for each codec name of the nodes, the first one present wins.
ENCODERS = {"h264": ("libx264", "libopenh264"), "vp9": ("libvpx-vp9",),
            "av1": ("libsvtav1", "libaom-av1", "librav1e")}
AUDIO_ENCODERS = {"mp4": "aac", "webm": "libopus"}
MUXERS = {"mp4": "mp4", "webm": "webm"}


class VideoUnavailableError(RuntimeError):
    """PyAV is not installed."""


def require_av() -> Any:
    """The `av` module, or one clear line saying how to install it."""
    try:
        import av
    except ImportError:
        raise VideoUnavailableError(f"video files need PyAV, which is not installed: {INSTALL_HINT}") from None
    av.logging.set_level(av.logging.ERROR)  # FFmpeg's own warnings would go to stderr; errors reach us as exceptions
    return av


def available_encoders() -> dict[str, list[str]]:
    """{codec name: the FFmpeg encoders for it that this PyAV build has}."""
    av = require_av()
    found: dict[str, list[str]] = {}
    for codec, names in ENCODERS.items():
        for name in names:
            try:
                av.codec.Codec(name, "w")
            except (ValueError, av.error.FFmpegError):
                continue
            found.setdefault(codec, []).append(name)
    return found


def encoder_for(codec: str) -> str:
    """The FFmpeg encoder for `codec` ('h264', 'vp9', 'av1'), or a ValueError naming the codec, the encoders
    looked for, and the codecs this installation can write."""
    available = available_encoders()
    if codec in available:
        return available[codec][0]
    have = ", ".join(sorted(available)) or "none"
    raise ValueError(f"codec {codec!r} cannot be written: this PyAV build has none of its encoders "
                     f"({', '.join(ENCODERS.get(codec, ()))}); codecs available here: {have}")


@dataclass(frozen=True)
class VideoInfo:
    """What a file's headers say: the first video stream's size, frame count and rate, and whether it has sound.
    `frames` is the headers' count (or, where a container keeps none, as WebM, the packets counted)."""

    width: int
    height: int
    frames: int
    fps: Fraction
    codec: str
    container: str
    has_audio: bool


def _open(source: Path | bytes, name: str) -> Any:
    av = require_av()
    try:
        return av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source), "r")
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{name!r} is not a readable video ({_reason(exc)})") from None


def _reason(exc: BaseException) -> str:
    """FFmpeg's message without the file path PyAV appends (paths are never shown)."""
    return str(getattr(exc, "strerror", None) or exc).split(": '")[0]


def probe(source: Path | bytes, name: str, max_frames: int = DEFAULT_MAX_FRAMES,
          check: Callable[[VideoInfo], None] | None = None) -> VideoInfo:
    """The file's VideoInfo from its headers and its packets, decoding nothing. A file with no video stream, or
    whose packets stop before its headers' frame count (cut short), is a ValueError naming it. `check` sees the
    headers' VideoInfo before any packet is read (so a claimed billion frames is refused as such, unread), then the
    counted one. Packets are counted up to one past `max_frames` or the headers' count, whichever is larger: a file
    of endless packets costs no more."""
    av = require_av()
    container = _open(source, name)
    try:
        if not container.streams.video:
            raise ValueError(f"{name!r} holds no video stream")
        stream = container.streams.video[0]
        width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
        if width <= 0 or height <= 0:
            raise ValueError(f"{name!r} is not a readable video (its video stream has no frame size)")
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = Fraction(rate) if rate else Fraction(0)
        header_frames = int(stream.frames or 0)
        codec, kind, has_audio = stream.codec_context.name, container.format.name, bool(container.streams.audio)
        if check is not None and header_frames:
            check(VideoInfo(width, height, header_frames, fps, codec, kind, has_audio))
        bound = max(header_frames, max_frames) + 1
        packets = 0
        try:
            for packet in container.demux(stream):
                if packet.size:
                    packets += 1
                    if packets >= bound:
                        break
        except (av.error.FFmpegError, OSError) as exc:
            raise ValueError(f"{name!r} is damaged or truncated ({_reason(exc)}) after {packets} frames") from None
        if header_frames and packets < header_frames:
            raise ValueError(f"{name!r} is truncated: its headers announce {header_frames} frames, the file holds "
                             f"{packets}")
        info = VideoInfo(width, height, max(header_frames, packets), fps, codec, kind, has_audio)
        if check is not None:
            check(info)
        return info
    finally:
        container.close()


def selected_count(total: int, fps: Fraction, force_rate: float = 0.0, skip_first: int = 0, every_nth: int = 1,
                   cap: int = 0) -> int:
    """How many of a clip's `total` frames a selection keeps (see select_frames), known from its headers."""
    if force_rate and fps:
        total = math.ceil(total * force_rate / float(fps))
    kept = math.ceil(max(0, total - skip_first) / max(1, every_nth))
    return min(kept, cap) if cap else kept


def check_video(source: Path | bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS,
                max_frames: int = DEFAULT_MAX_FRAMES, **selection: Any) -> VideoInfo:
    """probe, then ImageLimitError when the frames a load keeps (all of them, or those of `selection`: the
    keyword arguments of selected_count) hold more pixels or frames than the limits allow."""
    def within_limits(info: VideoInfo) -> None:
        check_clip(name, selected_count(info.frames, info.fps, **selection), info.width, info.height, max_pixels,
                   max_frames)

    return probe(source, name, max_frames, within_limits)


def _frames_with_times(container: Any, stream: Any, name: str) -> Iterator[tuple[np.ndarray, float]]:
    av = require_av()
    fps = float(stream.average_rate or stream.guessed_rate or 0) or 1.0
    try:
        for index, frame in enumerate(container.decode(stream)):
            time = frame.time if frame.time is not None else index / fps
            yield frame.to_ndarray(format="rgb24"), float(time)
    except (av.error.FFmpegError, OSError) as exc:
        raise ValueError(f"{name!r} is damaged or truncated: decoding failed ({_reason(exc)})") from None


def select_frames(frames: Iterator[tuple[np.ndarray, float]], force_rate: float = 0.0, skip_first: int = 0,
                  every_nth: int = 1, cap: int = 0) -> Iterator[np.ndarray]:
    """The frames a load keeps, in this order: resampled to `force_rate` frames a second (each output time shows
    the last frame shown by then, so frames repeat or drop; 0 keeps the file's frames), the first `skip_first`
    left out, then every `every_nth`, at most `cap` (0: no cap). Stops reading once the cap is reached."""
    def resampled() -> Iterator[np.ndarray]:
        if not force_rate:
            yield from (frame for frame, _ in frames)
            return
        step, start, target, previous = 1.0 / force_rate, None, 0, None
        last_gap = step
        for frame, time in frames:
            start = time if start is None else start
            if previous is not None:
                last_gap = time - previous[1]
                while target * step < time - start - 1e-9:
                    yield previous[0]
                    target += 1
            previous = (frame, time)
        if previous is not None:
            while target * step < previous[1] - start + last_gap - 1e-9:
                yield previous[0]
                target += 1

    kept = 0
    for index, frame in enumerate(resampled()):
        if index < skip_first or (index - skip_first) % max(1, every_nth):
            continue
        yield frame
        kept += 1
        if cap and kept >= cap:
            return


def decode_video(path: Path, name: str, max_pixels: int = DEFAULT_MAX_PIXELS, max_frames: int = DEFAULT_MAX_FRAMES,
                 **selection: Any) -> tuple[torch.Tensor, float]:
    """(IMAGE [T, H, W, 3] float32 0..1, fps of the frames returned) of the file's first video stream, checked
    before decoding (check_video) and counted again while decoding. `selection`: see select_frames."""
    info = check_video(path, name, max_pixels, max_frames, **selection)
    container = _open(path, name)
    try:
        stream = container.streams.video[0]
        kept: list[np.ndarray] = []
        pixels = 0
        for frame in select_frames(_frames_with_times(container, stream, name), **selection):
            pixels += frame.shape[0] * frame.shape[1]
            if len(kept) >= max_frames:
                raise ImageLimitError(f"video {name!r} decodes to more than {max_frames} frames, over the limit "
                                      f"of {max_frames} frames", "frames")
            if pixels > max_pixels:
                raise ImageLimitError(f"video {name!r} decodes to {human(pixels)} pixels by its frame "
                                      f"{len(kept) + 1}, over the limit of {max_pixels} pixels "
                                      f"({human(max_pixels)})", "pixels")
            if kept and frame.shape != kept[0].shape:
                raise ValueError(f"video {name!r}: frame {len(kept) + 1} is {frame.shape[1]}x{frame.shape[0]}, "
                                 f"the first was {kept[0].shape[1]}x{kept[0].shape[0]}")
            kept.append(frame)
    finally:
        container.close()
    if not kept:
        raise ValueError(f"video {name!r}: no frames to load (the file has {info.frames}; check the selection)")
    images = torch.from_numpy(np.stack(kept)).to(torch.float32).div_(255)
    fps = selection.get("force_rate") or float(info.fps)
    return images, float(fps)


def decode_audio(path: Path, name: str, seconds: float, start: float = 0.0) -> dict[str, Any] | None:
    """AUDIO {"waveform": [1, channels, samples] float32, "sample_rate"} of the file's first audio stream from
    `start`, at most `seconds` long (the frames' length: a sound track cannot make a clip cost more than its
    frames; what comes before `start` is dropped as it is decoded), else None."""
    av = require_av()
    container = _open(path, name)
    try:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        rate = int(stream.rate or stream.codec_context.sample_rate)
        channels = min(2, int(stream.codec_context.channels or 1))
        resampler = av.AudioResampler(format="fltp", layout="stereo" if channels == 2 else "mono", rate=rate)
        skip, budget = round(start * rate), math.ceil(seconds * rate)
        chunks, samples = [], 0
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunk = out.to_ndarray()
                    dropped = min(skip, chunk.shape[1])
                    skip -= dropped
                    if chunk.shape[1] > dropped:
                        chunks.append(chunk[:, dropped:])
                        samples += chunks[-1].shape[1]
                if samples >= budget:
                    break
        except (av.error.FFmpegError, OSError) as exc:
            raise ValueError(f"{name!r}: its sound could not be decoded ({_reason(exc)})") from None
    finally:
        container.close()
    if not chunks:
        return None
    waveform = torch.from_numpy(np.concatenate(chunks, axis=1)[:, :budget].astype(np.float32))
    return {"waveform": waveform.unsqueeze(0), "sample_rate": rate}


def to_uint8_even(images: torch.Tensor) -> np.ndarray:
    """IMAGE → uint8 RGB frames, an odd width or height padded by repeating the last column or row: the 4:2:0
    chroma subsampling that players expect needs even sizes."""
    frames = (images[..., :3].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frames


def encode_video(path: Path, images: torch.Tensor, fps: float, container: str, codec: str, crf: float | None = None,
                 audio: dict[str, Any] | None = None, metadata: dict[str, str] | None = None) -> None:
    """Write IMAGE frames (and AUDIO, cut to the frames' length) as `container` ('mp4' or 'webm') with `codec`
    ('h264', 'vp9', 'av1'); `crf` None is the encoder's default quality. `metadata` goes into the container's
    tags (MP4 with `use_metadata_tags`, which keeps any key, as ComfyUI's own files do)."""
    av = require_av()
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"a video needs an IMAGE batch [frames, height, width, channels], got "
                         f"{list(images.shape)}")
    encoder = encoder_for(codec)
    if encoder == "libsvtav1":
        os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its configuration to stderr at level 3 (info)
    frames = to_uint8_even(images)
    rate = Fraction(fps).limit_denominator(1001)
    options = {"movflags": "use_metadata_tags"} if container == "mp4" else {}
    stream_options: dict[str, str] = {}
    if crf is not None:
        stream_options["crf"] = str(round(crf))
        if encoder == "libvpx-vp9":
            stream_options["b:v"] = "0"  # constant quality: libvpx uses the crf only without a target bit rate
    out = av.open(str(path), "w", format=MUXERS[container], options=options)
    try:
        for key, value in (metadata or {}).items():
            out.metadata[key] = value
        stream = out.add_stream(encoder, rate=rate, options=stream_options)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        sound = _add_audio(out, container, audio)
        for index, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts, frame.time_base = index, 1 / rate
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
        if sound is not None:
            _write_audio(out, sound, audio, len(frames) / float(rate))
    finally:
        out.close()


def _add_audio(out: Any, container: str, audio: dict[str, Any] | None) -> Any:
    if audio is None:
        return None
    waveform = audio.get("waveform") if isinstance(audio, dict) else None
    if not isinstance(waveform, torch.Tensor) or waveform.ndim != 3 or not audio.get("sample_rate"):
        raise ValueError("audio: expected AUDIO {'waveform': [batch, channels, samples], 'sample_rate': int}")
    encoder = AUDIO_ENCODERS[container]
    stream = out.add_stream(encoder, rate=48000 if encoder == "libopus" else int(audio["sample_rate"]))
    stream.layout = "stereo" if waveform.shape[1] >= 2 else "mono"
    return stream


def _write_audio(out: Any, stream: Any, audio: dict[str, Any], seconds: float) -> None:
    av = require_av()
    rate = int(audio["sample_rate"])
    waveform = audio["waveform"][0, :2, : math.ceil(seconds * rate)].to(torch.float32).cpu().numpy()
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(waveform), format="fltp",
                                       layout="stereo" if waveform.shape[0] == 2 else "mono")
    frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
    out.mux(stream.encode(frame))
    out.mux(stream.encode())


@dataclass
class Video:
    """A VIDEO value: frames in memory (CreateVideo), or a file decoded only when its frames are asked for
    (LoadVideo), with its frame rate and optional sound. The file's limits travel with it, as the node that read
    it had them."""

    fps: float
    frames: torch.Tensor | None = None
    audio: dict[str, Any] | None = None
    path: Path | None = None
    name: str = ""
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_frames: int = DEFAULT_MAX_FRAMES

    def components(self) -> tuple[torch.Tensor, dict[str, Any] | None, float]:
        """(IMAGE, AUDIO or None, fps): the file decoded now when this video is one."""
        if self.frames is not None:
            return self.frames, self.audio, self.fps
        assert self.path is not None
        images, fps = decode_video(self.path, self.name, self.max_pixels, self.max_frames)
        return images, decode_audio(self.path, self.name, images.shape[0] / fps if fps else 0.0), fps

    def cache_nbytes(self) -> int:
        """What the output cache holds for it (graph/cache.py): the frames and sound in memory, not the file."""
        sound = self.audio.get("waveform") if isinstance(self.audio, dict) else None
        return sum(int(t.nbytes) for t in (self.frames, sound) if isinstance(t, torch.Tensor)) + 256

    def __repr__(self) -> str:
        what = f"file {self.name!r}" if self.frames is None else f"{list(self.frames.shape)} frames"
        return f"Video({what}, {self.fps:g} fps{', with audio' if self.audio else ''})"
