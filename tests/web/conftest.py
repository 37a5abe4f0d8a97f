"""Fixtures the browser tests share: a headless Chromium per test module (module scope: a Playwright session left
open would put its event loop under the tests that run after these), and a watchdog that turns a stuck browser into
a failed test. Each module says itself when it cannot run."""

from __future__ import annotations

import contextlib

import pytest

from tests.web.browser import CHROMIUM, LAUNCH_ARGS, Watchdog

# Longer than any browser test takes on a loaded 2-core machine with its share of module set-up (a server start, a
# random checkpoint, a queued run: under two minutes), shorter than pytest-timeout's 600 s, whose signal cannot end a
# wait on the Playwright driver (the driver's event loop swallows it: a CI run once hung there for over an hour).
ITEM_LIMIT_S = 300.0


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Every browser test, with the set-up and tear-down of the module fixtures that run with it (the browser's
    start, a module's shared run, the browser's close), under one watchdog: past ITEM_LIMIT_S the Playwright driver
    and its Chromium are killed, and the call that waited on them fails."""
    with Watchdog(item.nodeid, ITEM_LIMIT_S):
        yield


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import Error, sync_playwright

    playwright, chromium = sync_playwright().start(), None
    try:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        yield chromium
    finally:
        # A driver the watchdog killed (browser.finish, pytest_runtest_protocol) has nothing left to close.
        if chromium is not None:
            with contextlib.suppress(Error):
                chromium.close()
        with contextlib.suppress(Error):
            playwright.stop()
