"""Fixtures of the server tests: real server processes, one per test module."""

from __future__ import annotations

import pytest

from tests.server.harness import ServerProcess, make_data_dir


@pytest.fixture(scope="module")
def start_server(tmp_path_factory):
    """`start_server(*serve_args, data_dir=None)` → a started ServerProcess; all are stopped at module end."""
    started: list[ServerProcess] = []

    def start(*args: str, data_dir=None) -> ServerProcess:
        folder = data_dir or make_data_dir(tmp_path_factory.mktemp("srv") / "data")
        server = ServerProcess(folder, *args).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
