"""The webhook rules: allow-list, resolution, the server's own port, loopback targets of a public server."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from server.webhook import WebhookRefused, WebhookSender, _CheckedResolver, check_webhook_url, is_loopback_host
from tests.server.test_api_flow import sum_prompt

NAMES = {"localhost": ["127.0.0.1", "::1"], "hook.test": ["127.0.0.1"], "mapped.test": ["::ffff:127.0.0.1"],
         "any.test": ["0.0.0.0"], "far.test": ["203.0.113.7"], "split.test": ["203.0.113.7", "127.0.0.1"]}


def fake_resolve(host: str, port: int) -> list[str]:
    """Names of the test resolve as NAMES says, literals to themselves; nothing else resolves."""
    if host in NAMES:
        return NAMES[host]
    if host.replace(".", "").isdigit() or ":" in host:
        return [host]
    raise WebhookRefused(f"webhook host {host!r} refused by the resolution rule: it does not resolve")


def check(url: str, allowed: list[str] | None = None, host: str = "127.0.0.1", port: int = 8188) -> str:
    return check_webhook_url(url, allowed, host, port, resolve=fake_resolve)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8188/prompt", "http://localhost:8188/", "http://[::1]:8188/x",
                                 "http://[::ffff:127.0.0.1]:8188/"])
def test_the_servers_own_port_is_refused(url):
    allowed = ["127.0.0.1", "localhost", "::1", "::ffff:127.0.0.1"]
    with pytest.raises(WebhookRefused, match="own-port rule"):
        check_webhook_url(url, allowed, "127.0.0.1", 8188)  # the real resolver: these resolve offline
    assert check_webhook_url(url.replace("8188", "8189"), allowed, "127.0.0.1", 8188)


@pytest.mark.parametrize("name", ["hook.test", "mapped.test", "any.test"])
def test_a_name_resolving_to_this_machine_on_the_servers_port_is_refused(name):
    with pytest.raises(WebhookRefused, match="own-port rule"):
        check(f"http://{name}:8188/", [name])
    assert check(f"http://{name}:9000/", [name])


def test_own_port_counts_the_default_port_of_the_scheme():
    with pytest.raises(WebhookRefused, match="own-port rule"):
        check("http://hook.test/", ["hook.test"], port=80)
    with pytest.raises(WebhookRefused, match="own-port rule"):
        check("https://hook.test/", ["hook.test"], port=443)


def test_a_far_host_on_the_same_port_number_is_not_the_server():
    assert check("http://far.test:8188/", ["far.test"])


@pytest.mark.parametrize("bind", ["0.0.0.0", "::", "", "203.0.113.9"])
def test_a_public_server_refuses_loopback_unless_named_explicitly(bind):
    for url in ("http://localhost:9000/", "http://127.0.0.1:9000/", "http://[::1]:9000/"):
        with pytest.raises(WebhookRefused, match="loopback rule"):
            check(url, None, host=bind)  # the default allow-list is loopback, but not named explicitly
    assert check("http://localhost:9000/", ["localhost"], host=bind)
    assert check("http://127.0.0.1:9000/", ["127.0.0.1"], host=bind)
    with pytest.raises(WebhookRefused, match="loopback rule"):
        check("http://127.0.0.1:9000/", ["*"], host=bind)  # "*" names no host


@pytest.mark.parametrize("name", ["hook.test", "mapped.test", "any.test", "split.test"])
def test_a_name_resolving_to_loopback_counts_as_loopback(name):
    with pytest.raises(WebhookRefused, match="loopback rule"):
        check(f"http://{name}:9000/", ["*"], host="0.0.0.0")
    assert check(f"http://{name}:9000/", [name], host="0.0.0.0")  # named explicitly
    assert check("http://far.test:9000/", ["*"], host="0.0.0.0")


def test_legacy_numeric_forms_resolve_to_loopback():
    for host in ("127.1", "2130706433", "0x7f.1"):
        with pytest.raises(WebhookRefused, match="loopback rule"):
            check_webhook_url(f"http://{host}:9000/", ["*"], "0.0.0.0", 8188)


def test_a_loopback_server_may_call_loopback_hosts():
    assert check("http://localhost:9000/", None, host="127.0.0.1")
    assert check("http://hook.test:9000/", ["hook.test"], host="localhost")


def test_allow_list_and_resolution_rules_name_themselves():
    with pytest.raises(WebhookRefused, match="allow-list rule"):
        check("http://far.test:9000/")
    with pytest.raises(WebhookRefused, match="resolution rule"):
        check("http://nowhere.test/", ["*"])
    with pytest.raises(WebhookRefused, match="only http"):
        check("file:///etc/passwd", ["*"])


@pytest.mark.parametrize("bind, loopback", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                            ("[::1]", True), ("0.0.0.0", False), ("::", False), ("", False),
                                            ("10.1.2.3", False)])
def test_is_loopback_host(bind, loopback):
    assert is_loopback_host(bind) is loopback


def test_the_delivery_resolver_applies_the_rules_to_what_it_connects_to():
    """A name that resolved elsewhere at submission (DNS rebinding) is checked again on connection."""
    config = SimpleNamespace(host="0.0.0.0", port=8188, webhook_hosts=["*"])

    async def resolve(host: str, port: int):
        resolver = _CheckedResolver(WebhookSender(config))
        try:
            return await resolver.resolve(host, port)
        finally:
            await resolver.close()

    with pytest.raises(WebhookRefused, match="loopback rule"):
        asyncio.run(resolve("localhost", 9000))
    config.host = "127.0.0.1"
    with pytest.raises(WebhookRefused, match="own-port rule"):
        asyncio.run(resolve("localhost", 8188))
    assert asyncio.run(resolve("localhost", 9000))


def test_a_real_server_refuses_webhooks_to_itself_and_public_loopback(start_server):
    """Bound to every interface on a port chosen at bind time: its own port is refused, and so is loopback."""
    server = start_server("--host", "0.0.0.0")
    for url, rule in [(f"http://127.0.0.1:{server.port}/prompt", "own-port rule"),
                      (f"http://localhost:{server.port + 1}/hook", "loopback rule")]:
        status, body = server.json("POST", "/prompt", {"prompt": sum_prompt(1), "extra_data": {"webhook": url}})
        assert status == 400 and body["error"]["type"] == "webhook_refused", body
        assert rule in body["error"]["message"]
