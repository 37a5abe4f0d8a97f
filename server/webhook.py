"""Webhooks: `extra_data.webhook` is POSTed the prompt's history entry (`{prompt_id: entry}`) when it ends.

A submitted prompt must not make the server reach what its submitter could not reach itself, so a URL passes
these rules, each refusal naming the one it broke:

- *scheme*: an http:// or https:// URL with a host and a valid port;
- *allow-list*: the host is one `--webhook-host` names (loopback names when none is given; `*` allows any);
- *resolution*: the name resolves; every address it resolves to is checked below, so a name that resolves to
  loopback is loopback;
- *own port*: no address of this machine (loopback, unspecified, or one of its interfaces) on the server's own
  port: a webhook must not call the server itself;
- *loopback on a public server*: when the server listens on a non-loopback address, loopback targets only if
  `--webhook-host` names their host explicitly (the loopback default and `*` do not).

The URL is checked when the prompt is submitted (a 400 then) and again before the call, whose connection
resolves through a resolver that applies the address rules to the very addresses it connects to (so a name
that changes its answer in between, DNS rebinding, is still refused).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable, Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

log = logging.getLogger(__name__)

ATTEMPTS = 3
TIMEOUT_S = 10.0
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")  # what webhooks may call when --webhook-host is not given

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolve = Callable[[str, int], list[str]]


class WebhookRefused(ValueError):
    """A webhook URL that is malformed or that one of the rules refuses; the message names the rule."""


class WebhookConfig(Protocol):
    """What the rules read from the server's configuration (server.state.ServerConfig has these)."""

    host: str
    port: int
    webhook_hosts: list[str] | None  # None: not configured, loopback names implicitly


def resolve_addresses(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (an IP literal is its own); raises WebhookRefused if none."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise WebhookRefused(f"webhook host {host!r} refused by the resolution rule: it does not resolve "
                             f"({getattr(exc, 'strerror', None) or exc})") from None
    return sorted({str(info[4][0]) for info in infos})


def _address(text: str) -> Address | None:
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_loopback_address(address: Address) -> bool:
    """Loopback, or unspecified (0.0.0.0 and :: reach this machine when connected to)."""
    return address.is_loopback or address.is_unspecified


def _is_local_address(address: Address) -> bool:
    """Whether the address is one of this machine's: only those can be bound."""
    if _is_loopback_address(address):
        return True
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((str(address), 0))
        return True
    except OSError:
        return False


def is_loopback_host(host: str | None, resolve: Resolve = resolve_addresses) -> bool:
    """Whether a bind address or host name means loopback only (a name: every address it resolves to)."""
    name = (host or "").strip("[]").lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    if not name:
        return False  # bound to every interface
    literal = _address(name)
    if literal is not None:
        return literal.is_loopback
    try:
        addresses = [_address(a) for a in resolve(name, 0)]
    except WebhookRefused:
        return False
    return bool(addresses) and all(a is not None and a.is_loopback for a in addresses)


def check_addresses(host: str, port: int, addresses: Sequence[str], explicit_hosts: Sequence[str] | None,
                    server_host: str | None, server_port: int | None) -> None:
    """The *own port* and *loopback on a public server* rules for the addresses `host` resolved to."""
    explicit = {h.lower().strip("[]") for h in explicit_hosts or ()} - {"*"}
    public_server = server_host is not None and not is_loopback_host(server_host)
    for text in addresses:
        address = _address(text)
        if address is None:
            raise WebhookRefused(f"webhook host {host!r} resolved to {text!r}, not an IP address")
        if server_port and port == server_port and _is_local_address(address):
            raise WebhookRefused(f"webhook {host}:{port} refused by the own-port rule: {address} is this machine "
                                 f"and {port} the server's own port (a webhook may not call the server itself)")
        if public_server and _is_loopback_address(address) and host.lower() not in explicit:
            raise WebhookRefused(
                f"webhook host {host!r} refused by the loopback rule: it is loopback ({address}) and the server "
                f"listens on {server_host!r}, not loopback; name it with --webhook-host to allow it")


def _url_parts(url: Any) -> tuple[str, int]:
    if not isinstance(url, str) or not url:
        raise WebhookRefused("extra_data.webhook must be a URL string")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookRefused(f"webhook {url!r}: only http:// and https:// URLs with a host are accepted")
    try:
        port = parts.port
    except ValueError:
        raise WebhookRefused(f"webhook {url!r}: malformed port") from None
    return parts.hostname.lower(), port or (443 if parts.scheme == "https" else 80)


def check_webhook_url(url: Any, allowed_hosts: Sequence[str] | None, server_host: str | None = None,
                      server_port: int | None = None, resolve: Resolve = resolve_addresses) -> str:
    """The URL if every rule passes; raises WebhookRefused naming the rule that did not. `allowed_hosts` None
    means loopback names by default (not named explicitly); `server_host`/`server_port` are where the server
    listens (None skips the rules that need them)."""
    host, port = _url_parts(url)
    allowed = {h.lower().strip("[]") for h in (LOOPBACK_HOSTS if allowed_hosts is None else allowed_hosts)}
    if "*" not in allowed and host not in allowed:
        raise WebhookRefused(f"webhook host {host!r} refused by the allow-list rule (allowed: "
                             f"{', '.join(sorted(allowed))}; see --webhook-host)")
    check_addresses(host, port, resolve(host, port), allowed_hosts, server_host, server_port)
    return url


class _CheckedResolver(AbstractResolver):
    """aiohttp's resolver, refusing the addresses the rules refuse: the check applies to what is connected to."""

    def __init__(self, sender: WebhookSender) -> None:
        self.sender = sender
        self.inner = DefaultResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self.inner.resolve(host, port, family)
        config = self.sender.config
        check_addresses(host, port, [r["host"] for r in results], config.webhook_hosts, config.host, config.port)
        return results

    async def close(self) -> None:
        await self.inner.close()


class WebhookSender:
    """Delivers webhooks from the event loop, a few attempts each, never blocking anything else. The rules
    read `config` when applied, so a port chosen at bind time (`--port 0`) counts once it is known."""

    def __init__(self, config: WebhookConfig) -> None:
        self.config = config
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task] = set()

    def check(self, url: Any) -> str:
        """check_webhook_url with this server's rules (blocking: it resolves the host)."""
        return check_webhook_url(url, self.config.webhook_hosts, self.config.host, self.config.port)

    def schedule(self, url: str, body: dict[str, Any]) -> None:
        task = asyncio.get_running_loop().create_task(self._deliver(url, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, url: str, body: dict[str, Any]) -> None:
        try:
            await asyncio.to_thread(self.check, url)
        except WebhookRefused as exc:
            log.warning("webhook not called: %s", exc)
            return
        if self._session is None:
            connector = aiohttp.TCPConnector(resolver=_CheckedResolver(self))
            self._session = aiohttp.ClientSession(connector=connector,
                                                  timeout=aiohttp.ClientTimeout(total=TIMEOUT_S))
        for attempt in range(ATTEMPTS):
            try:
                async with self._session.post(url, json=body, allow_redirects=False) as response:
                    if response.status < 500:
                        if response.status >= 400:
                            log.warning("webhook %s answered %d", url, response.status)
                        return
            except WebhookRefused as exc:
                log.warning("webhook not called: %s", exc)
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
