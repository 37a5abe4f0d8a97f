"""Webhooks: `extra_data.webhook` is POSTed the prompt's history entry (`{prompt_id: entry}`) when it ends.

Only hosts named in the configuration may be called (loopback by default), so a submitted prompt cannot
make the server reach into a network the submitter could not reach itself. The URL is checked when the
prompt is submitted (a 400 then) and again before the call.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import urlsplit

import aiohttp

log = logging.getLogger(__name__)

ATTEMPTS = 3
TIMEOUT_S = 10.0


class WebhookRefused(ValueError):
    """A webhook URL that is malformed or names a host that is not allowed."""


def check_webhook_url(url: Any, allowed_hosts: list[str]) -> str:
    """The URL if it is http(s) to an allowed host; raises WebhookRefused naming why not."""
    if not isinstance(url, str) or not url:
        raise WebhookRefused("extra_data.webhook must be a URL string")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookRefused(f"webhook {url!r}: only http:// and https:// URLs with a host are accepted")
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise WebhookRefused(f"webhook {url!r}: malformed port") from None
    allowed = {h.lower().strip("[]") for h in allowed_hosts}
    if "*" not in allowed and parts.hostname.lower() not in allowed:
        raise WebhookRefused(f"webhook host {parts.hostname!r} is not allowed (allowed: "
                             f"{', '.join(sorted(allowed))}; see --webhook-host)")
    return url


class WebhookSender:
    """Delivers webhooks from the event loop, a few attempts each, never blocking anything else."""

    def __init__(self, allowed_hosts: list[str]) -> None:
        self.allowed_hosts = list(allowed_hosts)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task] = set()

    def schedule(self, url: str, body: dict[str, Any]) -> None:
        task = asyncio.get_running_loop().create_task(self._deliver(url, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, url: str, body: dict[str, Any]) -> None:
        try:
            check_webhook_url(url, self.allowed_hosts)
        except WebhookRefused as exc:
            log.warning("webhook not called: %s", exc)
            return
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_S))
        for attempt in range(ATTEMPTS):
            try:
                async with self._session.post(url, json=body, allow_redirects=False) as response:
                    if response.status < 500:
                        if response.status >= 400:
                            log.warning("webhook %s answered %d", url, response.status)
                        return
            except (TimeoutError, aiohttp.ClientError) as exc:
                log.warning("webhook %s: attempt %d failed (%s)", url, attempt + 1, exc)
            await asyncio.sleep(0.5 * 2 ** attempt)
        log.warning("webhook %s: giving up after %d attempts", url, ATTEMPTS)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._session is not None:
            await self._session.close()
