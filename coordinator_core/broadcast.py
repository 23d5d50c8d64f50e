"""The broadcaster: one task fans the committed change log out to live subscribers.

The store hands it the changes of each commit in commit order (`committed`, from the writer
thread); the task offers each, as one `Message` with its cursor, to every live subscriber whose
filter matches. A subscriber that resumes from an older cursor is not live at first: it reads
the log back from the store page by page, as fast as its socket drains, until it has reached
the newest change fanned out, and becomes live at that point without an await in between, so
it gets every change once, in cursor order (`follow`).

Each live subscriber has a queue bounded in messages and in bytes. One that falls further
behind is dropped at once (its queue is freed and it is told why); it resumes later from the
last cursor it received. So a slow subscriber costs a bounded amount of memory and never delays
anyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Any, AsyncIterator, Awaitable, Callable

import anyio
import msgspec

from store.changes import Change, Page

log = logging.getLogger("coordinator.broadcast")

_encoder = msgspec.json.Encoder()

# SSE `event:` names are the message types; these are all of them.
TYPES = (
    "init", "session_created", "session_updated", "session_deleted", "event", "run_failed", "replay_gap",
    "approval_requested", "approval_decided",
)

# What a queued message costs beyond its payload (its frame's type, cursor and the objects).
MESSAGE_OVERHEAD = 200

ReadPage = Callable[[int, int, "str | None", int], Awaitable[Page]]


class Message:
    """A message as every kind of subscriber receives it. Each transport's frame is built on
    first use and then shared by all subscribers of that kind: a message (an `init` of a large
    session list above all) is never copied per subscriber, nor for a transport nobody uses."""

    __slots__ = ("type", "session_id", "cursor", "payload", "_ws", "_ws_cursor", "_sse")

    def __init__(self, type_: str, session_id: str | None, cursor: int, payload_json: bytes):
        self.type = type_
        self.session_id = session_id
        self.cursor = cursor
        self.payload = payload_json
        self._ws: str | None = None
        self._ws_cursor: str | None = None
        self._sse: bytes | None = None

    @property
    def size(self) -> int:
        """Bytes it holds in a queue, counted against the subscriber's budget."""
        return len(self.payload) + MESSAGE_OVERHEAD

    def _ws_bytes(self) -> bytes:
        body = self.payload[1:-1]
        return b'{"type":"%s"' % self.type.encode() + (b"," + body if body else b"") + b"}"

    @property
    def ws_frame(self) -> str:
        """`{"type": ..., **payload}`: the reference's format."""
        if self._ws is None:
            self._ws = self._ws_bytes().decode()
        return self._ws

    @property
    def ws_frame_cursor(self) -> str:
        """The same with `"cursor": <cursor>` last, for resuming clients."""
        if self._ws_cursor is None:
            self._ws_cursor = (self._ws_bytes()[:-1] + b',"cursor":%d}' % self.cursor).decode()
        return self._ws_cursor

    @property
    def sse_frame(self) -> bytes:
        """`id: <cursor>\nevent: <type>\ndata: <payload>\n\n`"""
        if self._sse is None:
            self._sse = b"id: %d\nevent: %s\ndata: %s\n\n" % (self.cursor, self.type.encode(), self.payload)
        return self._sse


def encode(type_: str, payload: dict[str, Any], session_id: str | None, cursor: int) -> Message:
    return Message(type_, session_id, cursor, _encoder.encode(payload))


class Ended(Exception):
    """The subscription ended: the subscriber fell behind by more than its queue holds
    (`dropped`), or the server is shutting down (`shutdown`)."""


class TooManySubscribers(Exception):
    """The configured number of live subscribers is reached."""


class Subscriber:
    """One client's position in the log (`cursor`: the last change it was given) and, once
    live, its queue of messages not yet sent."""

    def __init__(self, session_id: str | None, cursor: int, max_messages: int, max_bytes: int):
        self.session_id = session_id
        self.cursor = cursor
        self.live = False
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        self._queue: deque[Message] = deque()
        self.buffered_bytes = 0  # the queue's messages, or the replay page not yet sent
        self.ended: str | None = None  # why it ended: "dropped" or "shutdown"
        self._ready = asyncio.Event()
        self._ended = asyncio.Event()

    def offer(self, message: Message) -> bool:
        """Queue a message; False (and the subscriber is dropped) when that would pass the bound
        in messages or in bytes. A message alone in the queue always fits, however large."""
        if self._queue and (
            len(self._queue) >= self._max_messages or self.buffered_bytes + message.size > self._max_bytes
        ):
            self.end("dropped")
            return False
        self._queue.append(message)
        self.buffered_bytes += message.size
        self._ready.set()
        return True

    def end(self, reason: str) -> None:
        """End the subscription (its queue is freed); the first reason given stays."""
        if self.ended is None:
            self.ended = reason
            self._queue.clear()
            self.buffered_bytes = 0
            self._ended.set()
            self._ready.set()

    async def wait_ended(self) -> None:
        await self._ended.wait()

    async def get(self, timeout: float | None = None) -> Message | None:
        """The next message in broadcast order, or None after `timeout` seconds without one;
        raises Ended once the subscription ended. A timer is only set when waiting."""
        while not self._queue:
            if self.ended:
                raise Ended(self.ended)
            self._ready.clear()
            if timeout is None:
                await self._ready.wait()
            else:
                with anyio.move_on_after(timeout) as idle:
                    await self._ready.wait()
                if idle.cancelled_caught:
                    return None
        if self.ended:
            raise Ended(self.ended)
        message = self._queue.popleft()
        self.buffered_bytes -= message.size
        return message


class Broadcaster:
    """`read_page(after, upto, session_id, max_bytes)` reads the committed log back (see
    `store.changes.page`); `cursor` is the newest change fanned out."""

    def __init__(
        self,
        read_page: ReadPage,
        cursor: int = 0,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        queue_size: int = 1000,
        buffer_bytes: int = 4 * 1024 * 1024,
        max_subscribers: int = 1000,
        resume_wait: float = 0.0,
    ):
        self.cursor = cursor
        # Seconds a resume cursor beyond `cursor` may wait for it (`reach`): with several
        # processes on one database, one handed out by another may be a moment ahead of this one.
        self.resume_wait = resume_wait
        self._advanced: asyncio.Event | None = None  # set once `cursor` moves, for `reach`
        self.queue_size = queue_size
        self.buffer_bytes = buffer_bytes
        self.max_subscribers = max_subscribers
        self._read_page = read_page
        self._inbox: asyncio.Queue[list[Change]] = asyncio.Queue()
        self._loop = loop
        self._subscribers: set[Subscriber] = set()
        self._live: set[Subscriber] = set()
        self._none = asyncio.Event()  # set while nobody subscribes
        self._none.set()
        self.dropped_total = 0
        self._init: Message | None = None

    def init_message(self, sessions_json: bytes, cursor: int) -> Message:
        """The unfiltered `init` (`sessions_json` is `{"sessions": [...]}`): one message, shared
        by every subscriber that joins while the list and the cursor stay the same."""
        if self._init is None or self._init.cursor != cursor or self._init.payload != sessions_json:
            self._init = Message("init", None, cursor, sessions_json)
        return self._init

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    @property
    def buffered_bytes(self) -> int:
        """What the subscribers hold, in bytes: live ones their queues, the others their page."""
        return sum(subscriber.buffered_bytes for subscriber in self._subscribers)

    @property
    def full(self) -> bool:
        return len(self._subscribers) >= self.max_subscribers

    def committed(self, changes: list[Change]) -> None:
        """The changes of one commit, in order; from any thread, called in commit order."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            self._loop.call_soon_threadsafe(self._inbox.put_nowait, changes)

    async def reach(self, cursor: int) -> None:
        """Until changes up to `cursor` have been fanned out here, for `resume_wait` seconds at
        most (a cursor from another database never comes)."""
        with anyio.move_on_after(self.resume_wait):
            while self.cursor < cursor:
                if self._advanced is None:
                    self._advanced = asyncio.Event()
                await self._advanced.wait()

    @contextlib.contextmanager
    def subscribe(self, session_id: str | None = None, since: int | None = None):
        """Register a subscriber (only changes of `session_id` if given) for the block: live at
        once, or, with `since`, after catching up from that cursor. TooManySubscribers when the
        limit is reached."""
        if self.full:
            raise TooManySubscribers
        # A cursor beyond the newest (from another database, say) resumes from the newest.
        cursor = self.cursor if since is None else min(since, self.cursor)
        subscriber = Subscriber(session_id, cursor, self.queue_size, self.buffer_bytes)
        self._subscribers.add(subscriber)
        self._none.clear()
        self._go_live_if_current(subscriber)
        try:
            yield subscriber
        finally:
            self._subscribers.discard(subscriber)
            self._live.discard(subscriber)
            if not self._subscribers:
                self._none.set()

    def _go_live_if_current(self, subscriber: Subscriber) -> bool:
        if subscriber.cursor >= self.cursor:
            subscriber.live = True
            self._live.add(subscriber)
        return subscriber.live

    async def follow(self, subscriber: Subscriber, idle: float | None = None) -> AsyncIterator[Message | None]:
        """Everything after the subscriber's cursor: the stored log until it is current, then
        live messages (None after each `idle` seconds without one). Raises Ended."""
        known_deleted: int | None = None
        while not self._go_live_if_current(subscriber):
            if subscriber.ended:
                raise Ended(subscriber.ended)
            upto = self.cursor
            # Only as much as the byte budget holds; the next page once this one is sent.
            page = await self._read_page(subscriber.cursor, upto, subscriber.session_id, self.buffer_bytes)
            if page.max_deleted > subscriber.cursor and page.max_deleted != known_deleted:
                earliest = page.changes[0].cursor if page.changes else None
                gap = {"since": subscriber.cursor, "earliest": earliest}
                yield Message("replay_gap", subscriber.session_id, subscriber.cursor, _encoder.encode(gap))
            known_deleted = page.max_deleted
            subscriber.buffered_bytes = sum(len(change.payload) for change in page.changes)
            for change in page.changes:
                subscriber.cursor = change.cursor
                yield Message(change.type, change.session_id, change.cursor, change.payload)
                subscriber.buffered_bytes -= len(change.payload)
            if page.complete:
                subscriber.cursor = max(subscriber.cursor, upto)
        while True:
            yield await subscriber.get(idle)

    async def close_when(self, shutting_down: asyncio.Event) -> None:
        """Once the server shuts down, end every subscription: clients resume on the next
        process instead of holding this one up until its graceful shutdown times out."""
        await shutting_down.wait()
        for subscriber in list(self._subscribers):
            subscriber.end("shutdown")

    async def wait_unsubscribed(self) -> None:
        """Until nobody subscribes (every transport said goodbye)."""
        await self._none.wait()

    async def run(self) -> None:
        while True:
            for change in await self._inbox.get():
                self._fan_out(change)
            if self._advanced is not None:
                self._advanced.set()
                self._advanced = None

    def _fan_out(self, change: Change) -> None:
        if change.cursor <= self.cursor:
            return  # committed before the start cursor was read
        self.cursor = change.cursor
        if not self._live:
            return  # nobody to encode it for
        payload = change.payload if isinstance(change.payload, bytes) else _encoder.encode(change.payload)
        message = Message(change.type, change.session_id, change.cursor, payload)
        for subscriber in list(self._live):
            if subscriber.session_id is not None and subscriber.session_id != change.session_id:
                continue
            if not subscriber.offer(message):
                self._live.discard(subscriber)
                self.dropped_total += 1
                log.warning("dropped a live subscriber: its queue passed %d messages or %d bytes",
                            self.queue_size, self.buffer_bytes)
