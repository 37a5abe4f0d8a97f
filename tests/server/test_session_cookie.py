"""A front end that cannot send `Authorization` (ComfyUI's) authenticates with a session cookie, set by opening
the page once as `/?token=TOKEN`."""

from __future__ import annotations

from http.cookies import SimpleCookie

import pytest

from server.app import SESSION_COOKIE, session_value
from tests.server.inprocess import InProcessServer


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    server = InProcessServer(tmp_path_factory.mktemp("session") / "data", auth_token="s3cret").start()
    yield server
    server.stop()


def test_opening_the_page_with_the_token_sets_a_strict_httponly_cookie_and_drops_the_token(guarded):
    status, headers, _ = guarded.request("GET", "/?token=s3cret&lang=en")
    assert status == 303
    assert headers["location"] == "/?lang=en"  # the token leaves the address bar (and the history)
    cookie = SimpleCookie(headers["set-cookie"])[SESSION_COOKIE]
    assert cookie.value == session_value("s3cret") and "s3cret" not in cookie.value
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/"


def test_the_cookie_opens_the_api_and_nothing_else_does(guarded):
    cookie = {"Cookie": f"{SESSION_COOKIE}={session_value('s3cret')}"}
    assert guarded.request("GET", "/api/queue", headers=cookie)[0] == 200
    assert guarded.request("GET", "/queue")[0] == 401
    assert guarded.request("GET", "/queue", headers={"Cookie": f"{SESSION_COOKIE}={session_value('other')}"})[0] == 401
    assert guarded.request("GET", "/queue", headers={"Cookie": f"{SESSION_COOKIE}=s3cret"})[0] == 401
    status, body = guarded.json("GET", "/queue")
    assert status == 401 and "/?token=TOKEN" in body["error"]["message"]


def test_a_wrong_token_sets_nothing(guarded):
    status, headers, _ = guarded.request("GET", "/?token=wrong")
    assert status != 303 and "set-cookie" not in headers


def test_the_cookie_counts_only_from_the_servers_own_pages(tmp_path):
    """Another port of the same host is the same site (its requests carry SameSite=Strict cookies) but not the
    same origin. On a server bound beyond loopback with a token, cross-origin requests are otherwise let through
    (a bearer header cannot be sent cross-origin without a preflight we never grant), so the cookie's own origin
    check is what refuses them."""
    public = InProcessServer(tmp_path / "data", auth_token="s3cret", host="0.0.0.0").start()
    try:
        cookie = f"{SESSION_COOKIE}={session_value('s3cret')}"
        host = public.url.split("//", 1)[1]
        own = {"Cookie": cookie, "Origin": f"http://{host}"}
        assert public.request("POST", "/api/interrupt", body={}, headers=own)[0] == 200
        status, body = public.json("POST", "/api/interrupt", body={}, headers={
            "Cookie": cookie, "Origin": "http://127.0.0.1:1"})
        assert status == 403 and body["error"]["type"] == "forbidden_origin"
        assert public.request("POST", "/api/interrupt", body={}, headers={
            "Authorization": "Bearer s3cret", "Origin": "http://127.0.0.1:1"})[0] == 200
    finally:
        public.stop()
