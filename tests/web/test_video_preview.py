"""Video results in the canvas, in headless Chromium against a real server: a video uploaded onto LoadVideoFrames
(its `video_upload` widget) shows on the node, a SaveWEBM result plays on its node (its current frame drawn there)
and in the results panel as a <video>. WebM (VP9) because Chromium builds without proprietary codecs play no H.264.
A screenshot is left in test-artifacts/web/."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.web.browser import ARTIFACTS, browser_test_server, missing_reason, next_frame, open_canvas

REASON = missing_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"browser tests need the canvas' tools: {REASON}")
pytest.importorskip("av")


def red_clip(path: Path) -> bytes:
    from nodes.video_io import encode_video

    clip = torch.zeros(6, 48, 64, 3)
    clip[..., 0] = 0.9
    encode_video(path, clip, 6, "webm", "vp9", crf=20)
    return path.read_bytes()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process = browser_test_server(tmp_path_factory.mktemp("video") / "data")
    yield process
    process.stop()


def test_video_upload_and_result_play_on_their_nodes_and_in_results(browser, server, tmp_path):
    data = red_clip(tmp_path / "red.webm")
    prompt = {"1": {"class_type": "LoadVideoFrames", "inputs": {"video": "red.webm", "force_rate": 0.0,
                                                                "frame_load_cap": 0, "skip_first_frames": 0,
                                                                "select_every_nth": 1}},
              "2": {"class_type": "SaveWEBM", "inputs": {"images": ["1", 0], "filename_prefix": "clip",
                                                         "codec": "vp9", "fps": 6.0, "crf": 32.0}}}
    context, page, errors = open_canvas(browser, server.url, 1400, 900)
    page.evaluate("(prompt) => loom.loadApiWorkflow(prompt)", prompt)
    # the upload button of a video_upload combo takes videos, and the upload shows on the node
    node = page.evaluate("loom.graph._nodes.find((n) => n.type === 'LoadVideoFrames').id")
    assert page.evaluate(f"loom.isVideoUpload(loom.graph.getNodeById({node}))")
    page.evaluate("""async ([id, bytes]) => {
        const node = loom.graph.getNodeById(id), file = new File([new Uint8Array(bytes)], 'red.webm',
                                                                 { type: 'video/webm' });
        await loom.uploadTo(node, loom.uploadWidget(node), file); }""", [node, list(data)])
    assert page.evaluate(f"loom.nodeImages[{node}][0].tagName") == "VIDEO"
    page.click("#queue-button")
    page.locator(".history-entry.status-success").first.wait_for(timeout=60_000)
    save = page.evaluate("loom.graph._nodes.find((n) => n.type === 'SaveWEBM').id")
    page.wait_for_function(f"loom.nodeImages[{save}]?.[0]?.tagName === 'VIDEO'", timeout=20_000)
    video = page.evaluate(f"""(() => {{ const v = loom.nodeImages[{save}][0];
        return {{ src: v.src, width: v.width, height: v.height, loop: v.loop, muted: v.muted }}; }})()""")
    assert "filename=clip_00001_.webm" in video["src"] and video["loop"] and video["muted"]
    assert (video["width"], video["height"]) == (64, 48)
    # its frame is drawn under the node: red there on the canvas
    next_frame(page)
    colour = page.evaluate(f"""import('/js/view.js').then((m) => {{
        const node = loom.graph.getNodeById({save}), media = loom.nodeImages[{save}];
        const [r] = m.imageGridRects(media, node.size[0], node.size[1] + 6);
        const [x, y] = loom.canvas.convertOffsetToCanvas([node.pos[0] + r.x + r.width / 2,
                                                          node.pos[1] + r.y + r.height / 2]);
        return Array.from(loom.canvasElement.getContext('2d').getImageData(Math.round(x), Math.round(y), 1, 1)
                          .data.slice(0, 3)); }})""")
    assert colour[0] > 180 and colour[1] < 80 and colour[2] < 80, colour
    page.evaluate("loom.showPanel('results')")
    card = page.locator(".history-entry.status-success").first
    result = card.locator("video.thumb")
    assert result.count() == 1 and "clip_00001_.webm" in result.get_attribute("src")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "video_preview.png"))
    # a new workflow clears the results on the nodes, and their videos stop playing
    page.evaluate(f"window.shown = loom.nodeImages[{save}][0]; loom.clearRunState()")
    assert page.evaluate("window.shown.paused")
    context.close()
    assert not errors, errors
