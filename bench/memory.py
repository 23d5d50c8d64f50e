"""Live-stream memory: the coordinator's RSS idle, while healthy subscribers stream, and while
subscribers that never read replay large stored events from the start (`/ws?since=0`).
`python -m bench.memory [--quick]` runs it on its own; `bench.run` includes it.

What a stalled replay may hold is bounded by `SUBSCRIBER_BUFFER_BYTES` (a page of the log per
subscriber), not by what is stored: the stored events are made larger than that budget."""

from __future__ import annotations

import argparse
import socket
import time
from dataclasses import dataclass

import msgspec

from bench.fanout import fanout
from bench.harness import LOAD_CPU, Server, current_rss_mb, fetch_all, pin_to, request_bytes

BIG_SESSION = "ses_big"


@dataclass
class LiveMemory:
    """RSS in MB at each step."""

    healthy_subscribers: int
    stalled_subscribers: int
    stored_mb: float
    event_kib: int
    idle: float
    healthy: float  # while the healthy subscribers are connected, after receiving 200 events/s
    stored: float  # once the large events are stored (nobody connected)
    stalled: float  # the highest while the stalled subscribers hang in their replay


def _stalled_ws(port: int, path: str) -> socket.socket:
    """A WebSocket peer that sends its handshake and never reads anything."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    return sock


def _highest_until_flat(sample, flat_for: float, at_most: float) -> float:
    """Sample until the highest value has not risen for `flat_for` seconds (or `at_most` passed)."""
    start = last_rise = time.monotonic()
    highest = sample()
    while time.monotonic() - last_rise < flat_for and time.monotonic() - start < at_most:
        time.sleep(0.05)
        value = sample()
        if value > highest + 0.5:  # MB; smaller moves are the allocator's
            last_rise = time.monotonic()
        highest = max(highest, value)
    return highest


def big_event(seq: int, kib: int) -> bytes:
    return msgspec.json.encode({
        "event_type": "post_tool", "session_id": BIG_SESSION, "timestamp": "2025-01-01T00:00:00.000000+00:00",
        "tool_name": "Bash", "tool_input": {"command": f"cat big-{seq}.log"}, "tool_output": "z" * (kib * 1024),
    })


def live_memory(server: Server, healthy: int = 200, stalled: int = 8, stored_mb: float = 8,
                event_kib: int = 64, seconds: float = 4, flat_for: float = 2) -> LiveMemory:
    """On a fresh server (nothing stored yet)."""
    rss = lambda: current_rss_mb(server.pid)  # noqa: E731
    idle = rss()
    with_healthy = fanout(server.port, healthy, 200, seconds, probe=rss).probed
    count = int(stored_mb * 1024 / event_kib)
    raws = [request_bytes("POST", "/sessions", msgspec.json.encode({"session_id": BIG_SESSION}))]
    raws += [request_bytes("POST", f"/sessions/{BIG_SESSION}/events", big_event(n, event_kib)) for n in range(count)]
    statuses = {status for status, _ in fetch_all(server.port, raws)}
    assert statuses == {200}, f"storing the large events answered {statuses}"
    stored = rss()
    peers = [_stalled_ws(server.port, "/ws?since=0") for _ in range(stalled)]
    try:
        highest = _highest_until_flat(rss, flat_for, 30)
    finally:
        for peer in peers:
            peer.close()
    return LiveMemory(healthy, stalled, count * event_kib / 1024, event_kib, idle, with_healthy, stored, highest)


def describe(m: LiveMemory) -> str:
    return (f"idle {m.idle:.0f} MB, {m.healthy:.0f} MB with {m.healthy_subscribers} subscribers streaming, "
            f"{m.stored:.0f} MB with {m.stored_mb:g} MB of {m.event_kib} KiB events stored, "
            f"{m.stalled:.0f} MB at most while {m.stalled_subscribers} subscribers that never read replay "
            f"them from the start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds: fewer subscribers, less stored")
    args = parser.parse_args()
    pin_to(LOAD_CPU)
    with Server() as server:
        if args.quick:
            print(describe(live_memory(server, 20, 2, 2, seconds=0.5, flat_for=0.5)))
        else:
            print(describe(live_memory(server)))


if __name__ == "__main__":
    main()
