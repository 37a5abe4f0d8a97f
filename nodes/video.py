"""Video nodes: CreateVideo, GetVideoComponents, SaveVideo, LoadVideo and SaveWEBM as ComfyUI declares them, and
LoadVideoFrames, ours, for loading part of a clip (a frame rate, a range, a cap) as an IMAGE batch.

A VIDEO is a `nodes.video_io.Video`: frames in memory, or a file that GetVideoComponents (or a save) decodes.
The files go through PyAV (nodes/video_io.py); without it these nodes still register and fail with one line that
says how to install it. LoadVideo refuses, at validation, a file that is no video, is cut short, or would decode
to more pixels or frames than the image limits allow, naming the node's file.

Saved videos carry the workflow as ComfyUI's do: the container's metadata tags `prompt` and one per
extra_pnginfo key (the canvas sends `workflow`), each JSON-encoded; MP4 keeps them as free-form tags
(`movflags=use_metadata_tags`), WebM as Matroska tags (which FFmpeg reads back upper-cased).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from graph.node import Combo, Float, Int, Node, NodeOutput, Output, Socket, String
from graph.types import FLOAT, IMAGE, INT
from nodes.environment import Environment
from nodes.image_io import file_sha256, next_counter, output_folder
from nodes.image_limits import ImageLimitError, limits_of
from nodes.missing_files import InputFiles
from nodes.video_io import (
    VIDEO_EXTENSIONS,
    Video,
    VideoUnavailableError,
    check_video,
    decode_audio,
    decode_video,
    encode_video,
    selected_count,
)

VIDEO = "VIDEO"
AUDIO = "AUDIO"
CATEGORY = "image/video"
_HIDDEN = ("prompt", "extra_pnginfo", "context")

list_input_videos = InputFiles(VIDEO_EXTENSIONS, "video")


def _input_path(env: Environment, name: str) -> Path:
    return env.find_input(name, VIDEO_EXTENSIONS, "video")


def video_metadata(prompt: Any, extra_pnginfo: Any) -> dict[str, str]:
    """The container tags ComfyUI writes: each extra_pnginfo key, then `prompt`, JSON-encoded."""
    tags = {key: json.dumps(value) for key, value in extra_pnginfo.items()} if isinstance(extra_pnginfo, dict) else {}
    if prompt is not None:
        tags["prompt"] = json.dumps(prompt)
    return tags


def _save(context: Any, images: Any, fps: float, filename_prefix: str, container: str, codec: str,
          crf: float | None, audio: Any, prompt: Any, extra_pnginfo: Any) -> NodeOutput:
    """Encode into the output folder as `<prefix>_<counter>_.<container>`; the ui entry ComfyUI's SaveVideo and
    SaveWEBM report (`animated` tells the front end to show it as a moving result)."""
    folder, name, subfolder = output_folder(context.env.output_dir, filename_prefix, "output")
    file = f"{name}_{next_counter(folder, name, container):05}_.{container}"
    encode_video(folder / file, images, fps, container, codec, crf=crf, audio=audio,
                 metadata=video_metadata(prompt, extra_pnginfo))
    return NodeOutput(ui={"images": [{"filename": file, "subfolder": subfolder, "type": "output"}],
                          "animated": [True]})


class _V3SaveNode(Node):
    """ComfyUI declares its video nodes in its newer (V3) schema, which writes hidden inputs as one-element lists."""

    output_node = True
    hidden = _HIDDEN
    outputs = []

    @classmethod
    def info(cls, env: Any = None) -> dict[str, Any]:
        info = super().info(env)
        info["input"]["hidden"] = {name: [kind] for name, kind in info["input"]["hidden"].items()}
        return info


class CreateVideo(Node):
    display_name = "Create Video"
    category = CATEGORY
    description = "A video from images, a frame rate and optional sound."
    inputs = [Socket("images", IMAGE, tooltip="The frames."),
              Float("fps", default=30.0, min=1.0, max=120.0, step=1.0),
              Socket("audio", AUDIO, optional=True, tooltip="Sound to play with the frames.")]
    outputs = [Output(VIDEO)]

    def execute(self, images, fps, audio=None):
        if images.ndim != 4:
            raise ValueError(f"CreateVideo: images must be an IMAGE batch [frames, height, width, channels], got "
                             f"{list(images.shape)}")
        return (Video(fps=float(fps), frames=images, audio=audio),)


class GetVideoComponents(Node):
    display_name = "Get Video Components"
    category = CATEGORY
    description = "The frames, sound and frame rate of a video (a loaded file is decoded here)."
    inputs = [Socket("video", VIDEO, tooltip="The video to take apart.")]
    outputs = [Output(IMAGE, "images"), Output(AUDIO, "audio"), Output(FLOAT, "fps")]

    def execute(self, video):
        return video.components()


class SaveVideo(_V3SaveNode):
    display_name = "Save Video"
    category = CATEGORY
    description = "Saves a video to the output folder as MP4 (H.264), with the workflow in its metadata."
    inputs = [Socket("video", VIDEO, tooltip="The video to save."),
              String("filename_prefix", default="video/ComfyUI",
                     tooltip="File name prefix; may contain subfolders of the output folder."),
              Combo("format", ["auto", "mp4"], default="auto", tooltip="The container; auto is MP4."),
              Combo("codec", ["auto", "h264"], default="auto", tooltip="The video codec; auto is H.264.")]

    def execute(self, video, filename_prefix, format, codec, prompt=None, extra_pnginfo=None, context=None):
        images, audio, fps = video.components()
        return _save(context, images, fps, filename_prefix, "mp4", "h264", None, audio, prompt, extra_pnginfo)


class SaveWEBM(_V3SaveNode):
    display_name = "Save WEBM"
    category = CATEGORY
    description = "Saves images as a WebM video (VP9 or AV1) in the output folder, with the workflow in its tags."
    experimental = True
    inputs = [Socket("images", IMAGE, tooltip="The frames."),
              String("filename_prefix", default="ComfyUI"),
              Combo("codec", ["vp9", "av1"]),
              Float("fps", default=24.0, min=0.01, max=1000.0, step=0.01),
              Float("crf", default=32.0, min=0, max=63.0, step=1,
                    tooltip="Higher crf means lower quality and a smaller file.")]

    def execute(self, images, filename_prefix, codec, fps, crf, prompt=None, extra_pnginfo=None, context=None):
        return _save(context, images, fps, filename_prefix, "webm", codec, crf, None, prompt, extra_pnginfo)


class _InputVideoNode(Node):
    """A node reading a video of the input folder: its hash is the fingerprint, and validation reads its headers,
    so a file that is no video, is cut short or is over the limits fails with the prompt, before anything runs."""

    file_input = "file"

    @classmethod
    def selection(cls, inputs: dict[str, Any]) -> dict[str, Any]:
        return {}

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any], env: Any) -> Any:
        return file_sha256(_input_path(env, inputs[cls.file_input]))

    @classmethod
    def validate_inputs(cls, inputs: dict[str, Any], env: Any) -> str | None:
        name = inputs.get(cls.file_input)
        if not isinstance(name, str):
            return None  # linked: checked when it runs
        try:
            check_video(_input_path(env, name), name, *limits_of(env), **cls.selection(inputs))
        except VideoUnavailableError as exc:
            return str(exc)
        except ImageLimitError as exc:
            return f"Invalid video file: {exc}"
        except ValueError as exc:
            return f"Invalid video file: {exc}"
        return None


class LoadVideo(_InputVideoNode):
    display_name = "Load Video"
    category = CATEGORY
    description = "A video file of the input folder, decoded when its frames are used."
    hidden = ("context",)
    inputs = [Combo("file", list_input_videos, extra={"video_upload": True})]
    outputs = [Output(VIDEO)]

    def execute(self, file, context):
        path = _input_path(context.env, file)
        max_pixels, max_frames = limits_of(context.env)
        info = check_video(path, file, max_pixels, max_frames)
        return (Video(fps=float(info.fps), path=path, name=file, max_pixels=max_pixels, max_frames=max_frames),)


class LoadVideoFrames(_InputVideoNode):
    """Ours (ComfyUI's LoadVideo loads a whole file): part of a clip as frames, for video-to-video."""

    display_name = "Load Video (Frames)"
    category = CATEGORY
    description = ("Frames of a video of the input folder: resampled to a frame rate, the first ones skipped, "
                   "every n-th kept, at most a cap. The limits apply to the frames kept.")
    file_input = "video"
    hidden = ("context",)
    inputs = [Combo("video", list_input_videos, extra={"video_upload": True}),
              Float("force_rate", default=0.0, min=0.0, max=120.0, step=1.0,
                    tooltip="Frames a second to load (frames repeat or drop to match); 0 keeps the file's rate."),
              Int("frame_load_cap", default=0, min=0, max=1 << 20,
                  tooltip="At most this many frames; 0 loads them all."),
              Int("skip_first_frames", default=0, min=0, max=1 << 30, tooltip="Frames to leave out at the start."),
              Int("select_every_nth", default=1, min=1, max=1 << 20, tooltip="Keep every n-th frame.")]
    outputs = [Output(IMAGE, "images"), Output(INT, "frame_count"), Output(FLOAT, "fps"), Output(AUDIO, "audio")]

    @classmethod
    def selection(cls, inputs: dict[str, Any]) -> dict[str, Any]:
        return {"force_rate": float(inputs.get("force_rate") or 0.0), "cap": int(inputs.get("frame_load_cap") or 0),
                "skip_first": int(inputs.get("skip_first_frames") or 0),
                "every_nth": int(inputs.get("select_every_nth") or 1)}

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        """From the file's headers and packets, nothing decoded: the frames kept as float32 IMAGE, plus their
        uint8 copies held while decoding. None when the file cannot be read (validation says why)."""
        from graph.memory_estimate import MemoryEstimate
        from nodes.estimates import describe_image, image_spec

        if context.env is None or not isinstance(inputs.get("video"), str):
            return None
        selection = cls.selection(inputs)
        try:
            info = check_video(_input_path(context.env, inputs["video"]), inputs["video"], *limits_of(context.env),
                               **selection)
        except (ValueError, VideoUnavailableError):
            return None
        frames = selected_count(info.frames, info.fps, **selection)
        out = image_spec(frames, info.height, info.width)
        return MemoryEstimate(outputs=(out, None, None, None), host_bytes=out.nbytes + frames * info.height
                              * info.width * 3, what=describe_image(out))

    def execute(self, video, force_rate, frame_load_cap, skip_first_frames, select_every_nth, context):
        selection = self.selection({"force_rate": force_rate, "frame_load_cap": frame_load_cap,
                                    "skip_first_frames": skip_first_frames, "select_every_nth": select_every_nth})
        path = _input_path(context.env, video)
        images, fps = decode_video(path, video, *limits_of(context.env), **selection)
        fps /= selection["every_nth"]
        start = selection["skip_first"] / (selection["force_rate"] or fps * selection["every_nth"]) if fps else 0.0
        audio = decode_audio(path, video, images.shape[0] / fps, start) if fps else None
        return (images, int(images.shape[0]), float(fps), audio)


NODE_CLASSES = [CreateVideo, GetVideoComponents, SaveVideo, LoadVideo, SaveWEBM, LoadVideoFrames]
