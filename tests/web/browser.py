"""Headless Chromium (Debian's /usr/bin/chromium) driven by Playwright, and the page helpers of the canvas tests."""

from __future__ import annotations

import faulthandler
import importlib.util
import os
import shutil
import signal
import sys
import threading
import warnings
from pathlib import Path

from tests.server.harness import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
LITEGRAPH = ROOT / "web" / "node_modules" / "@comfyorg" / "litegraph" / "dist" / "litegraph.es.js"
ARTIFACTS = ROOT / "test-artifacts" / "web"
# Running as root with no network: no sandbox, no GPU, nothing that calls home.
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run"]


def _children() -> dict[int, list[int]]:
    """Every process's children, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # The command name in field 2 may hold spaces; the parent pid is the second field after it.
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _subtree(tree: dict[int, list[int]], pid: int) -> list[int]:
    found, stack = [], [pid]
    while stack:
        found.append(current := stack.pop())
        stack.extend(tree.get(current, []))
    return found


def kill_playwright_drivers() -> list[int]:
    """SIGKILL this process's Playwright drivers and everything under them (Chromium). The Playwright call that
    waits on a driver then fails with "connection closed" instead of waiting for ever. Returns the pids killed."""
    tree = _children()
    killed = []
    for pid in _subtree(tree, os.getpid())[1:]:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"run-driver" in command:
            for victim in _subtree(tree, pid):
                try:
                    os.kill(victim, signal.SIGKILL)
                    killed.append(victim)
                except OSError:
                    pass
    return killed


class Watchdog:
    """A time limit on browser work: past it, every thread's stack goes to stderr and the Playwright driver is
    killed, so a browser or driver that stopped answering fails the test that waits on it (a hang once held up
    CI until its 90-minute limit: pytest-timeout's signal could not end a wait on the driver)."""

    def __init__(self, what: str, limit_s: float) -> None:
        self.what, self.limit_s, self.fired = what, limit_s, False
        self._timer = threading.Timer(limit_s, self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        self.fired = True
        print(f"\nwatchdog: {self.what} took over {self.limit_s:.0f} s; stacks:", file=sys.stderr, flush=True)
        try:
            faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)
        except (AttributeError, ValueError, OSError) as error:  # no real file behind stderr
            print(f"watchdog: no stacks ({error})", file=sys.stderr)
        print(f"watchdog: killed Playwright driver processes {kill_playwright_drivers()}", file=sys.stderr,
              flush=True)

    def __enter__(self) -> Watchdog:
        self._timer.start()
        return self

    def __exit__(self, kind, error, trace) -> None:
        self._timer.cancel()


def finish(context, page=None, screenshot: Path | None = None, limit_s: float = 60.0,
           screenshot_limit_s: float = 30.0) -> None:
    """A test's browser context at tear-down: its screenshot (an artifact, within screenshot_limit_s) and its
    close, within limit_s. Chromium has been seen spinning at full CPU after a run, answering neither (a CI run hung
    there); the test's checks have run by then, so a context that does not finish is killed with its driver and the
    tear-down goes on with a warning. A later test of the module that needs the browser fails on its own. The
    screenshot has its own limit: a first screenshot on a busy 2-core machine has taken over 1.5 s."""
    from playwright.sync_api import Error

    if page is not None and screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        try:
            page.screenshot(path=str(screenshot), timeout=screenshot_limit_s * 1000)
        except Error as error:
            warnings.warn(f"no screenshot {screenshot.name}: {error}", stacklevel=2)
    watchdog = Watchdog("closing a browser context", limit_s)
    try:
        with watchdog:
            context.close()
    except Error as error:
        if not watchdog.fired:
            raise
        warnings.warn(f"a browser context did not close within {limit_s:.0f} s and was killed: {error}", stacklevel=2)


def browser_test_server(data_dir: Path, *args: str) -> ServerProcess:
    """A server for a browser test, its torch on one thread: a sampling run on every core starves Chromium and the
    Playwright driver on a 2-core machine, and a starved driver honours no timeout (a CI run's cancel click once
    waited past its 30 s while a 512x512 run went on for minutes and the next server could not start)."""
    return ServerProcess(data_dir, *args, env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")).start()


def random_sd1_data(data: Path, checkpoint: str) -> Path:
    """A data directory whose models/checkpoints/ holds one random SD1 checkpoint named `checkpoint`."""
    from diffusion.checkpoints.random_checkpoints import write_random_checkpoint

    (data / "models" / "checkpoints").mkdir(parents=True)
    write_random_checkpoint(data / "models" / "checkpoints" / checkpoint, "sd1")
    return data


def missing_reason() -> str | None:
    """Why browser tests cannot run here (None when they can); the test command installs all three."""
    if not CHROMIUM.exists() and not shutil.which("chromium"):
        return "no /usr/bin/chromium (apt-get install -y chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "Python Playwright is not installed (pip install -e '.[test]')"
    if not LITEGRAPH.exists():
        return "web/node_modules is missing (npm ci --prefix web)"
    return None


def next_frame(page) -> None:
    """Wait until the canvas has drawn a frame. litegraph refreshes its nodes' hit boxes only when it draws,
    so a pointer gesture on a node added or moved since the last frame would miss it."""
    page.evaluate("""new Promise((done, fail) => {
        const late = setTimeout(() => fail(new Error("the canvas drew no frame in 20 s")), 20000);
        requestAnimationFrame(() => requestAnimationFrame(() => { clearTimeout(late); done(); })); })""")


def open_canvas(browser, url: str, width: int = 1800, height: int = 1000):
    """A fresh browser context (empty session and local storage) on the canvas at `url`, once the page says it is
    ready and has drawn a frame: (context, page, the page's uncaught errors as they come)."""
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url + "/")
    page.wait_for_function("document.body.dataset.ready === 'true'", timeout=30_000)
    next_frame(page)
    return context, page, errors


def drag(page, start: list[float], end: list[float]) -> None:
    """A mouse drag in small steps, as a person would do it (litegraph tracks pointer moves)."""
    next_frame(page)
    page.mouse.move(*start)
    page.mouse.down()
    for i in range(1, 9):
        page.mouse.move(start[0] + (end[0] - start[0]) * i / 8, start[1] + (end[1] - start[1]) * i / 8)
    page.mouse.up()


def connect(page, origin: int, origin_slot: int, target: int, target_slot: int) -> None:
    """Drag a connection from an output slot to an input slot on the canvas."""
    start = page.evaluate(f"loom.slotPosition({origin}, false, {origin_slot})")
    end = page.evaluate(f"loom.slotPosition({target}, true, {target_slot})")
    drag(page, start, end)


def input_link_origin(page, node: int, slot: int) -> list | None:
    """[origin node, origin slot] of the link into an input, or None."""
    return page.evaluate(f"""(() => {{
        const input = loom.graph.getNodeById({node}).inputs[{slot}];
        const link = input.link == null ? null : loom.graph.links.get ? loom.graph.links.get(input.link)
                                                                      : loom.graph.links[input.link];
        return link ? [link.origin_id, link.origin_slot] : null; }})()""")
