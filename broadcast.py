"""The broadcaster: publishers hand it messages, one task fans them out to subscribers.

Publishing never waits: it appends to the task's inbox. The task stamps each message with its
cursor (the stored event id for `event` messages, else the newest event id seen so far),
encodes it once (when anyone subscribes), and offers it to every matching subscriber's bounded
queue. A subscriber whose queue is full is dropped at once (its queue is cleared and it is told
why); it resumes later from the last cursor it received. So a slow subscriber costs a bounded
amount of memory and never delays anyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Any

import anyio
import msgspec

log = logging.getLogger("coordinator.broadcast")

_encoder = msgspec.json.Encoder()

# SSE `event:` names are the message types; these are all of them.
TYPES = ("init", "session_created", "session_updated", "session_deleted", "event", "run_failed")


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


class Dropped(Exception):
    """The subscriber fell behind by more than its queue holds and was disconnected."""


class TooManySubscribers(Exception):
    """The configured number of live subscribers is reached."""


class Subscriber:
    def __init__(self, size: int, session_id: str | None):
        self.session_id = session_id
        self._size = size
        self._queue: deque[Message] = deque()
        self._ready = asyncio.Event()
        self._dropped = asyncio.Event()

    def offer(self, message: Message) -> bool:
        """Queue a message; False (and the subscriber is dropped) when the queue is full."""
        if len(self._queue) >= self._size:
            self._queue.clear()
            self._dropped.set()
            self._ready.set()
            return False
        self._queue.append(message)
        self._ready.set()
        return True

    @property
    def dropped(self) -> bool:
        return self._dropped.is_set()

    async def wait_dropped(self) -> None:
        await self._dropped.wait()

    async def get(self, timeout: float | None = None) -> Message | None:
        """The next message in broadcast order, or None after `timeout` seconds without one;
        raises Dropped once the subscriber is dropped. A timer is only set when waiting."""
        while not self._queue:
            if self.dropped:
                raise Dropped
            self._ready.clear()
            if timeout is None:
                await self._ready.wait()
            else:
                with anyio.move_on_after(timeout) as idle:
                    await self._ready.wait()
                if idle.cancelled_caught:
                    return None
        if self.dropped:
            raise Dropped
        return self._queue.popleft()


class Broadcaster:
    def __init__(self, queue_size: int = 1000, cursor: int = 0, max_subscribers: int = 1000):
        self.queue_size = queue_size
        self.max_subscribers = max_subscribers
        self.cursor = cursor  # newest stored event id seen
        self._inbox: asyncio.Queue[tuple[str, dict, str | None, int | None]] = asyncio.Queue()
        self._subscribers: set[Subscriber] = set()
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
    def full(self) -> bool:
        return len(self._subscribers) >= self.max_subscribers

    def publish(
        self, type_: str, payload: dict[str, Any], session_id: str | None, event_id: int | None = None
    ) -> None:
        """Hand a message to the fan-out task; never blocks. Call from the event loop."""
        self._inbox.put_nowait((type_, payload, session_id, event_id))

    @contextlib.contextmanager
    def subscribe(self, session_id: str | None = None):
        """Register a subscriber (only messages of `session_id` if given) for the block;
        TooManySubscribers when the limit is reached."""
        if self.full:
            raise TooManySubscribers
        subscriber = Subscriber(self.queue_size, session_id)
        self._subscribers.add(subscriber)
        try:
            yield subscriber
        finally:
            self._subscribers.discard(subscriber)

    async def run(self) -> None:
        while True:
            type_, payload, session_id, event_id = await self._inbox.get()
            if event_id is not None and event_id > self.cursor:
                self.cursor = event_id
            if not self._subscribers:
                continue  # nobody to encode it for
            message = encode(type_, payload, session_id, event_id or self.cursor)
            for subscriber in list(self._subscribers):
                if subscriber.session_id is not None and subscriber.session_id != session_id:
                    continue
                if not subscriber.offer(message):
                    self._subscribers.discard(subscriber)
                    self.dropped_total += 1
                    log.warning("dropped a live subscriber: more than %d messages behind", self.queue_size)
