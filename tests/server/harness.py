"""A real server process on a free port, and small HTTP/WebSocket clients for the server's tests."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = "from tests.server.servernodes import NODE_CLASSES  # noqa: F401\n"


def make_data_dir(path: Path) -> Path:
    (path / "custom_nodes").mkdir(parents=True, exist_ok=True)
    (path / "custom_nodes" / "testpack.py").write_text(PLUGIN)
    (path / "signals").mkdir(exist_ok=True)
    return path


class ServerProcess:
    """`latentloom serve --port 0` in a subprocess; `url` once it listens."""

    def __init__(self, data_dir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.args = list(args)
        self.env = env if env is not None else dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.log_path = data_dir.parent / f"{data_dir.name}-server.log"

    def start(self, timeout: float = 60.0) -> ServerProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "server.cli", "--data-dir", str(self.data_dir),
                                          "serve", "--port", "0", *self.args], cwd=ROOT, stdout=subprocess.PIPE,
                                         stderr=log, env=self.env)
        timer = threading.Timer(timeout, self.proc.kill)
        timer.start()
        try:
            for raw in self.proc.stdout:
                line = raw.decode().strip()
                if line.startswith("listening on "):
                    self.url = line.removeprefix("listening on ")
                    break
        finally:
            timer.cancel()
        if not self.url:
            raise RuntimeError(f"the server did not start:\n{self.log()}")
        return self

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or 80

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    # HTTP ------------------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                raw: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        payload = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        all_headers = {"Content-Type": "application/json"} if body is not None else {}
        all_headers.update(headers or {})
        conn.request(method, path, body=payload, headers=all_headers)
        response = conn.getresponse()
        data = response.read()
        result = response.status, {k.lower(): v for k, v in response.getheaders()}, data
        conn.close()
        return result

    def json(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
             raw: bytes | None = None) -> tuple[int, Any]:
        status, _, data = self.request(method, path, body, headers, raw)
        try:
            return status, json.loads(data) if data else None
        except ValueError:
            return status, data


def multipart(fields: dict[str, Any]) -> tuple[bytes, str]:
    """A multipart/form-data body: values are str, or (filename, bytes) for files."""
    boundary = "latentloomtestboundary"
    parts = []
    for name, value in fields.items():
        if isinstance(value, tuple):
            filename, data = value
            head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                    f"Content-Type: application/octet-stream\r\n\r\n").encode()
            parts.append(head + data + b"\r\n")
        else:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"
