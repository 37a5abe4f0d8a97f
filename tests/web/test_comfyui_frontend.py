"""ComfyUI's own front end (the pinned `comfyui-frontend-package`) in headless Chromium against a real
`latentloom serve --front-end comfyui` on a tiny random checkpoint: it loads with no failed request and no console
error, lists our nodes by category, opens its default workflow, runs it with live progress and the image on the
output node and in the job queue, saves a workflow into `DATA_DIR/user/default/workflows/` and opens it after a
reload, keeps a setting across reloads, shows a validation error on its node, restores the workflow of a PNG our
SaveImage wrote, and opens our shipped workflows from its template browser. Each test leaves a screenshot in
test-artifacts/web/.

The front end is GPL-3.0 and never part of this repository: the test extra installs it from PyPI."""

from __future__ import annotations

import base64
import importlib.util
import json
import re
import shutil
import time
from pathlib import Path

import pytest

from server.front_end import PACKAGE, TESTED_VERSION
from tests.web.browser import ARTIFACTS, CHROMIUM, ROOT, browser_test_server, finish, random_sd1_data


def _missing() -> str | None:
    if not CHROMIUM.exists() and not shutil.which("chromium"):
        return "no /usr/bin/chromium (apt-get install -y chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "Python Playwright is not installed (pip install -e '.[test]')"
    if importlib.util.find_spec(PACKAGE) is None:
        return "ComfyUI's front end is not installed (pip install -e '.[test]' or 'latentloom[comfyui]')"
    return None


REASON = _missing()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"ComfyUI front-end tests: {REASON}")
CHECKPOINT = "latentloom-shapes.safetensors"
APP = "window.comfyAPI.app.app"
SOCKET = "window.comfyAPI.api.api.socket"
DEFAULT_GRAPH = ["CheckpointLoaderSimple", "CLIPTextEncode", "CLIPTextEncode", "EmptyLatentImage", "KSampler",
                 "VAEDecode", "SaveImage"]
# A returning user's settings: the front end asks api.comfy.org for ComfyUI's release notes unless
# ShowVersionUpdates is off (the test machine is offline, and a ComfyUI release note is no news for a Latent Loom
# server); a first visit opens the template browser over an empty graph instead of the default workflow.
SETTINGS = {"Comfy.Notification.ShowVersionUpdates": False, "Comfy.TutorialCompleted": True,
            "Comfy.InstalledVersion": TESTED_VERSION}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    data = random_sd1_data(tmp_path_factory.mktemp("comfyui-front-end") / "data", CHECKPOINT)
    (data / "user" / "default").mkdir(parents=True)
    (data / "user" / "default" / "comfy.settings.json").write_text(json.dumps(SETTINGS))
    return data


@pytest.fixture(scope="module")
def server(data_dir):
    process = browser_test_server(data_dir, "--front-end", "comfyui")
    yield process
    process.stop()


class Watched:
    """A page of the front end with every request's status, failed requests and console errors recorded."""

    def __init__(self, page, base: str) -> None:
        self.page, self.base = page, base
        self.requests: list[tuple[str, str, int]] = []
        self.problems: list[str] = []
        self.answered: set = set()  # requests the server answered with a success
        self.expected: tuple[str, ...] = ()  # fragments of the problems a test provokes on purpose
        page.on("response", self._response)
        page.on("requestfailed", self._failed)
        page.on("console", lambda m: m.type == "error" and self.problems.append(
            f"console error: {m.text} ({m.location.get('url')})"))
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))

    def unexpected(self) -> list[str]:
        return [p for p in self.problems if not any(fragment in p for fragment in self.expected)]

    def _response(self, response) -> None:
        self.requests.append((response.request.method, response.url, response.status))
        if response.status >= 400:
            self.problems.append(f"{response.status} {response.request.method} {response.url}")
        else:
            self.answered.add(response.request)

    def _failed(self, request) -> None:
        # Chromium reports a response whose body the page never reads (the front end ignores what POST /settings
        # answers) as aborted once it is dropped, after the server's success; only a request without one fails.
        if request.failure == "net::ERR_ABORTED" and request in self.answered:
            return
        self.problems.append(f"failed {request.method} {request.url}: {request.failure}")

    def open(self) -> None:
        self.page.goto(self.base + "/")
        self.wait_ready()

    def reload(self) -> None:
        self.page.reload()
        self.wait_ready()

    def wait_ready(self) -> None:
        self.page.wait_for_function(f"{APP}?.graph?._nodes?.length > 0 && {SOCKET}?.readyState === 1", timeout=90_000)

    def nodes(self) -> list[dict]:
        return self.page.evaluate(f"""{APP}.graph._nodes.map(n => ({{id: n.id, type: n.type,
            widgets: Object.fromEntries((n.widgets || []).map(w => [w.name, w.value]))}}))""")

    def set_widget(self, node_type: str, name: str, value) -> None:
        self.page.evaluate("""([type, name, value]) => { const app = window.comfyAPI.app.app;
            for (const n of app.graph._nodes) if (n.type === type)
                for (const w of n.widgets || []) if (w.name === name) w.value = value;
            app.graph.setDirtyCanvas(true, true); }""", [node_type, name, value])

    def paths(self) -> set[str]:
        return {re.sub(r"^https?://[^/]+", "", url).split("?")[0] for _, url, _ in self.requests}


@pytest.fixture
def ui(browser, server, request):
    """A fresh browser context on ComfyUI's front end; asserts no failed request and no console error at the end."""
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    watched = Watched(context.new_page(), server.url)
    watched.open()
    yield watched
    finish(context, watched.page, ARTIFACTS / f"comfyui_{request.node.name}.png")
    assert not watched.unexpected(), "\n".join(watched.unexpected())


def wait_idle(server, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, queue = server.json("GET", "/queue")
        if not queue["queue_running"] and not queue["queue_pending"]:
            return
        time.sleep(0.2)
    raise AssertionError("the server's queue did not empty")


def test_first_visit_offers_the_template_browser(browser, server, data_dir):
    """A user the front end has never seen: it opens its template browser over an empty graph (as on ComfyUI), lists
    our shipped workflows there, and records the visit in the settings, with no failed request on the way."""
    settings = data_dir / "user" / "default" / "comfy.settings.json"
    settings.write_text(json.dumps({"Comfy.Notification.ShowVersionUpdates": False}))
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    try:
        fresh = Watched(context.new_page(), server.url)
        fresh.page.goto(server.url + "/")
        fresh.page.locator("[data-testid='template-workflow-txt2img']").wait_for(timeout=90_000)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not json.loads(settings.read_text()).get("Comfy.TutorialCompleted"):
            time.sleep(0.2)
        stored = json.loads(settings.read_text())
        assert stored["Comfy.TutorialCompleted"] is True and stored["Comfy.InstalledVersion"] == TESTED_VERSION
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        fresh.page.screenshot(path=str(ARTIFACTS / "comfyui_test_first_visit_offers_the_template_browser.png"))
        assert not fresh.problems, "\n".join(fresh.problems)
    finally:
        finish(context)
        settings.write_text(json.dumps(SETTINGS))


def test_page_loads_with_no_failed_request_and_no_console_error(ui):
    ui.page.wait_for_timeout(2000)  # what the page asks for after the first draw (model lists, templates, ...)
    assert not ui.problems, "\n".join(ui.problems)
    called = ui.paths()
    for path in ("/api/object_info", "/api/settings", "/api/users", "/api/system_stats", "/api/extensions",
                 "/api/userdata", "/api/global_subgraphs", "/api/userdata/user.css", "/user.css"):
        assert path in called, f"the front end did not ask for {path}"
    assert all(status < 400 for _, _, status in ui.requests)


def test_node_library_lists_our_nodes_by_category(ui, server):
    _, info = server.json("GET", "/object_info")
    ui.page.click(".node-library-tab-button")
    folders = ui.page.locator(".p-tree-node-label.tree-explorer-node-label")
    folders.first.wait_for(timeout=20_000)
    shown = {text.split("\n")[0].strip() for text in folders.all_inner_texts()}
    top = {entry["category"].split("/")[0] for entry in info.values()}
    assert top <= shown, top - shown
    assert "training" in shown  # a category only our nodes have (TrainLoraFromImages)
    ui.page.locator(".p-tree-node-label", has_text=re.compile(r"^\s*training")).first.click()
    entry = ui.page.locator(".p-tree-node-label", has_text=info["TrainLoraFromImages"]["display_name"])
    entry.first.wait_for(timeout=10_000)


def test_default_workflow_opens(ui):
    nodes = ui.nodes()
    assert sorted(n["type"] for n in nodes) == sorted(DEFAULT_GRAPH)
    loader = next(n for n in nodes if n["type"] == "CheckpointLoaderSimple")
    assert loader["widgets"]["ckpt_name"] == CHECKPOINT  # the front end picked our model list's file
    sampler = next(n for n in nodes if n["type"] == "KSampler")
    assert sampler["widgets"]["sampler_name"] == "euler" and sampler["widgets"]["scheduler"] == "normal"


def test_queue_runs_the_default_workflow_with_live_progress(ui, server):
    ui.set_widget("EmptyLatentImage", "width", 64)
    ui.set_widget("EmptyLatentImage", "height", 64)
    ui.set_widget("KSampler", "steps", 4)
    # what the job queue's header says while the prompt runs ("Current node: KSampler 50%")
    ui.page.evaluate("""() => { window.__progress = new Set();
        new MutationObserver(() => { const m = document.body.innerText.match(/Current node:\\s*(\\S+)\\s*(\\d+)%/);
            if (m) window.__progress.add(m[1] + ' ' + m[2]); })
          .observe(document.body, {subtree: true, childList: true, characterData: true}); }""")
    ui.page.locator("button.p-splitbutton-button", has_text="Run").click()
    ui.page.wait_for_function(f"""{APP}.graph._nodes.find(n => n.type === 'SaveImage')?.imgs?.[0]?.naturalWidth
                                  === 64""", timeout=90_000)
    progress = ui.page.evaluate("[...window.__progress]")
    assert any(p.startswith("KSampler") for p in progress), progress
    assert any(p.startswith("KSampler") and int(p.split()[1]) > 0 for p in progress), progress
    src = ui.page.evaluate(f"{APP}.graph._nodes.find(n => n.type === 'SaveImage').imgs[0].src")
    assert "/api/view?filename=ComfyUI_" in src and "type=output" in src
    wait_idle(server)
    _, history = server.json("GET", "/history")
    (entry,) = [e for e in history.values() if e["status"]["status_str"] == "success"]
    saved = next(v for v in entry["outputs"].values() if "images" in v)["images"][0]["filename"]
    assert saved in src
    ui.page.locator("button[aria-label='Expand job queue']").first.click()
    job = ui.page.locator("text=" + saved)
    job.first.wait_for(timeout=20_000)


def test_saved_workflow_lands_in_the_user_folder_and_reopens(ui, data_dir, browser, server):
    ui.set_widget("KSampler", "steps", 7)
    ui.page.locator("canvas#graph-canvas").click(position={"x": 900, "y": 700})
    ui.page.keyboard.press("Control+s")
    name_box = ui.page.locator(".p-dialog input[type=text]").first
    name_box.wait_for(timeout=10_000)
    name_box.fill("loom saved")
    name_box.press("Enter")
    saved = data_dir / "user" / "default" / "workflows" / "loom saved.json"
    deadline = time.monotonic() + 20
    while not saved.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    workflow = json.loads(saved.read_text())
    sampler = next(n for n in workflow["nodes"] if n["type"] == "KSampler")
    assert sampler["widgets_values"][2] == 7  # seed, control, steps, ...
    ui.reload()  # the page reopens its tab from the browser's storage; a new browser has only the server's file
    ui.page.click(".workflows-tab-button")
    ui.page.locator(".p-tree-node-label", has_text="loom saved").first.wait_for(timeout=20_000)
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    try:
        fresh = Watched(context.new_page(), server.url)
        fresh.open()
        assert all(n["widgets"].get("steps") != 7 for n in fresh.nodes())  # it opened with the default workflow
        fresh.page.click(".workflows-tab-button")
        fresh.page.locator(".p-tree-node-label", has_text="loom saved").first.click()
        fresh.page.wait_for_function(f"""{APP}.graph._nodes.find(n => n.type === 'KSampler')
                                         ?.widgets.find(w => w.name === 'steps').value === 7""", timeout=20_000)
        fresh.page.screenshot(path=str(ARTIFACTS / "comfyui_saved_workflow_in_a_new_browser.png"))
        assert not fresh.problems, fresh.problems
    finally:
        finish(context)


def test_setting_changed_in_the_dialog_survives_a_reload(ui, data_dir):
    setting = "Comfy.Validation.Workflows"
    before = ui.page.evaluate(f"{APP}.extensionManager.setting.get('{setting}')")
    ui.page.keyboard.press("Control+Comma")
    ui.page.locator(".p-dialog input").first.fill("validate workflows")
    switch = ui.page.locator(f".p-toggleswitch:has(input[aria-labelledby='{setting}-label'])")
    switch.click()
    stored = data_dir / "user" / "default" / "comfy.settings.json"
    deadline = time.monotonic() + 10
    while json.loads(stored.read_text()).get(setting) != (not before) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert json.loads(stored.read_text())[setting] is (not before)
    assert json.loads(stored.read_text())["Comfy.Notification.ShowVersionUpdates"] is False  # merged, not replaced
    ui.page.keyboard.press("Escape")
    ui.reload()
    assert ui.page.evaluate(f"{APP}.extensionManager.setting.get('{setting}')") is (not before)
    ui.page.keyboard.press("Control+Comma")
    ui.page.locator(".p-dialog input").first.fill("validate workflows")
    box = ui.page.locator(f"input[aria-labelledby='{setting}-label']")
    assert box.get_attribute("aria-checked") == ("true" if not before else "false")
    # back as it was, for the other tests
    ui.page.locator(f".p-toggleswitch:has(input[aria-labelledby='{setting}-label'])").click()
    ui.page.keyboard.press("Escape")


def test_validation_error_is_shown_on_its_node(ui, server):
    ui.set_widget("CheckpointLoaderSimple", "ckpt_name", "missing.safetensors")
    # the refused prompt's 400 and the front end's own log of it are what this test asks for
    ui.expected = ("/api/prompt", "status of 400", "Prompt execution failed")
    with ui.page.expect_response(lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST") as answer:
        ui.page.locator("button.p-splitbutton-button", has_text="Run").click()
    assert answer.value.status == 400
    loader_id = next(n["id"] for n in ui.nodes() if n["type"] == "CheckpointLoaderSimple")
    ui.page.wait_for_function(f"{APP}.graph.getNodeById({loader_id}).has_errors === true", timeout=10_000)
    others = ui.page.evaluate(f"{APP}.graph._nodes.filter(n => n.has_errors).map(n => n.id)")
    assert others == [loader_id]
    message = ui.page.locator("text=/Value not in list/")
    message.first.wait_for(timeout=10_000)


def test_dropping_a_png_from_our_save_image_restores_its_workflow(ui, server, data_dir):
    workflow = json.loads((ROOT / "workflows" / "txt2img.json").read_text())
    text = next(n for n in workflow["nodes"] if n["type"] == "CLIPTextEncode")
    text["widgets_values"] = ["from the png"]
    for node in workflow["nodes"]:
        if node["type"] == "EmptyLatentImage":
            node["widgets_values"][:2] = [64, 64]
        if node["type"] == "KSampler":
            node["widgets_values"][2] = 2
    status, body = server.json("POST", "/prompt", {"prompt": workflow,
                                                   "extra_data": {"extra_pnginfo": {"workflow": workflow}}})
    assert status == 200, body
    wait_idle(server)
    _, entry = server.json("GET", f"/history/{body['prompt_id']}")
    image = next(v for v in entry[body["prompt_id"]]["outputs"].values() if "images" in v)["images"][0]
    png = (data_dir / "output" / image["subfolder"] / image["filename"]).read_bytes()
    assert all(n["widgets"].get("text") != "from the png" for n in ui.nodes())
    ui.page.evaluate("""([name, b64]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, { type: 'image/png' }));
        const canvas = document.getElementById('graph-canvas');
        const box = canvas.getBoundingClientRect();
        canvas.dispatchEvent(new DragEvent('drop', { dataTransfer: transfer, bubbles: true, cancelable: true,
                                                     clientX: box.x + 400, clientY: box.y + 300 }));
    }""", [image["filename"], base64.b64encode(png).decode()])
    ui.page.wait_for_function(f"""{APP}.graph._nodes.some(n => n.type === 'CLIPTextEncode'
                                  && n.widgets[0].value === 'from the png')""", timeout=20_000)
    assert sorted(n["type"] for n in ui.nodes()) == sorted(n["type"] for n in workflow["nodes"])


def test_shipped_workflows_open_from_the_template_browser(ui):
    ui.page.click(".templates-tab-button")
    shipped = sorted(p.stem for p in (ROOT / "workflows").glob("*.json"))
    for name in shipped:
        ui.page.locator(f"[data-testid='template-workflow-{name}']").wait_for(timeout=20_000)
    ui.page.locator("[data-testid='template-workflow-txt2img']").click()
    ui.page.wait_for_function(f"""{APP}.graph._nodes.some(n => n.type === 'CLIPTextEncode'
                                  && n.widgets[0].value === 'a large red circle on a white background')""",
                              timeout=20_000)
    shipped_types = sorted(n["type"] for n in json.loads((ROOT / "workflows" / "txt2img.json").read_text())["nodes"])
    assert sorted(n["type"] for n in ui.nodes()) == shipped_types


def test_a_server_with_a_token_works_after_opening_the_page_with_it(browser, data_dir, tmp_path):
    """ComfyUI's front end sends no Authorization header: opened once as /?token=TOKEN, the session cookie the
    server sets carries every API call and the WebSocket; without it the API stays closed."""
    guarded = browser_test_server(data_dir, "--front-end", "comfyui", "--auth-token", "s3cret")
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    try:
        assert guarded.request("GET", "/api/object_info")[0] == 401
        watched = Watched(context.new_page(), guarded.url)
        watched.page.goto(guarded.url + "/?token=s3cret")
        watched.wait_ready()
        assert "token" not in watched.page.url  # the 303 took it out of the address bar
        watched.page.wait_for_timeout(1000)
        assert not watched.problems, "\n".join(watched.problems)
        assert ("GET", f"{guarded.url}/api/object_info", 200) in watched.requests
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        watched.page.screenshot(path=str(ARTIFACTS / "comfyui_test_a_server_with_a_token.png"))
    finally:
        finish(context)
        guarded.stop()
