"""Uploads, /view and saved workflows against hostile input, on a real server: frame bombs, malformed multipart
bodies, names with control characters or too long, Content-Disposition quoting, served content types, quotas."""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import shutil
from urllib.parse import unquote, urlencode

import pytest
from PIL import Image

from server.cli import build_parser
from server.file_names import content_disposition
from tests.nodes.test_image_bombs import gif
from tests.server.harness import multipart

BOUNDARY = b"BOUNDARY"
FORM = {"Content-Type": "multipart/form-data; boundary=BOUNDARY"}
PARAM = re.compile(r'; ([^=;\s]+)=("(?:[^"\\]|\\.)*"|[^;"]*)')  # RFC 6266 parameters: token or quoted string


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("--max-input-files", "4", "--max-input-mb", "0.5", "--max-workflows", "3",
                        "--max-workflow-mb", "0.05")


def png_bytes(size=(4, 4), padding=0):
    buffer = io.BytesIO()
    Image.new("RGB", size, (0, 0, 255)).save(buffer, format="PNG")
    return buffer.getvalue() + b"\0" * padding  # bytes after IEND: still a valid PNG, just larger


def upload(server, fields, path="/upload/image"):
    body, content_type = multipart(fields)
    return server.json("POST", path, raw=body, headers={"Content-Type": content_type})


def raw_upload(server, part_headers: bytes, data: bytes = b"", path="/upload/image"):
    """An upload whose part headers are sent byte for byte, as no well-behaved client would write them."""
    body = b"--" + BOUNDARY + b"\r\n" + part_headers + b"\r\n\r\n" + data + b"\r\n--" + BOUNDARY + b"--\r\n"
    return server.json("POST", path, raw=body, headers=FORM)


def clear(folder):
    for entry in folder.iterdir():
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def assert_clean_400(server, status, body, type_="invalid_form"):
    assert status == 400 and body["error"]["type"] == type_, body
    assert "Traceback" not in json.dumps(body) and "unhandled error" not in server.log()


# 1. frame bombs --------------------------------------------------------------------------------------
def test_an_animated_gif_whose_frames_decode_to_a_huge_canvas_is_refused(server):
    bomb = gif((4096, 4096), [(0, 0, 1, 1)] * 10)
    assert len(bomb) < 300
    status, body = upload(server, {"image": ("bomb.gif", bomb)})
    assert status == 413 and body["error"]["type"] == "image_too_large", body
    assert body["error"]["message"] == ("image 'bomb.gif' has 10 frames of 4096x4096 = 167.8 M pixels, over the "
                                        "limit of 67108864 pixels (67.1 M)")
    assert not (server.data_dir / "input" / "bomb.gif").exists()
    status, body = upload(server, {"image": ("many.gif", gif((1, 1), [(0, 0, 1, 1)] * 2000))})
    assert status == 413 and "'many.gif' has more than 1024 frames" in body["error"]["message"]
    status, body = upload(server, {"image": ("bomb.gif", bomb), "original_ref": '{"filename": "x.png"}'},
                          "/upload/mask")
    assert status == 413 and "10 frames of 4096x4096" in body["error"]["message"]


# 2. malformed multipart bodies ----------------------------------------------------------------------
@pytest.mark.parametrize("part_headers, data, expected", [
    (b'Content-Disposition: form-data; name="image"; filename="a.png"\r\nX-Note: a\x00b', b"", "header"),
    (b'Content-Disposition: form-data; name="image"; filename="a\x00b.png"', b"", "header"),
    (b'Content-Disposition: form-data; name="image"; filename="a\rb.png"', b"", "header"),
    (b'Content-Disposition: form-data; name="image"; filename="a.png"\r\nX-Long: ' + b"h" * (9 << 10), b"",
     "longer than 8190 bytes"),
], ids=["nul-in-header", "nul-in-filename", "cr-in-filename", "long-header-line"])
def test_malformed_part_headers_are_400(server, part_headers, data, expected):
    status, body = raw_upload(server, part_headers, data or png_bytes())
    assert_clean_400(server, status, body)
    assert expected in body["error"]["message"]


@pytest.mark.parametrize("body, expected", [
    (b"x" * (600 << 10) + b"\r\n--BOUNDARY\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\""
     b"\r\n\r\nPNG\r\n--BOUNDARY--\r\n", "longer than 524288 bytes"),
    (b"--BOUNDARY" + b"x" * (600 << 10) + b"\r\n", "longer than 524288 bytes"),
    (b"--BOUNDARY\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n" + b"cut short",
     "truncated"),
], ids=["long-preamble-line", "long-boundary-line", "truncated"])
def test_malformed_multipart_bodies_are_400(server, body, expected):
    status, answer = server.json("POST", "/upload/image", raw=body, headers=FORM)
    assert_clean_400(server, status, answer)
    assert expected in answer["error"]["message"]


# 3. names ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("disposition, expected", [
    ('filename="' + "é" * 130 + '.png"', "over the limit of 255 bytes"),
    ("filename*=UTF-8''a%0Ab.png", "control character (U+000A)"),
    ("filename*=UTF-8''a%00b.png", "control character (U+0000)"),
    ('filename="tab\t.png"', "control character (U+0009)"),
    ("filename*=UTF-8''del%7F.png", "control character (U+007F)"),
    ("filename*=UTF-8''c1%C2%85.png", "control character (U+0085)"),
    ('filename="."', "invalid file name '.'"),
], ids=["long", "lf", "nul", "tab", "del", "c1", "dot"])
def test_file_names_with_control_characters_or_too_long_are_400(server, disposition, expected):
    headers = f'Content-Disposition: form-data; name="image"; {disposition}'.encode()
    status, body = raw_upload(server, headers, png_bytes())
    assert_clean_400(server, status, body, "invalid_filename")
    assert expected in body["error"]["message"]


def test_a_file_name_that_is_not_utf8_is_400(server):
    status, body = raw_upload(server, b'Content-Disposition: form-data; name="image"; filename="\xe9.png"', png_bytes())
    assert_clean_400(server, status, body, "invalid_filename")
    assert "not valid UTF-8" in body["error"]["message"]


@pytest.mark.parametrize("subfolder, expected", [("a\nb", "control character"), ("x" * 300, "255 bytes"),
                                                 ("a/" + "y" * 256, "255 bytes")])
def test_subfolders_with_control_characters_or_too_long_are_400(server, subfolder, expected):
    status, body = upload(server, {"image": ("ok.png", png_bytes()), "subfolder": subfolder})
    assert_clean_400(server, status, body, "invalid_filename")
    assert expected in body["error"]["message"]


@pytest.mark.parametrize("query", ["filename=a%0Ab.png", "filename=a%0Db.png", "filename=a.png&subfolder=s%0A",
                                   "filename=a%09.png&type=input", "filename=" + "%C3%A9" * 130 + ".png"])
def test_view_refuses_names_with_control_characters_or_too_long(server, query):
    (server.data_dir / "output" / "a\nb.png").write_bytes(png_bytes())
    status, body = server.json("GET", f"/view?{query}")
    assert_clean_400(server, status, body, "invalid_filename")


def test_content_disposition_names_any_file_exactly_and_injects_nothing(server):
    for name in ['q";x=1.png', "画像 «1»%41.png", "plain.png"]:
        (server.data_dir / "output" / name).write_bytes(png_bytes())
        status, headers, data = server.request("GET", "/view?" + urlencode({"filename": name}))
        assert status == 200 and data.startswith(b"\x89PNG"), (name, status)
        header = headers["content-disposition"]
        kind, params = header.split(";", 1)
        pairs = PARAM.findall(";" + params)
        assert kind == "inline" and [key for key, _ in pairs] == ["filename", "filename*"], header
        assert "".join(f"; {key}={value}" for key, value in pairs) == ";" + params  # nothing else in it
        fallback, exact = pairs[0][1], pairs[1][1]
        assert fallback.isascii() and fallback.count('"') == 2 and "\\" not in fallback, header
        assert exact.startswith("UTF-8''") and unquote(exact.removeprefix("UTF-8''")) == name
    assert headers["content-disposition"] == "inline; filename=\"plain.png\"; filename*=UTF-8''plain.png"
    assert content_disposition("attachment", 'a\\"b') == "attachment; filename=\"a__b\"; filename*=UTF-8''a%5C%22b"


def test_workflow_names_with_control_characters_or_too_long_are_400(server):
    for name in ["a%0A", "a%0D", "a%09b", "%E7%94%BB" * 100]:
        status, body = server.json("PUT", f"/workflows/{name}", {"nodes": []})
        assert status == 400 and body["error"]["type"] in ("invalid_filename", "invalid_name"), (name, body)
        assert server.json("GET", f"/workflows/{name}")[0] == 400
    assert not [p for p in (server.data_dir / "workflows").iterdir() if not p.name.isprintable()]


# 4. served content types -----------------------------------------------------------------------------
@pytest.mark.parametrize("name, content_type, disposition", [
    ("page.html", "application/octet-stream", "attachment"), ("icon.svg", "application/octet-stream", "attachment"),
    ("code.js", "application/octet-stream", "attachment"), ("notes.txt", "application/octet-stream", "attachment"),
    ("feed.xml", "application/octet-stream", "attachment"), ("noext", "application/octet-stream", "attachment"),
    ("pic.png", "image/png", "inline"), ("pic.JPG", "image/jpeg", "inline"), ("clip.webm", "video/webm", "inline"),
    ("clip.mp4", "video/mp4", "inline"), ("graph.json", "application/json", "inline"),
])
def test_view_serves_allow_listed_types_inline_and_anything_else_as_a_download(server, name, content_type,
                                                                               disposition):
    (server.data_dir / "output" / name).write_bytes(b"<script>alert(1)</script>")
    status, headers, _ = server.request("GET", f"/view?filename={name}")
    assert status == 200
    assert headers["content-type"].split(";")[0] == content_type
    assert headers["content-disposition"].startswith(f"{disposition}; filename=\"{name}\"")


# 5. quotas --------------------------------------------------------------------------------------------
def test_input_folder_quota_on_files(server):
    clear(server.data_dir / "input")
    for index in range(4):
        assert upload(server, {"image": (f"f{index}.png", png_bytes())})[0] == 200
    status, body = upload(server, {"image": ("f4.png", png_bytes())})
    assert status == 507 and body["error"]["type"] == "quota_exceeded", body
    assert "--max-input-files 4" in body["error"]["message"]
    assert body["error"]["extra_info"] == {"limit": "max_input_files", "value": 4}
    assert upload(server, {"image": ("f0.png", png_bytes()), "overwrite": "true"})[0] == 200  # replaces: no new file
    assert upload(server, {"image": ("t.png", png_bytes()), "type": "temp"})[0] == 200  # temp/ is not input/
    assert sorted(os.listdir(server.data_dir / "input")) == ["f0.png", "f1.png", "f2.png", "f3.png"]


def test_input_folder_quota_on_bytes(server):
    clear(server.data_dir / "input")
    (server.data_dir / "input" / "sub").mkdir()
    assert upload(server, {"image": ("a.png", png_bytes(padding=300 << 10)), "subfolder": "sub"})[0] == 200
    status, body = upload(server, {"image": ("b.png", png_bytes(padding=300 << 10))})
    assert status == 507 and body["error"]["type"] == "quota_exceeded", body
    assert "over the limit of --max-input-mb 0.5" in body["error"]["message"]
    assert not (server.data_dir / "input" / "b.png").exists()
    assert upload(server, {"image": ("c.png", png_bytes(padding=100 << 10))})[0] == 200


def test_saved_workflow_count_and_size(server):
    clear(server.data_dir / "workflows")
    for name in ("one", "two", "three"):
        assert server.json("PUT", f"/workflows/{name}", {"nodes": [], "name": name})[0] == 200
    status, body = server.json("PUT", "/workflows/four", {"nodes": []})
    assert status == 507 and body["error"]["type"] == "quota_exceeded"
    assert "--max-workflows 3" in body["error"]["message"]
    assert server.json("PUT", "/workflows/two", {"nodes": [1]})[0] == 200  # replacing takes no new place
    assert server.json("DELETE", "/workflows/one")[0] == 200
    assert server.json("PUT", "/workflows/four", {"nodes": []})[0] == 200
    big = {"nodes": [], "extra": "x" * (60 << 10)}
    status, body = server.json("PUT", "/workflows/big", big)
    assert status == 413 and body["error"]["type"] == "too_large"
    assert "--max-workflow-mb 0.05" in body["error"]["message"]
    # the same body without a declared length (chunked) is refused too
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("PUT", "/workflows/four", body=iter([json.dumps(big).encode()]),
                 headers={"Content-Type": "application/json"}, encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["type"] == "too_large"
    conn.close()
    assert server.json("GET", "/workflows/four") == (200, {"nodes": []})


def test_limit_flags_parse_and_refuse_negative_or_infinite_values(capsys):
    args = build_parser().parse_args(["serve", "--max-input-mb", "0.5", "--max-image-frames", "7",
                                      "--max-workflows", "0", "--max-input-files", "12", "--max-workflow-mb", "2"])
    assert (args.max_input_mb, args.max_image_frames, args.max_workflows, args.max_input_files,
            args.max_workflow_mb) == (0.5, 7, 0, 12, 2.0)
    defaults = build_parser().parse_args(["serve"])
    assert (defaults.max_input_mb, defaults.max_input_files, defaults.max_workflows, defaults.max_workflow_mb,
            defaults.max_image_frames) == (2048, 10_000, 1000, 16, 1024)
    for flag, value in [("--max-input-mb", "-1"), ("--max-input-mb", "inf"), ("--max-image-frames", "0"),
                        ("--max-workflows", "2.5"), ("--max-input-files", "-3")]:
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", flag, value])
        assert f"argument {flag}" in capsys.readouterr().err


def test_internal_files_lists_images_as_the_load_nodes_offer_them(server):
    import os
    import time

    for name, age in (("old.png", 100), ("new.png", 0)):
        path = server.data_dir / "output" / "listed" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes())
        os.utime(path, (time.time() - age, time.time() - age))
    (server.data_dir / "output" / "listed" / "notes.txt").write_text("not an image")
    status, names = server.json("GET", "/internal/files/output")
    assert status == 200 and names.index("listed/new.png [output]") < names.index("listed/old.png [output]")
    assert not any(name.endswith(".txt [output]") for name in names)
    status, info = server.json("GET", "/object_info/LoadImageOutput")
    options = info["LoadImageOutput"]["input"]["required"]["image"]
    assert "listed/new.png [output]" in str(options) and "/internal/files/output" in str(options)
    assert server.json("GET", "/api/internal/files/input")[0] == 200
    status, body = server.json("GET", "/internal/files/models")
    assert status == 400 and body["error"]["type"] == "invalid_type"
