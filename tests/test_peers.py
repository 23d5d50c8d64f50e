"""Slow and vanishing peers: a WebSocket that stops reading, streams dropped mid-replay or while
idle, runners whose long-poll connection drops. None of them leaks a subscriber or a waiter,
and no run is lost to a poll nobody is waiting for any more."""

import contextlib
import socket
import struct
import threading

import pytest
import requests
from websockets.sync.client import connect

from runner_client import registered, start_run, wait_for
from test_live import StalledClient, recv
from test_sessions import create, event

PAD = "x" * 2000


def subscribers(server) -> int:
    return server.state.broadcaster.subscriber_count


def store_events(server, sid: str, count: int) -> None:
    create(server, sid)
    for i in range(count):
        assert server.post(f"/sessions/{sid}/events", event(sid, tool_input={"i": i, "pad": PAD})).status_code == 200


def test_websocket_that_stops_reading_is_dropped(make_server):
    srv = make_server(broadcast_queue_size=4)
    create(srv, "s")
    stalled = StalledClient(srv.port, "/ws")
    try:
        wait_for(lambda: subscribers(srv) == 1, what="the subscription")
        for i in range(200):  # bounded: the queue holds 4, the socket buffers a few hundred KB
            srv.post("/sessions/s/events", event("s", tool_input={"i": i, "pad": PAD * 10}))
            if srv.state.broadcaster.dropped_total:
                break
        assert srv.state.broadcaster.dropped_total == 1
        wait_for(lambda: subscribers(srv) == 0, what="the stalled subscriber to go")
    finally:
        stalled.close()
    with connect(srv.ws_url + "/ws") as ws:  # the next client is served as usual
        assert recv(ws)["type"] == "init"


def hang_up(peer: StalledClient) -> None:
    """Vanish without a close frame: the connection is reset."""
    peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()


def test_websocket_gone_without_a_close_frame(server):
    peers = [StalledClient(server.port, "/ws") for _ in range(5)]
    wait_for(lambda: subscribers(server) == 5, what="the subscriptions")
    for peer in peers:
        hang_up(peer)
    wait_for(lambda: subscribers(server) == 0, what="the reset peers to go")


@pytest.mark.parametrize("transport", ["ws", "sse"])
def test_client_leaving_mid_replay(server, transport):
    store_events(server, "s", 600)  # over a megabyte of replay, several pages
    if transport == "ws":
        peer = StalledClient(server.port, "/ws?since=0")
        frames = peer.frames()
        assert next(frames)[0] == next(frames)[0] == 0x1  # init, then the first replayed event
        hang_up(peer)
    else:
        with requests.get(server.url + "/sse/sessions", headers={"Last-Event-ID": "0"}, stream=True, timeout=10) as r:
            assert next(r.iter_content(4096))
    wait_for(lambda: subscribers(server) == 0, what="the replay to stop")
    assert server.get("/health").status_code == 200


def test_sse_clients_leaving_while_idle(make_server):
    srv = make_server(sse_heartbeat_interval=0.1)
    streams = [requests.get(srv.url + "/sse/sessions", stream=True, timeout=10) for _ in range(5)]
    # Each line iterator is kept: dropping one closes its connection.
    readers = [r.iter_lines() for r in streams]
    for lines in readers:
        assert next(lines).startswith(b"id: ")  # init
    wait_for(lambda: subscribers(srv) == 5, what="the subscriptions")
    for r in streams:
        r.close()
    wait_for(lambda: subscribers(srv) == 0, what="the departed streams to go")  # no write needed


def test_dropped_runner_polls_lose_no_run(make_server):
    srv = make_server(runner_poll_timeout=5)
    runners = [registered(srv, hostname=f"host-{i}") for i in range(3)]

    def give_up(runner):
        with pytest.raises(requests.ReadTimeout):
            runner.poll(timeout=0.2)

    with contextlib.ExitStack() as stack:
        for runner in runners:
            stack.enter_context(runner.http)
        for _ in range(3):
            # Every runner's poll is given up by its client; a run is queued at once, before
            # the server has necessarily noticed.
            threads = [threading.Thread(target=give_up, args=(r,)) for r in runners]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=10)
            created = start_run(srv)
            wait_for(lambda: not srv.state.dispatcher._waiters, what="the abandoned polls to end")
            assert srv.get(f"/runs/{created['run_id']}").json()["status"] == "pending"
            assert runners[0].next_run()["run_id"] == created["run_id"]
            assert srv.get(f"/runs/{created['run_id']}").json()["runner_id"] == runners[0].runner_id
