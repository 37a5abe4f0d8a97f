"""/users, /userdata, /v2/userdata and /settings as ComfyUI's front end calls them, through real HTTP to our app:
the user directory's layout, listings against a known tree, overwrite and move conflicts, and every hostile input
(traversal in its encodings, NUL and control characters, symlinks out, oversized bodies, bad JSON)."""

from __future__ import annotations

import http.client
import json
import os
from pathlib import Path

import pytest

from server import user_data as user_data_module
from server.user_data import UserData, write_atomic
from tests.server.inprocess import InProcessServer

LIMIT = 4096  # --max-workflow-mb of these servers, in bytes


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    started = InProcessServer(tmp_path_factory.mktemp("users") / "data", max_workflow_bytes=LIMIT).start()
    yield started
    started.stop()


def user_dir(server) -> Path:
    return server.data_dir / "user" / "default"


def store(server, name: str, body: bytes, query: str = "") -> tuple[int, object]:
    return server.json("POST", f"/api/userdata/{name}{query}", raw=body)


def error_of(body) -> tuple[str, str]:
    return body["error"]["type"], body["error"]["message"]


# users --------------------------------------------------------------------------------------------------------
def test_one_user_on_the_server_migrated_once_its_folder_exists(tmp_path):
    fresh = InProcessServer(tmp_path / "data").start()
    try:
        assert fresh.json("GET", "/api/users") == (200, {"storage": "server", "migrated": False})
        assert fresh.json("POST", "/api/settings", {"Comfy.X": 1})[0] == 200
        assert fresh.json("GET", "/api/users") == (200, {"storage": "server", "migrated": True})
        status, body = fresh.json("POST", "/api/users", {"username": "alice"})
        assert status == 403 and body["error"]["type"] == "single_user" and "'default'" in body["error"]["message"]
        assert fresh.json("POST", "/api/users", {"name": "alice"})[0] == 400
        assert not (tmp_path / "data" / "user" / "alice").exists()
    finally:
        fresh.stop()


# storing and reading ---------------------------------------------------------------------------------------------
def test_a_workflow_saved_lands_in_the_user_directory_as_comfyui_lays_it_out(server):
    body = json.dumps({"nodes": [], "links": [], "version": 0.4}).encode()
    status, answer = store(server, "workflows%2Fsaved.json", body, "?overwrite=true&full_info=false")
    assert (status, answer) == (200, "workflows/saved.json")
    assert (user_dir(server) / "workflows" / "saved.json").read_bytes() == body
    status, headers, data = server.request("GET", "/api/userdata/workflows%2Fsaved.json")
    assert (status, data) == (200, body) and headers["content-type"].startswith("application/json")
    status, info = store(server, "workflows%2Fsaved.json", body + b" ", "?overwrite=true&full_info=true")
    assert status == 200 and info["path"] == "workflows/saved.json" and info["size"] == len(body) + 1
    assert info["modified"] == pytest.approx((user_dir(server) / "workflows" / "saved.json").stat().st_mtime)
    assert not [p for p in (user_dir(server) / "workflows").iterdir() if p.name.endswith(".tmp")]


def test_a_user_file_that_is_not_json_or_an_image_is_a_download_never_a_page(server):
    assert store(server, "evil.html", b"<script>alert(1)</script>")[0] == 200
    status, headers, _ = server.request("GET", "/userdata/evil.html")
    assert status == 200 and headers["content-type"] == "application/octet-stream"
    assert headers["content-disposition"].startswith("attachment")


def test_overwrite_false_on_an_existing_file_is_409_and_keeps_it(server):
    assert store(server, "keep.json", b'{"v": 1}')[0] == 200
    status, body = store(server, "keep.json", b'{"v": 2}', "?overwrite=false")
    assert status == 409 and error_of(body)[0] == "file_exists" and "keep.json" in error_of(body)[1]
    assert (user_dir(server) / "keep.json").read_bytes() == b'{"v": 1}'
    # the front end writes overwrite=undefined when a caller leaves it out: ComfyUI replaces then
    assert store(server, "keep.json", b'{"v": 3}', "?overwrite=undefined&full_info=undefined") == (200, "keep.json")
    assert (user_dir(server) / "keep.json").read_bytes() == b'{"v": 3}'


def test_delete_answers_204_then_404_naming_the_file(server):
    assert store(server, "gone.json", b"{}")[0] == 200
    assert server.request("DELETE", "/api/userdata/gone.json")[0] == 204
    assert not (user_dir(server) / "gone.json").exists()
    status, body = server.json("DELETE", "/api/userdata/gone.json")
    assert status == 404 and "gone.json" in error_of(body)[1]
    status, body = server.json("GET", "/api/userdata/never%2Fthere.json")
    assert status == 404 and "never/there.json" in error_of(body)[1]


# listing --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tree(server):
    root = user_dir(server) / "tree"
    for name, data in {"a.json": b"1", "sub/b.json": b"22", "sub/deeper/c.json": b"333", ".hidden.json": b"h",
                       ".hiddendir/d.json": b"d"}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_listing_follows_recurse_split_and_full_info(server, tree):
    base = "/api/userdata?dir=tree"
    assert server.json("GET", base) == (200, ["a.json"])
    assert server.json("GET", base + "&recurse=true") == (200, ["a.json", "sub/b.json", "sub/deeper/c.json"])
    assert server.json("GET", base + "%2F&recurse=true&split=true") == (200, [
        ["a.json", "a.json"], ["sub/b.json", "sub", "b.json"], ["sub/deeper/c.json", "sub", "deeper", "c.json"]])
    status, infos = server.json("GET", base + "&recurse=true&split=false&full_info=true")
    assert status == 200 and [(i["path"], i["size"]) for i in infos] == [
        ("a.json", 1), ("sub/b.json", 2), ("sub/deeper/c.json", 3)]
    assert all(i["modified"] == pytest.approx((tree / i["path"]).stat().st_mtime) for i in infos)
    assert server.json("GET", "/api/userdata?dir=tree%2Fsub&recurse=false") == (200, ["b.json"])


def test_listing_errors_name_the_folder(server, tree):
    status, body = server.json("GET", "/api/userdata?recurse=true")
    assert status == 400 and "'dir' is required" in error_of(body)[1]
    status, body = server.json("GET", "/api/userdata?dir=nowhere")
    assert status == 404 and "nowhere" in error_of(body)[1]
    assert server.json("GET", "/api/userdata?dir=tree%2Fa.json")[0] == 404
    for hostile in ("..", "..%2F..", "%2Fetc", "tree%2F..%2F..%2F.."):
        status, body = server.json("GET", f"/api/userdata?dir={hostile}")
        assert status == 403 and body["error"]["type"] == "forbidden_path", hostile


def test_v2_lists_one_folder_with_paths_from_the_user_directory(server, tree):
    status, items = server.json("GET", "/api/v2/userdata?path=tree")
    assert status == 200 and [(i["name"], i["path"], i["type"]) for i in items] == [
        ("a.json", "tree/a.json", "file"), ("sub", "tree/sub", "directory")]
    assert items[0]["size"] == 1 and "size" not in items[1]
    status, root_items = server.json("GET", "/api/v2/userdata")
    assert status == 200 and {"name": "tree", "path": "tree", "type": "directory"} in root_items
    assert server.json("GET", "/api/v2/userdata?path=..%2F..")[0] == 403
    assert server.json("GET", "/api/v2/userdata?path=missing")[0] == 404


# moving ----------------------------------------------------------------------------------------------------------
def test_move_renames_and_refuses_to_replace_unless_told(server):
    assert store(server, "workflows%2Fone.json", b"1")[0] == 200
    assert store(server, "workflows%2Ftwo.json", b"2")[0] == 200
    folder = user_dir(server) / "workflows"
    status, body = server.json("POST", "/api/userdata/workflows%2Fone.json/move/workflows%2Ftwo.json?overwrite=false")
    assert status == 409 and "workflows/two.json" in error_of(body)[1]
    assert (folder / "one.json").read_bytes() == b"1" and (folder / "two.json").read_bytes() == b"2"
    status, info = server.json("POST", "/api/userdata/workflows%2Fone.json/move/workflows%2Ftwo.json"
                                       "?overwrite=true&full_info=true")
    assert status == 200 and info["path"] == "workflows/two.json" and info["size"] == 1
    assert not (folder / "one.json").exists() and (folder / "two.json").read_bytes() == b"1"
    assert server.json("POST", "/api/userdata/workflows%2Ftwo.json/move/archive%2F2026%2Ftwo.json"
                               "?overwrite=false") == (200, "archive/2026/two.json")
    assert (user_dir(server) / "archive" / "2026" / "two.json").read_bytes() == b"1"
    status, body = server.json("POST", "/api/userdata/workflows%2Fmissing.json/move/x.json")
    assert status == 404 and "workflows/missing.json" in error_of(body)[1]
    status, body = server.json("POST", "/api/userdata/archive%2F2026%2Ftwo.json/move/..%2F..%2Fescaped.json")
    assert status == 403 and "../../escaped.json" in error_of(body)[1]
    assert (user_dir(server) / "archive" / "2026" / "two.json").exists()
    assert not (server.data_dir / "escaped.json").exists()


# hostile names -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("encoded", "status", "kind"), [
    ("..%2F..%2Flatentloom.sqlite3", 403, "forbidden_path"),
    ("%2Fetc%2Fpasswd", 403, "forbidden_path"),
    ("workflows%2F..%2F..%2F..%2Fx.json", 403, "forbidden_path"),
    ("%2E%2E%2F%2E%2E%2Fx.json", 403, "forbidden_path"),
    ("C:%2Fwindows%2Fx.json", 403, "forbidden_path"),
    ("a%00b.json", 400, "invalid_filename"),
    ("a%0Ab.json", 400, "invalid_filename"),
    ("a%1Bb.json", 400, "invalid_filename"),
    ("a%5C..%5Cb.json", 400, "invalid_filename"),
    ("x" * 300 + ".json", 400, "invalid_filename"),
    ("d%2F" * 600 + "x.json", 400, "invalid_filename"),
], ids=["dotdot", "absolute", "dotdot-inside", "encoded-dots", "drive", "nul", "newline", "escape", "backslash",
        "long-name", "long-path"])
def test_hostile_paths_are_refused_on_every_route_naming_the_path(server, encoded, status, kind):
    before = sorted(p for p in server.data_dir.rglob("*"))
    for method, path in (("GET", f"/api/userdata/{encoded}"), ("POST", f"/api/userdata/{encoded}"),
                         ("DELETE", f"/userdata/{encoded}"), ("POST", f"/api/userdata/keep.json/move/{encoded}"),
                         ("POST", f"/api/userdata/{encoded}/move/x.json"), ("GET", f"/api/userdata?dir={encoded}")):
        got, body = server.json(method, path, raw=b"{}" if method == "POST" else None)
        assert got == status and body["error"]["type"] == kind, (method, path)
        assert body["error"]["extra_info"].get("path") is not None and "Traceback" not in json.dumps(body)
    assert sorted(p for p in server.data_dir.rglob("*")) == before


def test_symlinks_out_of_the_user_directory_are_not_followed(server, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.json").write_text('{"secret": true}')
    user_dir(server).mkdir(parents=True, exist_ok=True)
    os.symlink(outside, user_dir(server) / "link")
    os.symlink(outside / "secret.json", user_dir(server) / "secret-link.json")
    try:
        for path in ("/api/userdata/link%2Fsecret.json", "/api/userdata/secret-link.json"):
            status, body = server.json("GET", path)
            assert status == 403 and body["error"]["type"] == "forbidden_path", path
        assert server.json("POST", "/api/userdata/link%2Fnew.json", raw=b"{}")[0] == 403
        assert not (outside / "new.json").exists()
        assert server.json("DELETE", "/api/userdata/secret-link.json")[0] == 403
        assert server.json("GET", "/api/userdata?dir=link")[0] == 403
        status, names = server.json("GET", "/api/userdata?dir=.&recurse=true")
        assert status == 200 and not [n for n in names if "secret" in n]
        assert all(item["name"] not in ("link", "secret-link.json") for item in server.json("GET", "/v2/userdata")[1])
        assert (outside / "secret.json").exists()
    finally:
        (user_dir(server) / "link").unlink()
        (user_dir(server) / "secret-link.json").unlink()


# bodies ----------------------------------------------------------------------------------------------------------
def test_a_body_over_the_limit_is_413_and_leaves_no_file(server):
    status, body = store(server, "big.json", b"x" * (LIMIT + 1))
    assert status == 413 and body["error"]["type"] == "too_large" and body["error"]["extra_info"]["limit"] == LIMIT
    # streamed without a length (chunked): refused once it passes the limit
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/api/userdata/big.json", body=iter([b"y" * 1024] * 8), encode_chunked=True,
                 headers={"Transfer-Encoding": "chunked"})
    response = conn.getresponse()
    assert response.status == 413
    conn.close()
    assert not (user_dir(server) / "big.json").exists()
    assert not [p for p in user_dir(server).iterdir() if p.name.startswith(".big.json")]
    assert store(server, "big.json", b"x" * LIMIT)[0] == 200


def test_a_failed_write_keeps_the_old_file_whole_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "workflows" / "a.json"
    write_atomic(target, b"old content")

    def crash(src, dst):  # the rename never happens: the process died before it
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(user_data_module.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        write_atomic(target, b"new content that never lands")
    assert target.read_bytes() == b"old content"
    assert [p.name for p in target.parent.iterdir()] == ["a.json"]


def test_new_files_past_the_quota_are_507_replacing_one_is_not(tmp_path):
    small = InProcessServer(tmp_path / "data", max_workflows=2).start()
    try:
        assert store(small, "a.json", b"1")[0] == 200
        assert store(small, "sub%2Fb.json", b"2")[0] == 200
        status, body = store(small, "c.json", b"3")
        assert status == 507 and body["error"]["type"] == "quota_exceeded" and body["error"]["extra_info"]["limit"] == 2
        assert store(small, "a.json", b"4")[0] == 200
    finally:
        small.stop()


# settings --------------------------------------------------------------------------------------------------------
def test_settings_merge_and_persist_in_comfy_settings_json(server):
    assert server.json("POST", "/api/settings", {"Comfy.Locale": "en", "Comfy.Graph": {"zoom": [1, 2.5]}})[0] == 200
    assert server.json("POST", "/api/settings/Comfy.LinkRenderMode", 2)[0] == 200
    assert server.json("POST", "/api/settings", {"Comfy.Locale": "fr"})[0] == 200
    expected = {"Comfy.Locale": "fr", "Comfy.Graph": {"zoom": [1, 2.5]}, "Comfy.LinkRenderMode": 2}
    assert server.json("GET", "/api/settings") == (200, expected)
    assert json.loads((user_dir(server) / "comfy.settings.json").read_text()) == expected
    assert server.json("GET", "/api/settings/Comfy.Graph") == (200, {"zoom": [1, 2.5]})
    assert server.json("GET", "/api/settings/Comfy.Unset") == (200, None)
    assert server.json("POST", "/api/settings/a%2Fb", raw=b"null")[0] == 200
    assert server.json("GET", "/api/settings/a%2Fb") == (200, None) and "a/b" in server.json("GET", "/settings")[1]


@pytest.mark.parametrize(("path", "raw", "words"), [
    ("/api/settings", b"[1, 2]", "JSON object"),
    ("/api/settings", b"{not json", "malformed JSON"),
    ("/api/settings", b'{"a": NaN}', "finite"),
    ("/api/settings", b'{"a": "\\ud800"}', "surrogate"),
    ("/api/settings", b"[" * 200 + b"]" * 200, "nested"),
    ("/api/settings", b"", "empty"),
    ("/api/settings/Comfy.X", b"Infinity", "finite"),
    ("/api/settings/Comfy.X", b"", "empty"),
    ("/api/settings/" + "x" * 300, b"1", "1 to 256"),
    ("/api/settings/a%0Ab", b"1", "control character"),
])
def test_settings_refuse_bad_json_saying_why(server, path, raw, words):
    before = server.json("GET", "/settings")[1]
    status, body = server.json("POST", path, raw=raw)
    assert status == 400 and words in body["error"]["message"], body
    assert server.json("GET", "/settings")[1] == before


def test_settings_over_the_body_limit_are_413(server):
    status, body = server.json("POST", "/api/settings", {"big": "x" * LIMIT})
    assert status == 413 and "--max-workflow-mb" in body["error"]["message"]


def test_a_broken_settings_file_is_named_not_replaced(tmp_path):
    broken = InProcessServer(tmp_path / "data").start()
    try:
        path = tmp_path / "data" / "user" / "default" / "comfy.settings.json"
        path.parent.mkdir(parents=True)
        path.write_text("{broken")
        for method, route, body in (("GET", "/settings", None), ("POST", "/settings", {"a": 1})):
            status, answer = broken.json(method, route, body)
            assert status == 500 and "comfy.settings.json" in answer["error"]["message"]
        assert path.read_text() == "{broken"
    finally:
        broken.stop()


# defences shared with every route ---------------------------------------------------------------------------
def test_token_and_origin_checks_apply(tmp_path):
    guarded = InProcessServer(tmp_path / "data", auth_token="s3cret").start()
    try:
        token = {"Authorization": "Bearer s3cret"}
        for method, path in (("GET", "/api/userdata?dir=workflows"), ("POST", "/api/userdata/a.json"),
                             ("GET", "/api/settings"), ("POST", "/api/settings/x"), ("GET", "/users")):
            assert guarded.json(method, path, raw=b"1")[0] == 401, path
        assert guarded.json("POST", "/api/settings/x", raw=b"1", headers=token)[0] == 200
        status, body = guarded.json("POST", "/api/settings/x", raw=b"2",
                                    headers={**token, "Origin": "http://evil.example"})
        assert status == 403 and body["error"]["type"] == "forbidden_origin"
        assert guarded.json("GET", "/api/settings/x", headers=token) == (200, 1)
    finally:
        guarded.stop()


def test_user_data_resolves_only_inside_its_root(tmp_path):
    data = UserData(tmp_path)
    assert data.resolve("workflows/a.json") == (tmp_path / "user" / "default" / "workflows" / "a.json").resolve()
    assert data.relative(data.resolve("x/./y.json")) == "x/y.json"
