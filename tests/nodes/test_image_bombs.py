"""Decompression bombs through frames: LoadImage and LoadImageMask count every frame's pixels, and the frames,
against the limits before decoding (and again while decoding), with errors that name the file."""

from __future__ import annotations

import io
import struct
import threading

import pytest
from PIL import Image

from graph.executor import ExecutionContext
from graph.validation import validate_prompt
from nodes import build_registry, image_io
from nodes.environment import Environment
from nodes.image_io import LoadImage, LoadImageMask
from nodes.image_limits import ImageLimitError, frame_sizes


def gif(canvas: tuple[int, int], frames: list[tuple[int, int, int, int]]) -> bytes:
    """A GIF of the given canvas whose frames are (left, top, width, height) rectangles of one pixel colour."""
    parts = [b"GIF89a" + struct.pack("<HHBBB", *canvas, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"]
    for left, top, width, height in frames:
        # a graphic control extension, then the frame: descriptor and LZW data (clear, pixel 0, end).
        parts.append(b"!\xf9\x04\x00\x00\x00\x00\x00," + struct.pack("<HHHHB", left, top, width, height, 0)
                     + b"\x02\x02\x44\x01\x00")
    return b"".join(parts) + b";"


@pytest.fixture
def env(tmp_path):
    environment = Environment(tmp_path)
    environment.ensure_dirs()
    return environment


@pytest.fixture
def no_decoding(monkeypatch):
    """Fails the test at the first frame LoadImage would turn into an array (and spares the machine's memory)."""
    def refuse(frame):
        raise AssertionError(f"a {frame.size} frame was decoded")
    monkeypatch.setattr(image_io, "_frame_rgb_and_alpha", refuse)


def ctx(env):
    return ExecutionContext("p", "1", env, {}, lambda e, d: None, threading.Event())


def test_the_269_byte_gif_of_ten_canvas_frames_is_refused_before_any_frame_is_decoded(env, no_decoding):
    data = gif((4096, 4096), [(0, 0, 1, 1)] * 10)
    assert len(data) < 300
    (env.input_dir / "bomb.gif").write_bytes(data)
    expected = "image 'bomb.gif' has 10 frames of 4096x4096 = 167.8 M pixels, over the limit of 67108864 pixels"
    with pytest.raises(ImageLimitError, match=expected):
        LoadImage().execute("bomb.gif", ctx(env))
    with pytest.raises(ImageLimitError, match=expected):
        LoadImageMask().execute("bomb.gif", "alpha", ctx(env))
    assert LoadImage.validate_inputs({"image": "bomb.gif"}, env) == f"Invalid image file: {expected} (67.1 M)"


def test_the_refusal_is_a_node_error_of_the_prompt(env):
    (env.input_dir / "bomb.gif").write_bytes(gif((4096, 4096), [(0, 0, 1, 1)] * 200))
    prompt = {"7": {"class_type": "LoadImage", "inputs": {"image": "bomb.gif"}},
              "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}}}
    validation = validate_prompt(prompt, build_registry(env, plugins=False), env)
    assert not validation.ok
    (error,) = validation.node_errors["7"]["errors"]
    assert "'bomb.gif' has 200 frames of 4096x4096 = 3.4 G pixels, over the limit of 67108864" in error["details"]


def test_frame_count_is_capped_whatever_the_pixels(env):
    (env.input_dir / "many.gif").write_bytes(gif((1, 1), [(0, 0, 1, 1)] * 1100))
    with pytest.raises(ImageLimitError, match=r"'many.gif' has more than 1024 frames, over the limit of 1024 frames"):
        LoadImage().execute("many.gif", ctx(env))
    (env.input_dir / "fine.gif").write_bytes(gif((1, 1), [(0, 0, 1, 1)] * 1000))
    image, _ = LoadImage().execute("fine.gif", ctx(env))
    assert image.shape == (1000, 1, 1, 3)


def test_counting_stops_past_the_cap():
    """A million frames are not walked: one past the cap says enough."""
    data = gif((1, 1), [(0, 0, 1, 1)] * 1_000_000)
    with Image.open(io.BytesIO(data)) as image:
        assert len(frame_sizes(image, data, 1024)) == 1025


def test_limits_come_from_the_environment(env):
    env.max_image_pixels, env.max_image_frames = 5000, 8
    (env.input_dir / "six.gif").write_bytes(gif((32, 32), [(0, 0, 1, 1)] * 6))
    with pytest.raises(ImageLimitError, match=r"'six.gif' has 6 frames of 32x32 = 6.1 k pixels, over the limit "
                                              r"of 5000 pixels \(5.0 k\)"):
        LoadImage().execute("six.gif", ctx(env))
    (env.input_dir / "four.gif").write_bytes(gif((32, 32), [(0, 0, 1, 1)] * 4))
    assert LoadImage().execute("four.gif", ctx(env))[0].shape == (4, 32, 32, 3)
    (env.input_dir / "nine.gif").write_bytes(gif((2, 2), [(0, 0, 1, 1)] * 9))
    with pytest.raises(ImageLimitError, match="more than 8 frames"):
        LoadImage().execute("nine.gif", ctx(env))
    Image.new("RGB", (100, 100)).save(env.input_dir / "big.png")
    with pytest.raises(ImageLimitError, match=r"'big.png' is 100x100 = 10.0 k pixels, over the limit of 5000"):
        LoadImageMask().execute("big.png", "red", ctx(env))


def test_a_gif_frame_past_the_canvas_grows_it_for_the_frames_after(env, no_decoding):
    env.max_image_pixels = 50_000
    (env.input_dir / "grows.gif").write_bytes(gif((1, 1), [(0, 0, 1, 1), (299, 299, 1, 1), (0, 0, 1, 1)]))
    with pytest.raises(ImageLimitError, match=r"'grows.gif' has 3 frames, the largest 300x300 = 180.0 k pixels"):
        LoadImage().execute("grows.gif", ctx(env))


def test_apng_frames_count_at_the_canvas_size(env, no_decoding):
    env.max_image_pixels = 10_000
    frames = [Image.new("RGB", (64, 64), (i * 80, 0, 0)) for i in range(3)]
    frames[0].save(env.input_dir / "anim.png", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageLimitError, match=r"'anim.png' has 3 frames of 64x64 = 12.3 k pixels"):
        LoadImage().execute("anim.png", ctx(env))


def test_tiff_pages_count_each_at_its_own_size(env):
    env.max_image_pixels = 10_000
    small, large = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (200, 200))
    small.save(env.input_dir / "pages.tif", save_all=True, append_images=[large])
    with pytest.raises(ImageLimitError, match=r"'pages.tif' has 2 frames, the largest 200x200 = 40.1 k pixels"):
        LoadImage().execute("pages.tif", ctx(env))
    env.max_image_pixels = 50_000
    image, _ = LoadImage().execute("pages.tif", ctx(env))
    assert image.shape == (1, 8, 8, 3)  # the page of another size is skipped


def test_frames_larger_than_their_headers_said_stop_the_decoding(env, monkeypatch):
    """Should the header count ever fall short of what Pillow decodes, the decoding loop applies the budget."""
    monkeypatch.setattr(image_io, "check_frames", lambda *args: None)
    env.max_image_pixels = 20_000
    (env.input_dir / "ten.gif").write_bytes(gif((64, 64), [(0, 0, 1, 1)] * 10))
    with pytest.raises(ImageLimitError, match=r"'ten.gif' decodes to 20.5 k pixels by its frame 5 \(64x64\)"):
        LoadImage().execute("ten.gif", ctx(env))


def test_the_servers_limits_reach_load_image(tmp_path):
    """`--max-image-pixels` and `--max-image-frames` travel in the Environment to LoadImage (as to uploads)."""
    from server.state import ServerConfig, ServerState

    state = ServerState(ServerConfig(data_dir=tmp_path, max_image_pixels=1000, max_image_frames=2, workers=1))
    try:
        env = state.env
        Image.new("RGB", (40, 40)).save(env.input_dir / "big.png")  # 1600 pixels
        (env.input_dir / "three.gif").write_bytes(gif((4, 4), [(0, 0, 1, 1)] * 3))
        assert "over the limit of 1000 pixels" in LoadImage.validate_inputs({"image": "big.png"}, env)
        assert "over the limit of 2 frames" in LoadImage.validate_inputs({"image": "three.gif"}, env)
        with pytest.raises(ImageLimitError, match="over the limit of 1000 pixels"):
            LoadImage().execute("big.png", ctx(env))
        roomy = Environment(tmp_path, max_image_pixels=2000, max_image_frames=3)
        assert LoadImage.validate_inputs({"image": "big.png"}, roomy) is None
        assert LoadImage.validate_inputs({"image": "three.gif"}, roomy) is None
    finally:
        state.submit_pool.shutdown()
        state.writer.close()
        state.store.close()


def test_the_memory_estimate_counts_frames_from_headers_and_stops_past_the_cap(tmp_path, monkeypatch):
    from nodes.estimates import image_file_estimate
    from nodes.image_limits import DEFAULT_MAX_FRAMES

    path = tmp_path / "many.gif"
    path.write_bytes(gif((8, 8), [(0, 0, 1, 1)] * (DEFAULT_MAX_FRAMES + 500)))
    monkeypatch.setattr(Image.Image, "seek", lambda self, frame: pytest.fail("a frame was seeked to"))
    estimate = image_file_estimate(path)
    assert estimate.outputs[0].shape == (DEFAULT_MAX_FRAMES + 1, 8, 8, 3)
