"""uvicorn's HTTP protocol with the limits it lacks for request heads and bodies.

uvicorn closes idle keep-alive connections, but a connection that has not sent a complete
request head yet has no deadline, the head's size is unbounded, and a body may trickle in for
ever: one client could hold connections for ever or fill memory with headers. This protocol
gives every request head `header_timeout` seconds (from the connection's start or the previous
response) and at most `max_header_bytes` bytes; beyond either the connection is closed (with a
431 for a head too large). A body gets `body_timeout` seconds from the end of its head: then
the app's next read of it says so (`body_timed_out`), and the app answers 408.

The body's timer is set only when a request's body is still incomplete once the data received
so far is parsed: a body that comes with its head (nearly every request) costs no timer.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

# The scope key set (True) once the body's time is up.
BODY_TIMED_OUT = "coordinator.body_timed_out"


def body_timed_out(scope: dict) -> bool:
    return scope.get(BODY_TIMED_OUT, False)


class _HeadTooLarge(Exception):
    """Raised inside the parser's callback to stop parsing."""


class GuardedHttpProtocol(HttpToolsProtocol):
    def __init__(self, *args, header_timeout: float, max_header_bytes: int, body_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self._header_timeout = header_timeout
        self._max_header_bytes = max_header_bytes
        self._body_timeout = body_timeout
        self._head_bytes = 0
        self._head_too_large = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_cycle: RequestResponseCycle | None = None  # whose body is still arriving
        self._body_timer: asyncio.TimerHandle | None = None

    def _await_head(self) -> None:
        self._head_arrived()
        self._head_timer = self.loop.call_later(self._header_timeout, self.transport.close)

    def _head_arrived(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _body_arrived(self) -> None:
        self._body_cycle = None
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_late(self) -> None:
        cycle, self._body_timer = self._body_cycle, None
        if cycle is None:
            return
        if not cycle.response_started:  # the app's next read raises the 408
            cycle.scope[BODY_TIMED_OUT] = True
            cycle.message_event.set()
        elif cycle.response_complete:  # answered without its body, which still trickles in
            self.transport.close()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._await_head()

    def connection_lost(self, exc) -> None:
        self._head_arrived()
        self._body_arrived()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._body_cycle is not None and self._body_timer is None:
            self._body_timer = self.loop.call_later(self._body_timeout, self._body_late)

    def on_response_complete(self) -> None:
        waiting = not self.pipeline  # else the next request's head is already in
        super().on_response_complete()
        if waiting and not self.transport.is_closing():
            self._await_head()

    def on_message_begin(self) -> None:
        self._head_bytes = 0
        super().on_message_begin()

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self._max_header_bytes:
            self._head_too_large = True
            raise _HeadTooLarge

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._head_arrived()
        before = self.cycle
        super().on_headers_complete()
        if self.cycle is not before:  # a request (not an upgrade to a WebSocket)
            self._body_cycle = self.cycle

    def on_message_complete(self) -> None:
        self._body_arrived()
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        # uvicorn answers every parser failure with a 400; ours deserves its own status.
        if not self._head_too_large:
            super().send_400_response(msg)
            return
        body = b'{"detail":"Request header fields too large"}'
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
        )
        self.transport.close()
