"""`--max-history`: the server keeps the newest N history entries (ComfyUI keeps 10,000); an older entry goes with
the temp files it listed, so a server that runs for months holds a bounded history and temp folder. A server
started with a lower limit than the last one drops the excess at start."""

from __future__ import annotations

import time

from tests.server.test_api_flow import image_prompt, submit, wait_history


def preview_file(server, entry):
    image = entry["outputs"]["3"]["images"][0]
    assert image["type"] == "temp"
    return server.data_dir / "temp" / image["subfolder"] / image["filename"]


def gone(path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while path.exists():
        assert time.monotonic() < deadline, f"{path} is still there"
        time.sleep(0.02)


def test_the_oldest_entries_go_with_their_temp_files(start_server, tmp_path):
    server = start_server("--web-root", str(tmp_path), "--max-history", "2")
    ids = [submit(server, image_prompt(steps=1, value=v, save="PreviewImage")) for v in (0.1, 0.5)]
    files = [preview_file(server, wait_history(server, pid)) for pid in ids]
    assert files[0].is_file()  # still listed by the history
    ids.append(submit(server, image_prompt(steps=1, value=0.9, save="PreviewImage")))
    wait_history(server, ids[2])
    assert list(server.json("GET", "/history")[1]) == ids[1:]
    gone(files[0])  # removed just after the entry that dropped it was committed
    assert files[1].is_file()
    server.stop()
    again = start_server("--web-root", str(tmp_path), "--max-history", "1", data_dir=server.data_dir)
    assert list(again.json("GET", "/history")[1]) == ids[2:]
    assert not files[1].exists()
