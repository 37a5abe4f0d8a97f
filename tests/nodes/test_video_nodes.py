"""Video files: a synthetic clip (a moving square) through SaveVideo → LoadVideo → GetVideoComponents, WebM (VP9,
AV1), sound, LoadVideoFrames' selection, and hostile files (a 12000×12000 MJPEG header, a hundred million frames
claimed, a file cut short, no video at all) refused from their headers, in the nodes and in uploads."""

from __future__ import annotations

import json
import shutil
import struct
import sys
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from graph.executor import ExecutionContext, Executor
from graph.memory_estimate import EstimateContext
from graph.validation import validate_prompt
from nodes import build_registry, video_io
from nodes.environment import Environment
from nodes.image_limits import ImageLimitError
from nodes.video import CreateVideo, GetVideoComponents, LoadVideo, LoadVideoFrames, SaveVideo, SaveWEBM
from nodes.video_io import VideoUnavailableError, check_video, decode_video, encode_video
from server.file_names import served_type
from server.state import ApiError, ServerConfig
from server.uploads import store_upload

av = pytest.importorskip("av")


@pytest.fixture
def env(tmp_path):
    environment = Environment(tmp_path)
    environment.ensure_dirs()
    return environment


def ctx(env):
    return ExecutionContext("p", "1", env, {}, lambda e, d: None, threading.Event())


def moving_square(frames=16, height=64, width=96) -> torch.Tensor:
    """A red square on a grey ground moving right 4 pixels a frame."""
    clip = torch.full((frames, height, width, 3), 0.5)
    for t in range(frames):
        clip[t, 16:40, 4 * t + 4:4 * t + 28] = torch.tensor([0.9, 0.15, 0.1])
    return clip


def numbered(frames=24, size=32) -> torch.Tensor:
    """Frame i is uniformly grey at i/30: its index can be read back from its mean."""
    return (torch.arange(frames, dtype=torch.float32) / 30).view(-1, 1, 1, 1).expand(-1, size, size, 3).clone()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


def tags(path) -> dict[str, str]:
    with av.open(str(path)) as container:
        return {key.lower(): value for key, value in container.metadata.items()}


def test_moving_square_round_trip_through_save_load_and_components(env):
    clip = moving_square()
    (video,) = CreateVideo().execute(clip, 12.0)
    prompt, workflow = {"1": {"class_type": "CreateVideo"}}, {"nodes": [], "links": []}
    out = SaveVideo().execute(video, "video/ComfyUI", "auto", "auto", prompt, {"workflow": workflow}, ctx(env))
    assert out.ui == {"images": [{"filename": "ComfyUI_00001_.mp4", "subfolder": "video", "type": "output"}],
                      "animated": [True]}
    saved = env.output_dir / "video" / "ComfyUI_00001_.mp4"
    assert json.loads(tags(saved)["prompt"]) == prompt and json.loads(tags(saved)["workflow"]) == workflow
    assert check_video(saved, "x").codec == "h264"

    shutil.copy(saved, env.input_dir / "clip.mp4")
    assert "clip.mp4" in LoadVideo.input("file").resolve_options(env)
    assert LoadVideo.validate_inputs({"file": "clip.mp4"}, env) is None
    (loaded,) = LoadVideo().execute("clip.mp4", ctx(env))
    assert loaded.frames is None  # decoded only when its frames are asked for
    images, audio, fps = GetVideoComponents().execute(loaded)
    assert images.shape == (16, 64, 96, 3) and images.dtype == torch.float32
    assert fps == pytest.approx(12.0) and audio is None
    assert psnr(images, clip) >= 30.0
    # the square moved: its centre of red mass goes right 4 pixels a frame
    redness = (images[..., 0] - images[..., 1] - 0.3).clamp(min=0)
    columns = torch.arange(96, dtype=torch.float32)
    centres = (redness.sum(1) * columns).sum(1) / redness.sum((1, 2))
    assert torch.allclose(centres.diff(), torch.full((15,), 4.0), atol=0.5)

    again = SaveVideo().execute(loaded, "video/ComfyUI", "mp4", "h264", None, None, ctx(env))
    assert again.ui["images"][0]["filename"] == "ComfyUI_00002_.mp4"
    assert served_type("ComfyUI_00002_.mp4") == ("video/mp4", "inline")
    assert served_type("a.webm") == ("video/webm", "inline")


def test_sound_travels_with_the_frames(env):
    rate = 16000
    tone = torch.sin(2 * torch.pi * 440 * torch.arange(2 * rate) / rate) * 0.5  # two seconds
    audio = {"waveform": torch.stack([tone, tone * 0.5]).unsqueeze(0), "sample_rate": rate}
    (video,) = CreateVideo().execute(moving_square(12), 12.0, audio)  # one second of frames
    SaveVideo().execute(video, "sound", "auto", "auto", None, None, ctx(env))
    shutil.copy(env.output_dir / "sound_00001_.mp4", env.input_dir / "sound.mp4")
    (loaded,) = LoadVideo().execute("sound.mp4", ctx(env))
    _, sound, _ = GetVideoComponents().execute(loaded)
    waveform = sound["waveform"]
    assert sound["sample_rate"] == rate and waveform.shape[:2] == (1, 2)
    assert waveform.shape[2] == pytest.approx(rate, rel=0.1)  # cut to the frames' second
    spectrum = torch.fft.rfft(waveform[0, 0]).abs()
    assert float(spectrum.argmax()) * rate / waveform.shape[2] == pytest.approx(440, abs=5)
    left, right = waveform[0].pow(2).mean(1).sqrt()
    assert float(left) == pytest.approx(0.5 / 2 ** 0.5, rel=0.15) and float(right / left) == pytest.approx(0.5, rel=0.1)


@pytest.mark.parametrize("codec", ["vp9", "av1"])
def test_save_webm(env, codec):
    clip = moving_square(8)
    out = SaveWEBM().execute(clip, "anim/webm", codec, 8.0, 32.0, {"1": {}}, {"workflow": {"w": 1}}, ctx(env))
    assert out.ui == {"images": [{"filename": "webm_00001_.webm", "subfolder": "anim", "type": "output"}],
                      "animated": [True]}
    path = env.output_dir / "anim" / "webm_00001_.webm"
    info = check_video(path, "w")
    assert (info.width, info.height, info.frames, float(info.fps)) == (96, 64, 8, 8.0)
    assert json.loads(tags(path)["workflow"]) == {"w": 1}
    images, _ = decode_video(path, "w")
    assert psnr(images, clip) >= 28.0


def test_odd_sizes_are_padded_by_their_edge(env, tmp_path):
    clip = torch.rand(3, 33, 47, 3)
    encode_video(tmp_path / "odd.mp4", clip, 10, "mp4", "h264")
    images, _ = decode_video(tmp_path / "odd.mp4", "odd.mp4")
    assert images.shape == (3, 34, 48, 3)


def test_an_unavailable_codec_is_named_with_those_available(env, monkeypatch):
    monkeypatch.setitem(video_io.ENCODERS, "av1", ("libnoneav1",))
    with pytest.raises(ValueError, match=r"codec 'av1' cannot be written: this PyAV build has none of its encoders "
                                         r"\(libnoneav1\); codecs available here: h264, vp9"):
        SaveWEBM().execute(moving_square(2), "x", "av1", 8.0, 32.0, None, None, ctx(env))


def test_load_video_frames_rate_range_and_cap(env):
    encode_video(env.input_dir / "n.mp4", numbered(), 12, "mp4", "h264", crf=0)
    images, count, fps, audio = LoadVideoFrames().execute("n.mp4", 0.0, 4, 2, 3, ctx(env))
    assert count == 4 and images.shape == (4, 32, 32, 3) and fps == pytest.approx(4.0) and audio is None
    assert torch.allclose(images.mean((1, 2, 3)) * 30, torch.tensor([2.0, 5.0, 8.0, 11.0]), atol=0.3)
    doubled, count, fps, _ = LoadVideoFrames().execute("n.mp4", 24.0, 0, 0, 1, ctx(env))
    assert count == 48 and fps == pytest.approx(24.0)
    assert torch.allclose(doubled.mean((1, 2, 3))[:6] * 30, torch.tensor([0.0, 0.0, 1.0, 1.0, 2.0, 2.0]), atol=0.3)
    halved, count, _, _ = LoadVideoFrames().execute("n.mp4", 6.0, 0, 0, 1, ctx(env))
    assert count == 12
    assert torch.allclose(halved.mean((1, 2, 3))[:4] * 30, torch.tensor([0.0, 2.0, 4.0, 6.0]), atol=0.3)

    estimate = LoadVideoFrames.estimate_memory({"video": "n.mp4", "force_rate": 0.0, "frame_load_cap": 4,
                                                "skip_first_frames": 2, "select_every_nth": 3}, {},
                                               EstimateContext(env=env, device="cpu"))
    assert tuple(estimate.outputs[0].shape) == (4, 32, 32, 3) and estimate.outputs[0].nbytes == images.nbytes
    assert estimate.host_bytes >= images.nbytes

    env.max_image_frames = 5  # the limits count the frames kept
    assert "has 24 frames, over the limit of 5 frames" in LoadVideo.validate_inputs({"file": "n.mp4"}, env)
    inputs = {"video": "n.mp4", "force_rate": 0.0, "frame_load_cap": 5, "skip_first_frames": 0,
              "select_every_nth": 1}
    assert LoadVideoFrames.validate_inputs(inputs, env) is None
    assert "over the limit of 5 frames" in LoadVideoFrames.validate_inputs({**inputs, "frame_load_cap": 6}, env)


# hostile files -----------------------------------------------------------------------------------------------------
def mjpeg_bomb(path, side=12000) -> bytes:
    """An AVI of four 64×48 MJPEG frames whose headers (AVI main and stream headers, each JPEG's frame header)
    then claim side×side: about 8 KB announcing 4 × 144 M pixels, which FFmpeg would allocate frame by frame."""
    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream("mjpeg", rate=12)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuvj420p"
        for _ in range(4):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")))
        container.mux(stream.encode())
    data = bytearray(path.read_bytes()).replace(struct.pack("<II", 64, 48), struct.pack("<II", side, side))
    start = 0
    while (start := data.find(b"\xff\xc0", start)) >= 0:  # SOF0: length, precision, height, width
        struct.pack_into(">HH", data, start + 5, side, side)
        start += 2
    return bytes(data)


def many_frames_claimed(path) -> bytes:
    """A real 8-frame MP4 whose time-to-sample table claims 100 000 000 frames."""
    encode_video(path, moving_square(8), 12, "mp4", "h264")
    data = bytearray(path.read_bytes())
    table = data.find(b"stts")
    struct.pack_into(">I", data, table + 12, 100_000_000)  # version/flags, entry count, then the sample count
    return bytes(data)


def cut_short(path) -> bytes:
    """An MP4 with its index first (faststart), cut after two thirds: the index names frames the file lacks."""
    frames = torch.rand(24, 48, 64, 3)
    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=12)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for frame in video_io.to_uint8_even(frames):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    data = path.read_bytes()
    return data[: len(data) * 2 // 3]


@pytest.fixture
def no_decoding(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a frame was decoded")
    monkeypatch.setattr(video_io, "_frames_with_times", refuse)


def test_bombs_are_refused_from_their_headers(env, tmp_path, no_decoding):
    (env.input_dir / "bomb.avi").write_bytes(mjpeg_bomb(tmp_path / "m.avi"))
    assert (env.input_dir / "bomb.avi").stat().st_size < 10_000
    expected = "video 'bomb.avi' has 4 frames of 12000x12000 = 576.0 M pixels, over the limit of 67108864 pixels"
    assert LoadVideo.validate_inputs({"file": "bomb.avi"}, env) == f"Invalid video file: {expected} (67.1 M)"
    with pytest.raises(ImageLimitError, match=expected):
        LoadVideo().execute("bomb.avi", ctx(env))
    with pytest.raises(ImageLimitError, match=expected):
        LoadVideoFrames().execute("bomb.avi", 0.0, 0, 0, 1, ctx(env))

    (env.input_dir / "many.mp4").write_bytes(many_frames_claimed(tmp_path / "many.mp4"))
    assert LoadVideo.validate_inputs({"file": "many.mp4"}, env) == (
        "Invalid video file: video 'many.mp4' has 100000000 frames, over the limit of 1024 frames")


def test_a_bomb_is_a_node_error_of_the_prompt_before_anything_runs(env, tmp_path, no_decoding):
    (env.input_dir / "bomb.avi").write_bytes(mjpeg_bomb(tmp_path / "m.avi"))
    prompt = {"4": {"class_type": "LoadVideo", "inputs": {"file": "bomb.avi"}},
              "5": {"class_type": "SaveVideo", "inputs": {"video": ["4", 0], "filename_prefix": "video/ComfyUI",
                                                          "format": "auto", "codec": "auto"}}}
    validation = validate_prompt(prompt, build_registry(env, plugins=False), env)
    assert not validation.ok
    (error,) = validation.node_errors["4"]["errors"]
    assert "'bomb.avi' has 4 frames of 12000x12000 = 576.0 M pixels, over the limit of 67108864" in error["details"]


def test_not_a_video_and_truncated_files_are_refused(env, tmp_path):
    (env.input_dir / "text.mp4").write_text("not a video at all\n" * 20)
    assert LoadVideo.validate_inputs({"file": "text.mp4"}, env).startswith(
        "Invalid video file: 'text.mp4' is not a readable video (")
    (env.input_dir / "cut.mp4").write_bytes(cut_short(tmp_path / "cut.mp4"))
    reason = LoadVideo.validate_inputs({"file": "cut.mp4"}, env)
    assert reason.startswith("Invalid video file: 'cut.mp4' is truncated: its headers announce 24 frames, the "
                             "file holds "), reason
    with av.open(str(env.input_dir / "sound.webm"), "w", format="webm") as container:  # sound, no picture
        stream = container.add_stream("libopus", rate=48000)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 960), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 48000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    assert LoadVideo.validate_inputs({"file": "sound.webm"}, env) == (
        "Invalid video file: 'sound.webm' holds no video stream")
    assert "'../x.mp4'" in LoadVideo.validate_inputs({"file": "../x.mp4"}, env)


def test_uploads_check_videos_before_storing_them(env, tmp_path, no_decoding):
    state = SimpleNamespace(env=env, config=ServerConfig(env.data_dir))

    def upload(name, data):
        return store_upload(state, {"image": (name, data)}, mask=False)

    encode_video(tmp_path / "ok.mp4", moving_square(4), 12, "mp4", "h264")
    assert upload("ok.mp4", (tmp_path / "ok.mp4").read_bytes()) == {"name": "ok.mp4", "subfolder": "",
                                                                     "type": "input"}
    assert "ok.mp4" in LoadVideo.input("file").resolve_options(env)
    cases = {"bomb.avi": (mjpeg_bomb(tmp_path / "m.avi"), 413, "576.0 M pixels"),
             "many.mp4": (many_frames_claimed(tmp_path / "many.mp4"), 413, "100000000 frames"),
             "cut.mp4": (cut_short(tmp_path / "cut.mp4"), 400, "is truncated"),
             "junk.webm": (b"\x1a\x45\xdf\xa3" + bytes(500), 400, "not a readable video")}
    for name, (data, status, words) in cases.items():
        with pytest.raises(ApiError) as caught:
            upload(name, data)
        assert caught.value.status == status and words in str(caught.value), (name, caught.value)
        assert not (env.input_dir / name).exists()


def test_without_pyav_the_nodes_register_and_say_how_to_install_it(env, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError
    registry = build_registry(env, plugins=False)
    assert {"SaveVideo", "LoadVideo", "SaveWEBM", "CreateVideo", "GetVideoComponents"} <= set(registry.object_info(env))
    (env.input_dir / "a.mp4").write_bytes(b"x")
    hint = "video files need PyAV, which is not installed: pip install 'latentloom[video]'"
    assert LoadVideo.validate_inputs({"file": "a.mp4"}, env) == hint
    with pytest.raises(VideoUnavailableError, match=r"pip install 'latentloom\[video\]'"):
        SaveWEBM().execute(moving_square(2), "x", "vp9", 8.0, 32.0, None, None, ctx(env))


def test_a_workflow_runs_load_frames_to_save_video(env):
    encode_video(env.input_dir / "n.mp4", numbered(8), 8, "mp4", "h264")
    prompt = {"1": {"class_type": "LoadVideoFrames", "inputs": {"video": "n.mp4", "force_rate": 0.0,
                                                                "frame_load_cap": 0, "skip_first_frames": 0,
                                                                "select_every_nth": 1}},
              "2": {"class_type": "CreateVideo", "inputs": {"images": ["1", 0], "fps": ["1", 2]}},
              "3": {"class_type": "SaveVideo", "inputs": {"video": ["2", 0], "filename_prefix": "video/run",
                                                          "format": "auto", "codec": "auto"}}}
    registry = build_registry(env, plugins=False)
    validation = validate_prompt(prompt, registry, env)
    assert validation.ok, validation.response()
    events = []
    result = Executor(env=env).execute(validation.prompt, "p", lambda e, d: events.append((e, d)))
    assert result.status == "success", result.error
    (executed,) = [data for event, data in events if event == "executed"]
    assert executed["node"] == "3" and executed["output"]["animated"] == [True]
    info = check_video(env.output_dir / "video" / "run_00001_.mp4", "run")
    assert (info.frames, float(info.fps), info.width) == (8, 8.0, 32)


def test_create_video_refuses_what_is_not_an_image_batch(env):
    with pytest.raises(ValueError, match="IMAGE batch"):
        CreateVideo().execute(torch.rand(4, 4, 3), 12.0)


def test_a_saved_ui_workflow_skips_the_upload_buttons_value_of_a_video_combo(env):
    """ComfyUI's front end (and our canvas) put an upload button after a `video_upload` combo, as after an
    `image_upload` one, and save its value ("image") among the widgets' values."""
    from graph.ui_format import ui_to_api

    node = {"id": 1, "type": "LoadVideoFrames", "inputs": [], "outputs": [],
            "widgets_values": ["n.mp4", "image", 6.0, 4, 2, 3]}
    api = ui_to_api({"nodes": [node], "links": []}, build_registry(env, plugins=False), env)
    assert api["1"]["inputs"] == {"video": "n.mp4", "force_rate": 6.0, "frame_load_cap": 4, "skip_first_frames": 2,
                                  "select_every_nth": 3}
    node["widgets_values"] = ["n.mp4", 6.0, 4, 2, 3]  # an API client's or older file: no button value
    assert ui_to_api({"nodes": [node], "links": []}, build_registry(env, plugins=False), env)["1"]["inputs"] == \
        api["1"]["inputs"]


def test_upload_route_and_view_serve_a_video(tmp_path):
    """Through the real routes: the front end's /upload/image takes the video, /view serves it as video/mp4 inline;
    a bomb is a 413 with the limit named."""
    from tests.server.harness import multipart
    from tests.server.inprocess import InProcessServer

    encode_video(tmp_path / "clip.mp4", moving_square(4), 12, "mp4", "h264")
    server = InProcessServer(tmp_path / "data").start()
    try:
        body, content_type = multipart({"image": ("clip.mp4", (tmp_path / "clip.mp4").read_bytes())})
        status, answer = server.json("POST", "/upload/image", raw=body, headers={"Content-Type": content_type})
        assert (status, answer) == (200, {"name": "clip.mp4", "subfolder": "", "type": "input"})
        status, headers, data = server.request("GET", "/view?filename=clip.mp4&type=input")
        assert status == 200 and headers["content-type"] == "video/mp4"
        assert headers["content-disposition"].startswith("inline")
        assert data == (tmp_path / "clip.mp4").read_bytes()
        body, content_type = multipart({"image": ("bomb.avi", mjpeg_bomb(tmp_path / "m.avi"))})
        status, answer = server.json("POST", "/upload/image", raw=body, headers={"Content-Type": content_type})
        assert status == 413 and answer["error"]["type"] == "image_too_large", answer
        assert answer["error"]["extra_info"]["limit"] == "pixels"
    finally:
        server.stop()
