"""Methods a path does not take: 405 with an `Allow` naming every method of the path, whichever of
its routes the router tried first; and `/ws` asked without the WebSocket upgrade."""

import json
import re

import requests
from starlette.routing import Route
from websockets.sync.client import connect

METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}


def path_methods(app) -> dict[str, set[str]]:
    """Every HTTP path of the app with all the methods its routes take."""
    found: dict[str, set[str]] = {}
    for route in app.routes:
        if isinstance(route, Route):
            found.setdefault(route.path, set()).update(route.methods)
    for methods in found.values():
        if "GET" in methods:
            methods.add("HEAD")
    return found


def test_wrong_method_lists_every_method_of_the_path(server):
    paths = path_methods(server.app)
    assert paths["/sessions"] == {"GET", "HEAD", "POST"}  # several routes share a path
    for path, methods in paths.items():
        url = server.url + re.sub(r"{\w+}", "x", path)
        for method in sorted(METHODS - methods - {"HEAD"}):  # a HEAD answer has no body
            r = requests.request(method, url, timeout=30)
            assert r.status_code == 405, (method, path, r.status_code, r.text)
            assert set(r.headers["Allow"].split(", ")) == methods, (method, path, r.headers["Allow"])
            assert r.json() == {"detail": "Method Not Allowed"}


def test_plain_request_to_the_websocket_route(server):
    for method in ("GET", "HEAD"):
        r = requests.request(method, server.url + "/ws?since=0", timeout=30)
        assert (r.status_code, r.headers["Upgrade"]) == (426, "websocket")
    assert r.content == b""  # HEAD
    r = server.get("/ws")
    assert r.json() == {"detail": "WebSocket only: send an Upgrade: websocket request"}
    with connect(server.ws_url + "/ws") as ws:  # the upgrade itself still reaches the WebSocket
        assert json.loads(ws.recv(timeout=10))["type"] == "init"
