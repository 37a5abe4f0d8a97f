"""Headless Chromium (Debian's /usr/bin/chromium) driven by Playwright, and the page helpers of the canvas tests."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
LITEGRAPH = ROOT / "web" / "node_modules" / "@comfyorg" / "litegraph" / "dist" / "litegraph.es.js"
ARTIFACTS = ROOT / "test-artifacts" / "web"
# Running as root with no network: no sandbox, no GPU, nothing that calls home.
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run"]


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
    page.evaluate("new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))")


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
