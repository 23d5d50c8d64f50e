"""uvicorn's HTTP protocol with the two limits it lacks for request heads.

uvicorn closes idle keep-alive connections, but a connection that has not sent a complete
request head yet has no deadline, and the head's size is unbounded: one client could hold
connections for ever or fill memory with headers. This protocol gives every request head
`header_timeout` seconds (from the connection's start or the previous response) and at most
`max_header_bytes` bytes; beyond either the connection is closed (with a 431 for a head too
large).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class _HeadTooLarge(Exception):
    """Raised inside the parser's callback to stop parsing."""


class GuardedHttpProtocol(HttpToolsProtocol):
    def __init__(self, *args, header_timeout: float, max_header_bytes: int, **kwargs):
        super().__init__(*args, **kwargs)
        self._header_timeout = header_timeout
        self._max_header_bytes = max_header_bytes
        self._head_bytes = 0
        self._head_too_large = False
        self._head_timer: asyncio.TimerHandle | None = None

    def _await_head(self) -> None:
        self._head_arrived()
        self._head_timer = self.loop.call_later(self._header_timeout, self.transport.close)

    def _head_arrived(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._await_head()

    def connection_lost(self, exc) -> None:
        self._head_arrived()
        super().connection_lost(exc)

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
        super().on_headers_complete()

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
