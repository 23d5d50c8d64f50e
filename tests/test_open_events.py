"""Open events: the keys a client sends beyond the known ones are kept verbatim and given back,
after the known keys, in the GET routes, live messages and replays; clients that send only the
known keys see exactly what they saw before."""

import json
from pathlib import Path

import requests
from websockets.sync.client import connect

from test_sessions import create

FIXTURES = Path(__file__).parent / "fixtures"
# The answers of the code before open events, for this very request sequence (see the test).
BASELINE = json.loads((FIXTURES / "known_keys_baseline.json").read_text())

KNOWN_ONLY = {
    "event_type": "post_tool", "session_id": "ses_fixed", "timestamp": "2025-01-01T00:00:00.000000+00:00",
    "tool_name": "Bash", "tool_input": {"command": "ls -l", "n": 1.50}, "tool_output": ["a", {"b": None}],
    "error": None, "exit_code": 0, "reason": "", "role": None, "content": [{"type": "text", "text": "caf\u00e9 \u2603"}],
}


def first_sse_frame(server, path: str, **headers) -> str:
    with requests.get(server.url + path, headers=headers, stream=True, timeout=10) as r:
        frame = b""
        for chunk in r.iter_content(1):
            frame += chunk
            if frame.endswith(b"\n\n"):
                return frame.decode()
    raise AssertionError("stream ended without a frame")


def test_known_keys_only_answers_are_byte_for_byte_unchanged(server):
    server.post("/sessions", {"session_id": "ses_fixed"})
    with connect(server.ws_url + "/ws") as plain, connect(server.ws_url + "/ws?since=0") as resuming:
        plain.recv(timeout=10)
        resuming.recv(timeout=10)
        resuming.recv(timeout=10)  # session_created, replayed
        assert server.post("/sessions/ses_fixed/events", KNOWN_ONLY).status_code == 200
        assert plain.recv(timeout=10) == BASELINE["ws"]
        assert resuming.recv(timeout=10) == BASELINE["ws_since"]
    assert server.get("/sessions/ses_fixed/events").text == BASELINE["get"]
    assert server.get("/events/ses_fixed").text == BASELINE["legacy"]
    assert server.get("/sessions/ses_fixed/events?after=0&limit=5").text == BASELINE["page"]
    assert first_sse_frame(server, "/sse/sessions?session_id=ses_fixed", **{"Last-Event-ID": "1"}) == BASELINE["sse_replay"]
    with connect(server.ws_url + "/ws?since=1") as replay:
        replay.recv(timeout=10)
        assert replay.recv(timeout=10) == BASELINE["ws_replay"]


# Sent as these bytes: values keep their spelling (1.50, the escape, the spaces) and their order.
EXTRA = b'"zeta":1.50,"alpha":{"b": [1, 2]},"uni":"caf\\u00e9","none":null'
BODY = b'{"event_type":"note","session_id":"ses_x","timestamp":"2025-01-01T00:00:01Z",' + EXTRA + b',"id":99}'
KNOWN_TAIL = b'"reason":null,"role":null,"content":null'


def test_extra_keys_kept_verbatim_after_the_known_keys_everywhere(server):
    create(server, "ses_x")
    with connect(server.ws_url + "/ws") as live:
        live.recv(timeout=10)
        r = requests.post(server.url + "/sessions/ses_x/events", data=BODY, timeout=10)
        assert r.status_code == 200 and r.json() == {"ok": True}
        frame = live.recv(timeout=10).encode()
    # `id` is the stored event's own key: a client's `id` is dropped, as before.
    assert frame.endswith(KNOWN_TAIL + b"," + EXTRA + b"}}")
    assert b'"id"' not in frame
    assert list(json.loads(frame)["data"])[-4:] == ["zeta", "alpha", "uni", "none"]

    for path in ("/sessions/ses_x/events", "/events/ses_x", "/sessions/ses_x/events?after=0"):
        body = server.get(path).content
        assert body.endswith(KNOWN_TAIL + b"," + EXTRA + b"}]}"), (path, body)
        assert body.count(b'"id"') == 1
        (stored,) = json.loads(body)["events"]
        assert stored["zeta"] == 1.5 and stored["alpha"] == {"b": [1, 2]} and stored["uni"] == "caf\u00e9"

    with connect(server.ws_url + "/ws?since=1") as replay:
        replay.recv(timeout=10)
        assert replay.recv(timeout=10).encode().endswith(KNOWN_TAIL + b"," + EXTRA + b'},"cursor":2}')
    sse = first_sse_frame(server, "/sse/sessions", **{"Last-Event-ID": "1"}).encode()
    assert sse.startswith(b"id: 2\nevent: event\n") and sse.endswith(KNOWN_TAIL + b"," + EXTRA + b"}}\n\n")


def test_legacy_route_keeps_extra_keys_too(server):
    body = b'{"event_type":"session_start","session_id":"ses_l","timestamp":"t","source":"startup"}'
    assert requests.post(server.url + "/events", data=body, timeout=10).status_code == 200
    (stored,) = server.get("/events/ses_l").json()["events"]
    assert list(stored)[-1] == "source" and stored["source"] == "startup"


def test_extra_value_that_is_not_utf8_is_refused(server):
    create(server, "ses_u")
    body = b'{"event_type":"x","session_id":"ses_u","timestamp":"t","bad":"\xff"}'
    r = requests.post(server.url + "/sessions/ses_u/events", data=body, timeout=10)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body"]
    assert server.get("/sessions/ses_u/events").json() == {"events": []}
