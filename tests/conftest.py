"""Shared fixtures: the real app under uvicorn on an ephemeral loopback port, a temp project dir."""

from __future__ import annotations

import dataclasses
import signal
import socket
import threading
from pathlib import Path

import pytest
import requests
import uvicorn

from coordinator import Server, create_app
from coordinator_core.settings import Settings


class RunningServer:
    """A coordinator served by uvicorn in a background thread; `url` is its base address."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.app = create_app(settings)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, ws="websockets-sansio", log_level="warning", lifespan="on")
        self._server = Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]})

    @property
    def state(self):
        return self.app.state

    def start(self) -> RunningServer:
        self._thread.start()
        # `started` flips once the lifespan ran and the socket listens; bounded wait.
        for _ in range(1000):
            if self._server.started or not self._thread.is_alive():
                break
            threading.Event().wait(0.01)
        if not self._server.started:
            raise RuntimeError("server did not start")
        return self

    def stop(self) -> None:
        self._server.handle_exit(signal.SIGTERM, None)  # what a SIGTERM does (signals reach the main thread only)
        self._thread.join(timeout=15)
        self._sock.close()

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(self.url + path, timeout=30, **kwargs)

    def post(self, path: str, json=None, **kwargs) -> requests.Response:
        return requests.post(self.url + path, json=json, timeout=30, **kwargs)

    def patch(self, path: str, json=None, **kwargs) -> requests.Response:
        return requests.patch(self.url + path, json=json, timeout=30, **kwargs)

    def delete(self, path: str, **kwargs) -> requests.Response:
        return requests.delete(self.url + path, timeout=30, **kwargs)


@pytest.fixture
def project_dir(tmp_path: Path) -> Path:
    return tmp_path / "project"


@pytest.fixture
def make_server(project_dir: Path):
    """Start servers with settings overrides: `make_server(runner_poll_timeout=1)`."""
    started: list[RunningServer] = []

    def factory(**overrides) -> RunningServer:
        settings = dataclasses.replace(Settings(project_dir=project_dir, host="127.0.0.1"), **overrides)
        server = RunningServer(settings).start()
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


@pytest.fixture
def server(make_server) -> RunningServer:
    return make_server()
