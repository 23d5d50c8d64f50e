"""Limits and what a client gets at each: body size, JSON depth, slow bodies, listing sizes,
request heads (deadline and size), idle keep-alive connections, concurrent connections."""

import json
import logging
import socket
import time

import pytest
import requests
from hypothesis import given, settings, strategies as st

from coordinator_core.settings import Settings, SettingsError
from routes.common import json_depth
from server_process import ServerProcess
from test_sessions import create, event


def nested(depth: int):
    """A JSON value whose arrays nest `depth` deep."""
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def depth_of(value) -> int:
    if isinstance(value, list):
        return 1 + max(map(depth_of, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(depth_of, value.values()), default=0)
    return 0


def raw_request(port: int, data: bytes, timeout: float = 10) -> tuple[bytes, float]:
    """Send bytes on a fresh connection; return everything read until the server closes it,
    and how long that took."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        if data:
            sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received, time.monotonic() - started


def http_status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def json_body(raw: bytes):
    return json.loads(raw.partition(b"\r\n\r\n")[2])


# -- JSON depth ---------------------------------------------------------------------------

TRICKY_TEXT = st.text(alphabet=st.sampled_from('ab[]{}"\\\n\x00é'))
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | TRICKY_TEXT,
    lambda inner: st.lists(inner) | st.dictionaries(TRICKY_TEXT, inner),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES, st.booleans())
def test_json_depth_ignores_brackets_in_strings(value, ascii_only):
    body = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert json_depth(body) == depth_of(value)


def test_json_depth_is_linear_on_hostile_bodies():
    for body in (b"[" * 1_000_000, b'"' + b'\\"' * 500_000, b'"' * 1_000_000, b"[]" * 500_000):
        started = time.monotonic()
        json_depth(body)
        assert time.monotonic() - started < 1


def test_depth_limit_is_a_422_before_decoding(make_server):
    srv = make_server(max_json_depth=8)
    create(srv, "s")
    # The event object is one level, its tool_output the rest.
    ok = srv.post("/sessions/s/events", event("s", tool_output=nested(7)))
    assert ok.status_code == 200
    assert srv.get("/sessions/s/events").json()["events"][0]["tool_output"] == nested(7)
    deep = srv.post("/sessions/s/events", event("s", tool_output=nested(8)))
    assert deep.status_code == 422
    assert deep.json()["detail"] == [{"type": "json_depth", "loc": ["body"], "msg": "JSON nested deeper than 8 levels"}]
    assert len(srv.get("/sessions/s/events").json()["events"]) == 1
    brackets_in_strings = srv.post("/sessions/s/events", event("s", reason="[" * 100))
    assert brackets_in_strings.status_code == 200


def test_default_depth_limit_stops_what_would_overflow_the_decoder(server):
    create(server, "s")
    for body in (b"[" * 100_000 + b"]" * 100_000, b"[" * 100_000, json.dumps(event("s", tool_input={"a": nested(64)})).encode()):
        r = requests.post(server.url + "/sessions/s/events", data=body, timeout=10)
        assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_depth"
    r = requests.post(server.url + "/agents", data=b'{"name":"x","x":' + b"[" * 5000 + b"]" * 5000 + b"}", timeout=10)
    assert r.status_code == 422
    assert server.post("/sessions/s/events", event("s", tool_input={"a": nested(62)})).status_code == 200


# -- body size and speed ------------------------------------------------------------------


def test_body_size_limit_declared_and_chunked(make_server):
    limit = 4096
    srv = make_server(max_body_bytes=limit)
    create(srv, "s")
    template = json.dumps(event("s", reason="")).encode()
    exact = template.replace(b'"reason": ""', b'"reason": "' + b"x" * (limit - len(template)) + b'"')
    assert len(exact) == limit
    assert requests.post(srv.url + "/sessions/s/events", data=exact, timeout=10).status_code == 200

    too_big = exact.replace(b'"reason": "', b'"reason": "x')
    declared = requests.post(srv.url + "/sessions/s/events", data=too_big, timeout=10)
    assert declared.status_code == 413
    assert declared.json() == {"detail": f"Request body larger than {limit} bytes"}

    def chunks():  # no Content-Length: the size is only known while reading
        for i in range(0, len(too_big), 1000):
            yield too_big[i:i + 1000]

    chunked = requests.post(srv.url + "/sessions/s/events", data=chunks(), timeout=10)
    assert chunked.request.headers["transfer-encoding"] == "chunked"
    assert chunked.status_code == 413 and chunked.json()["detail"].startswith("Request body larger")
    huge_new_session = requests.post(srv.url + "/sessions", data=b'{"session_id":"' + b"y" * 10_000 + b'"}', timeout=10)
    assert huge_new_session.status_code == 413
    assert len(srv.get("/sessions/s/events").json()["events"]) == 1
    assert [s["session_id"] for s in srv.get("/sessions").json()["sessions"]] == ["s"]


def test_slow_body_gets_408(make_server):
    srv = make_server(body_timeout=0.3)
    create(srv, "s")
    head = b"POST /sessions/s/events HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    answer, seconds = raw_request(srv.port, head + b'{"event_type"')
    assert http_status(answer) == 408 and "not received within 0.3 s" in json_body(answer)["detail"]
    assert seconds < 5
    assert srv.get("/sessions/s/events").json()["events"] == []


def test_body_trickling_in_gets_408(make_server):
    # Each piece comes in time, the whole does not: the deadline is the body's, not a read's.
    srv = make_server(body_timeout=0.5)
    create(srv, "s")
    body = json.dumps(event("s")).encode()
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall(b"POST /sessions/s/events HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body))
        sock.settimeout(0.1)
        answer = b""
        for byte in body:
            sock.sendall(bytes([byte]))
            try:
                answer += sock.recv(65536)
            except TimeoutError:
                continue
            break
        assert time.monotonic() - started < 5
    assert http_status(answer) == 408 and b"connection: close" in answer.lower()
    assert srv.get("/sessions/s/events").json()["events"] == []


def test_body_trickling_in_after_the_answer_is_cut(make_server):
    # Answered without its body (an unknown route): the rest may not hold the connection.
    srv = make_server(body_timeout=0.3, keep_alive_timeout=30)
    head = b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    answer, seconds = raw_request(srv.port, head + b"{")
    assert http_status(answer) == 404
    assert 0.2 < seconds < 5


def test_client_leaving_mid_body_is_no_error(make_server, caplog):
    caplog.set_level(logging.INFO)
    srv = make_server()
    create(srv, "s")
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall(b"POST /sessions/s/events HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    deadline = time.monotonic() + 10
    while not any(getattr(r, "fields", {}).get("status") == 499 for r in caplog.records):
        assert time.monotonic() < deadline, "the request line of the request left unanswered"
        time.sleep(0.02)
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []
    assert srv.get("/sessions/s/events").json()["events"] == []


# -- listings -----------------------------------------------------------------------------


def test_listing_limits(server):
    for sid in ("a", "b", "c"):
        create(server, sid)
        server.post(f"/sessions/{sid}/events", event(sid))
    assert [s["session_id"] for s in server.get("/sessions?limit=2").json()["sessions"]] == ["c", "b"]
    assert len(server.get("/events/a?limit=1000").json()["events"]) == 1
    for path in ("/sessions?limit=0", "/sessions?limit=x", "/sessions/a/events?limit=1001",
                 "/sessions/a/events?limit=0", "/events/a?after=-1", "/events/a?limit=" + "9" * 5000):
        r = server.get(path)
        assert r.status_code == 422, path
        assert r.json()["detail"][0]["loc"][0] == "query"


# -- settings -----------------------------------------------------------------------------


def test_limit_settings_from_env():
    s = Settings.from_env({"MAX_JSON_DEPTH": "10", "BODY_TIMEOUT": "2.5", "HEADER_TIMEOUT": "3",
                           "MAX_HEADER_BYTES": "1000", "KEEP_ALIVE_TIMEOUT": "4", "MAX_CONNECTIONS": "50"})
    assert (s.max_json_depth, s.body_timeout, s.header_timeout) == (10, 2.5, 3)
    assert (s.max_header_bytes, s.keep_alive_timeout, s.max_connections) == (1000, 4, 50)
    d = Settings()
    assert (d.max_body_bytes, d.max_json_depth, d.body_timeout, d.header_timeout) == (1 << 20, 64, 30, 10)
    assert (d.max_header_bytes, d.keep_alive_timeout, d.max_connections) == (65536, 5, 2048)


@pytest.mark.parametrize("var,value", [("MAX_JSON_DEPTH", "0"), ("MAX_JSON_DEPTH", "501"), ("BODY_TIMEOUT", "0"),
                                       ("HEADER_TIMEOUT", "-1"), ("MAX_HEADER_BYTES", "x"), ("MAX_CONNECTIONS", "0")])
def test_bad_limit_names_the_variable(var, value):
    with pytest.raises(SettingsError, match=var):
        Settings.from_env({var: value})


# -- the HTTP layer (uvicorn options set by `python -m coordinator`) ----------------------


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    env = {"HEADER_TIMEOUT": "0.5", "MAX_HEADER_BYTES": "8192", "KEEP_ALIVE_TIMEOUT": "0.5",
           "MAX_CONNECTIONS": "3", "SSE_HEARTBEAT_INTERVAL": "0.1"}
    with ServerProcess(tmp_path_factory.mktemp("guarded"), **env) as proc:
        yield proc


def test_idle_and_dribbling_connections_are_closed(guarded):
    _, idle = raw_request(guarded.port, b"")
    assert 0.3 < idle < 5
    answer, partial = raw_request(guarded.port, b"GET /health HTTP/1.1\r\nHost: x\r\n")
    assert answer == b"" and 0.3 < partial < 5


def test_keep_alive_connection_closed_when_idle(guarded):
    answer, seconds = raw_request(guarded.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert http_status(answer) == 200 and json_body(answer) == {"status": "healthy"}
    assert 0.3 < seconds < 5


def test_oversized_head_gets_431(guarded):
    answer, _ = raw_request(guarded.port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 9000 + b"\r\n\r\n")
    assert http_status(answer) == 431 and json_body(answer) == {"detail": "Request header fields too large"}
    answer, _ = raw_request(guarded.port, b"GET /health?" + b"q" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert http_status(answer) == 431
    assert guarded.get("/health", headers={"X-Pad": "a" * 4000}).status_code == 200


def test_connections_beyond_the_limit_get_503(guarded):
    # The limit counts the connection asking, too.
    streams = [requests.get(guarded.url + "/sse/sessions", stream=True, timeout=10) for _ in range(2)]
    try:
        assert all(r.status_code == 200 for r in streams)
        assert guarded.get("/health").status_code == 503
    finally:
        for r in streams:
            r.close()
    deadline = time.monotonic() + 10  # the server notices closed streams at the next heartbeat
    while guarded.get("/health").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
