"""The running server: health, JSON errors for unmatched routes, CORS, the CLI entry point."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests
from starlette.middleware.cors import CORSMiddleware

from coordinator_core.cors import Cors


def test_health(server):
    r = server.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "healthy"}
    assert r.headers["content-type"] == "application/json"


def test_unknown_route_is_json_404(server):
    r = server.get("/nope")
    assert r.status_code == 404
    assert r.json() == {"detail": "Not Found"}


def test_wrong_method_is_json_405_with_allow(server):
    r = server.post("/health")
    assert r.status_code == 405
    assert r.json() == {"detail": "Method Not Allowed"}
    assert "GET" in r.headers["allow"]
    assert server.get("/health").status_code == 200


def test_cors_preflight_answered(server):
    r = requests.options(
        server.url + "/health",
        headers={"Origin": "http://dash.example", "Access-Control-Request-Method": "PATCH",
                 "Access-Control-Request-Headers": "content-type"},
        timeout=10,
    )
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "*"
    assert "PATCH" in r.headers["access-control-allow-methods"]


def test_cors_origins_restricts(make_server):
    srv = make_server(cors_origins=("http://ok.example",))
    ok = srv.get("/health", headers={"Origin": "http://ok.example"})
    assert ok.headers["access-control-allow-origin"] == "http://ok.example"
    other = srv.get("/health", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers


@pytest.mark.parametrize("vary", [None, "Accept-Encoding"])
@pytest.mark.parametrize("origin", [None, "http://dash.example"])
def test_cors_headers_are_starlettes(vary, origin):
    # The short way for requests without Origin answers exactly what Starlette's middleware does.
    async def app(scope, receive, send):
        headers = [(b"content-type", b"text/plain")] + ([(b"vary", vary.encode())] if vary else [])
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    scope = {"type": "http", "method": "GET", "path": "/", "headers": [(b"host", b"x")]}
    if origin:
        scope["headers"].append((b"origin", origin.encode()))

    def answer(middleware) -> list:
        sent = []

        async def send(message):
            sent.append(message)

        wrapped = middleware(app, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])
        asyncio.run(wrapped(dict(scope), None, send))
        return sent

    assert answer(Cors) == answer(CORSMiddleware)
    assert any(name == b"vary" and b"Origin" in value for name, value in answer(Cors)[0]["headers"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_module_entry_point_serves_and_stops_on_sigterm(tmp_path):
    port = _free_port()
    env = {**os.environ, "AGENT_ORCHESTRATOR_PROJECT_DIR": str(tmp_path)}
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "coordinator", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                r = requests.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except requests.ConnectionError:
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "server did not answer in time"
                time.sleep(0.05)
        assert r.json() == {"status": "healthy"}
        assert (tmp_path / ".agent-orchestrator" / "observability.db").exists()
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal for the exit status.
        assert proc.wait(timeout=15) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
