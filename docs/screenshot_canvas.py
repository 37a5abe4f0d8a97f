"""Redraw the README's canvas picture: the canvas after one run of the default workflow on the project's own model.

    python docs/screenshot_canvas.py [--out docs/canvas.png] [--seed 42]

A server on an empty data directory (the repository's models are found as on a fresh clone), headless Chromium
(Debian's /usr/bin/chromium, driven by Playwright, the test tools) at 1800x1000; the default workflow's seed is set,
Queue is clicked once, and the picture is taken when the image is on Save Image and in the results panel. The node
packs' category names hold symbols (AnimateDiff's "🎭🅐🅓"): with Debian's fonts-noto-color-emoji and fonts-symbola
installed they are drawn, without them they are boxes.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.web.browser import CHROMIUM, LAUNCH_ARGS, browser_test_server, open_canvas  # noqa: E402

log = logging.getLogger("docs.screenshot")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "canvas.png")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        server = browser_test_server(Path(tmp) / "data")
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
                _, page, _ = open_canvas(browser, server.url)
                sampler = page.evaluate("loom.graph.findNodesByType('KSampler')[0].id")
                save = page.evaluate("loom.graph.findNodesByType('SaveImage')[0].id")
                page.evaluate(f"loom.setWidget({sampler}, 'seed', {args.seed})")
                page.evaluate(f"loom.setWidget({sampler}, 'control_after_generate', 'fixed')")
                page.click("#queue-button")
                page.locator(".history-entry.status-success img.thumb").first.wait_for(timeout=120_000)
                page.wait_for_function(f"loom.nodeImages['{save}']?.[0]?.naturalWidth > 0", timeout=20_000)
                page.evaluate("loom.fitView()")
                page.wait_for_timeout(500)
                page.screenshot(path=str(args.out))
                browser.close()
        finally:
            server.stop()
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
