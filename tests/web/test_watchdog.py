"""The browser tests' watchdog: a Playwright call that would wait for ever fails once the limit passes, and the
next browser starts as usual."""

from __future__ import annotations

import contextlib
import time

import pytest

from tests.web.browser import CHROMIUM, LAUNCH_ARGS, Watchdog, finish, missing_reason

REASON = missing_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"browser tests: {REASON}")


def test_a_call_that_never_returns_fails_at_the_limit():
    from playwright.sync_api import Error, sync_playwright

    playwright = sync_playwright().start()
    try:
        page = playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS).new_page()
        started = time.monotonic()
        with pytest.raises(Error), Watchdog("a promise that never settles", 3.0) as watchdog:
            page.evaluate("new Promise(() => {})")  # Playwright gives evaluate no time limit of its own
        assert watchdog.fired and time.monotonic() - started < 60
    finally:
        with contextlib.suppress(Error):  # its driver is gone
            playwright.stop()
    with sync_playwright() as fresh:  # nothing left behind blocks the next module's browser
        browser = fresh.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        assert browser.new_page().evaluate("1 + 1") == 2
        browser.close()


class StuckContext:
    """A context whose close waits on a page that never answers, as Chromium's did when it spun after a run."""

    def __init__(self, page) -> None:
        self.page = page

    def close(self) -> None:
        self.page.evaluate("new Promise(() => {})")


def test_a_teardown_that_never_closes_is_killed_with_a_warning(tmp_path):
    from playwright.sync_api import Error, sync_playwright

    playwright = sync_playwright().start()
    try:
        page = playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS).new_page()
        page.set_content("<p>done</p>")
        with pytest.warns(UserWarning, match="did not close within 3 s"):
            finish(StuckContext(page), page, tmp_path / "shot.png", limit_s=3.0)
        assert (tmp_path / "shot.png").stat().st_size > 0  # the screenshot came before the close
    finally:
        with contextlib.suppress(Error):
            playwright.stop()


def test_work_within_the_limit_is_untouched():
    with Watchdog("quick work", 30.0) as watchdog:
        time.sleep(0.1)
    assert not watchdog.fired
