"""Fan-out: K WebSocket subscribers while events are posted at a fixed rate; delivery latency
(post → receipt) and lost messages. `python -m bench.fanout [--quick]` runs it on its own."""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import socket
import time
from dataclasses import dataclass

import msgspec

from bench.harness import LOAD_CPU, Server, exchange, percentile, pin_to, ports_of, request_bytes


class _Data(msgspec.Struct):
    tool_input: dict


class _Frame(msgspec.Struct):
    type: str
    data: _Data | None = None


_decode = msgspec.json.Decoder(_Frame).decode


def event_body(session_id: str, seq: int) -> bytes:
    """A realistic ~1 KB post_tool event carrying its send time."""
    return msgspec.json.encode({
        "event_type": "post_tool", "session_id": session_id, "timestamp": "2025-01-01T00:00:00.000000+00:00",
        "tool_name": "Bash", "tool_input": {"command": "ls -la /work/project/src", "seq": seq, "t": time.time()},
        "tool_output": "total 96\n" + "-rw-r--r-- 1 user user 4096 Jan  1 00:00 file.py\n" * 16,
    })


async def _open_ws(port: int, path: str, rcvbuf: int | None = None):
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    await reader.readuntil(b"\r\n\r\n")
    return reader, writer


async def _read_frames(reader, on_event, ready: asyncio.Semaphore) -> None:
    """Minimal frame reader (server frames are unmasked): calls on_event(seq, sent_at);
    releases `ready` once `init` is in."""
    first = True
    while True:
        header = await reader.readexactly(2)
        size = header[1] & 0x7F
        if size >= 126:
            size = int.from_bytes(await reader.readexactly(2 if size == 126 else 8), "big")
        payload = await reader.readexactly(size)
        if header[0] & 0x0F == 0x8:
            return
        frame = _decode(payload)
        if first:
            first = False
            ready.release()
        if frame.type == "event" and frame.data is not None:
            on_event(frame.data.tool_input["seq"], frame.data.tool_input["t"])


@dataclass
class FanoutResult:
    subscribers: int
    posted: int
    latencies_ms: list[float]
    lost: int
    post_errors: int
    probed: float | None  # what `probe` returned while every subscriber was still connected


async def _fanout(port: int | list[int], subscribers: int, rate: float, seconds: float, stalled: int,
                  probe) -> FanoutResult:
    ports = ports_of(port)
    session_id = "ses_fanout"
    reader, writer = await asyncio.open_connection("127.0.0.1", ports[0])
    writer.write(request_bytes("POST", "/sessions", msgspec.json.encode({"session_id": session_id})))
    await reader.readuntil(b"\r\n\r\n")  # 200 or 409 (exists): either way the session is there
    writer.close()

    latencies: list[float] = []
    seen = [set() for _ in range(subscribers)]
    tasks, conns = [], []
    ready = asyncio.Semaphore(0)
    stalled_conns = [await _open_ws(ports[n % len(ports)], "/ws", rcvbuf=4096) for n in range(stalled)]
    for index in range(subscribers):
        r, w = await _open_ws(ports[index % len(ports)], "/ws")
        conns.append((r, w))  # a writer that is garbage-collected closes its connection

        def on_event(seq, sent_at, index=index):
            latencies.append((time.time() - sent_at) * 1000)
            seen[index].add(seq)

        tasks.append(asyncio.ensure_future(_read_frames(r, on_event, ready)))
    for _ in range(subscribers):  # everyone has its init: the stream is live
        await ready.acquire()

    posters = [await asyncio.open_connection("127.0.0.1", ports[n % len(ports)]) for n in range(4)]
    locks = [asyncio.Lock() for _ in posters]
    errors = 0

    async def post(seq: int) -> None:
        nonlocal errors
        r, w = posters[seq % len(posters)]
        async with locks[seq % len(posters)]:
            status, _ = await exchange(r, w, request_bytes("POST", f"/sessions/{session_id}/events",
                                                           event_body(session_id, seq)))
            errors += status != 200

    total = int(rate * seconds)
    start = time.perf_counter()
    pending = []
    for seq in range(total):
        delay = start + seq / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        pending.append(asyncio.ensure_future(post(seq)))
    await asyncio.gather(*pending)
    deadline = time.perf_counter() + 10
    while any(len(s) < total for s in seen) and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)
    probed = probe() if probe else None
    for task in tasks:
        task.cancel()
    for _, w in posters + stalled_conns + conns:
        w.close()
    lost = sum(total - len(s) for s in seen)
    return FanoutResult(subscribers, total, latencies, lost, errors, probed)


def fanout(port: int | list[int], subscribers: int, rate: float = 200, seconds: float = 5, stalled: int = 0,
           probe=None) -> FanoutResult:
    return asyncio.run(_fanout(port, subscribers, rate, seconds, stalled, probe))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a few seconds, for smoke tests")
    parser.add_argument("--rate", type=float, default=200, help="events per second")
    args = parser.parse_args()
    pin_to(LOAD_CPU)
    seconds = 1 if args.quick else 5
    sizes = (1, 10) if args.quick else (1, 50, 200)
    print(f"{'subscribers':>11} {'stalled':>7} {'events':>6} {'p50 ms':>7} {'p99 ms':>7} {'lost':>5}")
    with Server() as server:
        for k in sizes:
            for stalled in (0, 1):
                r = fanout(server.port, k, args.rate, seconds, stalled)
                print(f"{k:>11} {stalled:>7} {r.posted:>6} {percentile(r.latencies_ms, 50):>7.1f}"
                      f" {percentile(r.latencies_ms, 99):>7.1f} {r.lost:>5}")


if __name__ == "__main__":
    main()
