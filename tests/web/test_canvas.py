"""The web canvas in headless Chromium against a real server on a tiny random checkpoint: building the default
graph from the palette by dragging connections, queueing and seeing the image, refused connections, server errors
on their node, saved workflows, dropped PNGs and API JSON, cancelling, and a server with an auth token.
Each test leaves a screenshot in test-artifacts/web/."""

from __future__ import annotations

import base64
import io
import json
import os
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.web.browser import (
    ARTIFACTS,
    ROOT,
    browser_test_server,
    connect,
    drag,
    finish,
    input_link_origin,
    missing_reason,
    next_frame,
    open_canvas,
    random_sd1_data,
)

REASON = missing_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"browser tests need the canvas' tools: {REASON}")
TOKEN = "canvas-test-token"
CHECKPOINT = "latentloom-shapes.safetensors"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return random_sd1_data(tmp_path_factory.mktemp("canvas") / "data", CHECKPOINT)


@pytest.fixture(scope="module")
def server(data_dir):
    # latent2rgb previews: the cancel test samples 256x256, whose tiny-decoder previews (256x256 JPEGs, one a step)
    # would keep a loaded machine's browser busy; the linear map's are 32x32
    process = browser_test_server(data_dir, "--preview-method", "latent2rgb")
    yield process
    process.stop()


@pytest.fixture
def page(browser, server, request):
    """A fresh browser context (empty session and local storage) on the canvas; a screenshot when done."""
    context, page, errors = open_canvas(browser, server.url)
    yield page
    finish(context, page, ARTIFACTS / f"{request.node.name}.png")
    assert not errors, errors


def node_ids(page) -> dict[str, list[int]]:
    ids: dict[str, list[int]] = {}
    for node_id, node_type in page.evaluate("loom.graph._nodes.map(n => [n.id, n.type])"):
        ids.setdefault(node_type, []).append(node_id)
    return ids


def wait_idle(server, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, queue = server.json("GET", "/queue")
        if not queue["queue_running"] and not queue["queue_pending"]:
            return
        time.sleep(0.2)
    raise AssertionError("the server's queue did not empty")


def test_opens_with_the_default_workflow(page):
    ids = node_ids(page)
    assert set(ids) == {"CheckpointLoaderSimple", "EmptyLatentImage", "CLIPTextEncode", "KSampler", "VAEDecode",
                        "SaveImage"}
    shipped = json.loads((ROOT / "workflows" / "txt2img.json").read_text())
    assert page.evaluate("loom.graph.links.size ?? Object.keys(loom.graph.links).length") == len(shipped["links"])
    assert page.evaluate("loom.apiPrompt()['6'].inputs.text") == "a large red circle on a white background"


def test_build_default_graph_from_palette_queue_and_see_image(page, server):
    page.click("#new")
    assert page.evaluate("loom.graph._nodes.length") == 0
    search = page.locator(".palette-search")
    for query, node_type in [("checkpoint", "CheckpointLoaderSimple"), ("empty latent", "EmptyLatentImage"),
                             ("clip text", "CLIPTextEncode"), ("clip text", "CLIPTextEncode"),
                             ("ksampler", "KSampler"), ("vae decode", "VAEDecode"), ("save image", "SaveImage")]:
        search.fill(query)
        page.click(f'.palette-item[data-type="{node_type}"]')
    ids = node_ids(page)
    ckpt, latent, sampler = ids["CheckpointLoaderSimple"][0], ids["EmptyLatentImage"][0], ids["KSampler"][0]
    positive, negative = ids["CLIPTextEncode"]
    decode, save = ids["VAEDecode"][0], ids["SaveImage"][0]
    for origin, origin_slot, target, target_slot in [(ckpt, 1, positive, 0), (ckpt, 1, negative, 0),
                                                     (ckpt, 0, sampler, 0), (positive, 0, sampler, 1),
                                                     (negative, 0, sampler, 2), (latent, 0, sampler, 3),
                                                     (sampler, 0, decode, 0), (ckpt, 2, decode, 1),
                                                     (decode, 0, save, 0)]:
        connect(page, origin, origin_slot, target, target_slot)
        assert input_link_origin(page, target, target_slot) == [origin, origin_slot]
    # the prompt is typed into the multiline widget's editor
    widget_y = page.evaluate(f"loom.graph.getNodeById({positive}).widgets[0].last_y")
    x, y = page.evaluate(f"loom.slotPosition({positive}, true, 0)")
    next_frame(page)
    page.mouse.click(x + 60, y + widget_y + 10)
    page.locator("#text-editor").fill("a red circle")
    page.locator(".palette-search").focus()
    for name, value in [("width", 64), ("height", 64)]:
        page.evaluate(f"loom.setWidget({latent}, '{name}', {value})")
    page.evaluate(f"loom.setWidget({sampler}, 'steps', 3)")
    page.evaluate(f"loom.setWidget({sampler}, 'seed', 7)")
    api = page.evaluate("loom.apiPrompt()")
    assert api[str(positive)]["inputs"] == {"text": "a red circle", "clip": [str(ckpt), 1]}
    assert api[str(sampler)]["inputs"]["latent_image"] == [str(latent), 0]

    page.evaluate("window.previewFrames = 0; loom.api.addEventListener('b_preview', () => window.previewFrames++)")
    page.click("#queue-button")
    thumb = page.locator(".history-entry.status-success img.thumb").first
    thumb.wait_for(timeout=90_000)
    page.wait_for_function(f"loom.nodeImages['{save}']?.[0]?.naturalWidth === 64", timeout=20_000)
    assert page.evaluate("document.querySelector('.history-entry img.thumb').naturalWidth") == 64
    assert page.evaluate("document.getElementById('overall-progress').value") == 1
    assert page.evaluate("window.previewFrames") > 0  # live previews came (and went with the run's end)
    # seed control after generate: the new node's control is "randomize", so the seed moved on after queueing
    assert page.evaluate(f"loom.graph.getNodeById({sampler}).widgets.find(w => w.name === 'seed').value") != 7
    _, history = server.json("GET", "/history")
    (entry,) = [e for e in history.values() if e["prompt"][2].get(str(positive), {}).get("inputs", {}).get("text")
                == "a red circle"]
    assert entry["status"]["status_str"] == "success"
    page.evaluate("loom.fitView()")
    page.wait_for_timeout(200)
    if os.environ.get("LATENTLOOM_README_SCREENSHOT"):  # refresh the README's picture only when asked
        page.screenshot(path=str(ROOT / "docs" / "canvas.png"))


def select_by_click(page, node: int, attempts: int = 3) -> None:
    """Click a node's title until the canvas has it selected (a click that lands while the canvas is still
    settling a previous pointer gesture can be swallowed on a loaded machine)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    selected = f"[...loom.canvas.selectedItems].some(i => i.id === {node})"
    for _ in range(attempts):
        next_frame(page)
        page.mouse.click(*page.evaluate(f"loom.titlePosition({node})"))
        try:
            page.wait_for_function(selected, timeout=3_000)
            return
        except PlaywrightTimeout:
            page.wait_for_timeout(300)
    raise AssertionError(f"node {node} could not be selected by clicking its title")


def link_is(node: int, slot: int, origin: list[int]) -> str:
    return (f"(() => {{ const i = loom.graph.getNodeById({node})?.inputs[{slot}]; const l = i?.link == null ? null "
            f": loom.graph.links.get(i.link); return !!l && l.origin_id === {origin[0]} && "
            f"l.origin_slot === {origin[1]}; }})()")


def test_incompatible_connection_refused_and_undo_redo(page):
    assert input_link_origin(page, 8, 1) == [4, 2]
    connect(page, 4, 1, 8, 1)  # CLIP output onto VAEDecode's vae input
    assert input_link_origin(page, 8, 1) == [4, 2]
    connect(page, 7, 0, 3, 1)  # a compatible one replaces the positive conditioning
    page.wait_for_function(link_is(3, 1, [7, 0]), timeout=20_000)
    page.click("#undo")
    page.wait_for_function(link_is(3, 1, [6, 0]), timeout=20_000)
    page.click("#redo")
    page.wait_for_function(link_is(3, 1, [7, 0]), timeout=20_000)
    # delete a node with the keyboard, then undo it
    select_by_click(page, 8)
    page.focus("#graph")
    page.keyboard.press("Delete")
    page.wait_for_function("loom.graph.getNodeById(8) == null", timeout=20_000)
    page.keyboard.press("Control+z")
    page.wait_for_function(link_is(8, 1, [4, 2]), timeout=20_000)
    # copy and paste a node; move one by its title
    count = page.evaluate("loom.graph._nodes.length")
    select_by_click(page, 7)
    page.focus("#graph")
    page.keyboard.press("Control+c")
    page.mouse.move(*page.evaluate("loom.titlePosition(5)"))
    page.keyboard.press("Control+v")
    page.wait_for_function(f"loom.graph._nodes.length === {count + 1}", timeout=20_000)
    before = page.evaluate("loom.graph.getNodeById(9).pos[1]")
    start = page.evaluate("loom.titlePosition(9)")
    drag(page, start, [start[0] + 40, start[1] + 120])
    page.wait_for_function(f"loom.graph.getNodeById(9).pos[1] > {before + 50}", timeout=20_000)


def test_bad_value_shows_the_servers_error_on_its_node(page):
    page.evaluate("loom.setWidget(4, 'ckpt_name', 'missing-model.safetensors')")
    page.click("#queue-button")
    error = page.locator('#errors .error-node[data-node="4"][data-input="ckpt_name"]')
    error.wait_for(timeout=20_000)
    assert "missing-model.safetensors" in error.inner_text()
    assert page.evaluate("loom.errors['4'][0].input") == "ckpt_name"
    assert "missing-model.safetensors" in page.evaluate("loom.errors['4'][0].message")


def test_save_to_server_folder_and_reopen(page, data_dir):
    page.evaluate("loom.setWidget(6, 'text', 'saved text')")
    page.click('[data-panel-tab="workflows"]')
    page.once("dialog", lambda dialog: dialog.accept("mine"))
    page.click('[data-panel="workflows"] .save-as')
    page.locator('.workflow-list li[data-name="mine.json"]').wait_for(timeout=10_000)
    saved = json.loads((data_dir / "workflows" / "mine.json").read_text())
    assert next(n for n in saved["nodes"] if n["id"] == 6)["widgets_values"] == ["saved text"]
    page.click("#load-default")
    page.wait_for_function("loom.apiPrompt()['6'].inputs.text !== 'saved text'", timeout=10_000)
    page.click('.workflow-list li[data-name="mine.json"] .open')
    page.wait_for_function("loom.apiPrompt()['6'].inputs.text === 'saved text'", timeout=10_000)
    assert page.inner_text("#workflow-name") == "mine.json"


def drop_file(page, name: str, mime: str, data: bytes, at: list[float] | int, workflow: dict | None = None) -> None:
    """Drop a file on the canvas at page coordinates `at`, or 40 px below the title of node `at`. With `workflow`,
    that workflow is opened in the same task, just before the drop: no frame has been drawn in between."""
    page.evaluate("""([name, mime, b64, at, workflow]) => {
        if (workflow) loom.loadWorkflow(workflow);
        const [x, y] = Array.isArray(at) ? at : loom.titlePosition(at).map((v, i) => v + 40 * i);
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, { type: mime }));
        const area = document.getElementById('canvas-area');
        area.dispatchEvent(new DragEvent('drop', { dataTransfer: transfer, clientX: x, clientY: y, bubbles: true,
                                                   cancelable: true }));
    }""", [name, mime, base64.b64encode(data).decode(), at, workflow])


def test_drop_png_and_api_json_restore_their_workflow(page, server):
    workflow = json.loads((ROOT / "workflows" / "txt2img.json").read_text())
    next(n for n in workflow["nodes"] if n["id"] == 6)["widgets_values"] = ["from the png"]
    next(n for n in workflow["nodes"] if n["id"] == 3)["widgets_values"][2] = 1
    prompt = page.evaluate("(w) => window.loom && import('/js/convert.js').then(m => m.uiToApi(w, loom.objectInfo))",
                           workflow)
    status, body = server.json("POST", "/prompt", {"prompt": prompt, "extra_data": {"extra_pnginfo":
                                                                                    {"workflow": workflow}}})
    assert status == 200, body
    wait_idle(server)
    _, history = server.json("GET", f"/history/{body['prompt_id']}")
    image = history[body["prompt_id"]]["outputs"]["9"]["images"][0]
    png = (server.data_dir / "output" / image["subfolder"] / image["filename"]).read_bytes()
    box = page.locator("#canvas-area").bounding_box()
    empty_spot = [box["x"] + box["width"] - 30, box["y"] + box["height"] - 150]
    drop_file(page, image["filename"], "image/png", png, empty_spot)
    page.wait_for_function("loom.apiPrompt()['6']?.inputs.text === 'from the png'", timeout=10_000)
    # API format: laid out on the canvas, links and values restored
    api = dict(prompt)
    api["6"] = {**api["6"], "inputs": {**api["6"]["inputs"], "text": "from api json"}}
    drop_file(page, "api.json", "application/json", json.dumps(api).encode(), empty_spot)
    page.wait_for_function("loom.apiPrompt()['6']?.inputs.text === 'from api json'", timeout=10_000)
    assert page.evaluate("loom.apiPrompt()") == api | {"6": {**api["6"], "_meta": api["6"]["_meta"]}}


def test_cancel_a_running_prompt(page, server):
    # 256x256 and 400 steps: about 0.2 s a step here, so the run outlasts the clicks below, yet each step sends one
    # progress event and one preview (many fast steps would flood a slow browser; 512x512 takes 1.5 s a step on all
    # cores, and a run the click failed to cancel once starved the rest of a CI run for minutes)
    page.evaluate("loom.setWidget(5, 'width', 256); loom.setWidget(5, 'height', 256); loom.setWidget(3, 'steps', 400)")
    try:
        page.click("#queue-button")
        page.click('[data-panel-tab="queue"]')
        cancel = page.locator(".queue-list li.running .cancel")
        cancel.wait_for(timeout=30_000)  # the server reports it running: cancelling now interrupts it
        cancel.click()
        page.locator(".toast", has_text="interrupted").wait_for(timeout=30_000)
        wait_idle(server)
    finally:  # whatever failed above, the run does not go on under the tests that follow
        server.json("POST", "/queue", {"clear": True})
        server.json("POST", "/interrupt", {})
    _, history = server.json("GET", "/history")
    last = list(history.values())[-1]
    assert last["status"]["status_str"] == "error"
    assert any(kind == "execution_interrupted" for kind, _ in last["status"]["messages"])


def test_server_with_auth_token_asks_once_per_session(browser, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    protected = browser_test_server(data, "--auth-token", TOKEN)
    try:
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        page = context.new_page()
        page.goto(protected.url + "/")
        page.locator("#token-dialog").wait_for(state="visible", timeout=20_000)
        page.fill("#token-input", "wrong")
        page.click("#token-ok")
        page.wait_for_function("document.getElementById('token-reason').textContent.includes('refused')")
        page.fill("#token-input", TOKEN)
        page.click("#token-ok")
        page.wait_for_function("document.body.dataset.ready === 'true'", timeout=30_000)
        assert page.evaluate("Object.keys(loom.objectInfo).length") > 10
        page.reload()  # the token is kept for the session: no second question
        page.wait_for_function("document.body.dataset.ready === 'true'", timeout=30_000)
        assert not page.locator("#token-dialog").is_visible()
        page.wait_for_function("loom.api.socket.readyState === 1", timeout=10_000)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "test_server_with_auth_token.png"))
        context.close()
    finally:
        protected.stop()


def test_widget_to_input_and_back_and_image_dropped_on_load_image(page, data_dir):
    page.evaluate("(() => { const n = loom.graph.getNodeById(3); "
                  "loom.widgetToInput(n, n.widgets.find(w => w.name === 'steps')); })()")
    steps_slot = page.evaluate("loom.graph.getNodeById(3).inputs.findIndex(i => i.name === 'steps')")
    page.locator(".palette-search").fill("PrimitiveInt")
    page.click('.palette-item[data-type="PrimitiveInt"]')
    primitive = node_ids(page)["PrimitiveInt"][0]
    page.evaluate(f"loom.setWidget({primitive}, 'value', 5)")
    connect(page, primitive, 0, 3, steps_slot)
    api = page.evaluate("loom.apiPrompt()")
    assert api["3"]["inputs"]["steps"] == [str(primitive), 0] and api[str(primitive)]["inputs"] == {"value": 5}
    page.evaluate(f"loom.inputToWidget(loom.graph.getNodeById(3), {steps_slot})")
    assert page.evaluate("loom.apiPrompt()['3'].inputs.steps") == 20
    # an image dropped onto a LoadImage node is uploaded and selected
    # an image dropped onto a LoadImage node is uploaded and selected, even before a frame of the freshly opened
    # workflow has been drawn (litegraph's own hit boxes would still be empty then)
    workflow = json.loads((ROOT / "workflows" / "img2img.json").read_text())
    load_image = next(n["id"] for n in workflow["nodes"] if n["type"] == "LoadImage")
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, format="PNG")
    drop_file(page, "dropped.png", "image/png", buffer.getvalue(), load_image, workflow=workflow)
    page.wait_for_function(f"loom.apiPrompt()['{load_image}'].inputs.image === 'dropped.png'", timeout=10_000)
    assert (data_dir / "input" / "dropped.png").read_bytes() == buffer.getvalue()


def test_widgets_of_inputs_without_a_default_start_empty(page):
    """ComfyUI declares no default for prompts and primitives: the canvas starts them at "", 0 and false (within
    the input's range), as convert.js fills a value missing from a saved workflow."""
    values = page.evaluate("""(() => {
        const read = (type) => loom.addNode(type).widgets.map((w) => w.value);
        return {text: read("CLIPTextEncode"), int: read("PrimitiveInt"), string: read("PrimitiveString"),
                boolean: read("PrimitiveBoolean"), float: read("PrimitiveFloat")}; })()""")
    assert values["text"][0] == "" and values["string"][0] == "" and values["boolean"][0] is False
    assert values["int"][0] == 0 and values["float"][0] == 0
    ranged = {"name": "Ranged", "display_name": "Ranged", "category": "test", "output_node": False, "output": [],
              "output_name": [], "output_is_list": [], "description": "",
              "input": {"required": {"count": ["INT", {"min": 3, "max": 9}], "low": ["FLOAT", {"min": -4, "max": -2}]}},
              "input_order": {"required": ["count", "low"]}}
    starts = page.evaluate("""(info) => import('/js/nodes.js').then((m) => {
        m.registerNodes({Ranged: info}, loom);
        return loom.addNode("Ranged").widgets.map((w) => w.value); })""", ranged)
    assert starts == [3, -2]  # 0 brought within each input's range
