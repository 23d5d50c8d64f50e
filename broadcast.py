"""The broadcaster: publishers hand it messages, one task fans them out to subscribers.

Publishing never waits: it appends to the task's inbox. The task stamps each message with its
cursor (the stored event id for `event` messages, else the newest event id seen so far),
encodes it once for both transports, and offers it to every matching subscriber's bounded
queue. A subscriber whose queue is full is dropped at once (its queue is cleared and it is told
why); it resumes later from the last cursor it received. So a slow subscriber costs a bounded
amount of memory and never delays anyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec

log = logging.getLogger("coordinator.broadcast")

_encoder = msgspec.json.Encoder()

# SSE `event:` names are the message types; these are all of them.
TYPES = ("init", "session_created", "session_updated", "session_deleted", "event", "run_failed")


@dataclass(frozen=True, slots=True)
class Message:
    type: str
    session_id: str | None
    cursor: int
    ws_frame: str  # `{"type": ..., **payload}`: the reference's format
    ws_frame_cursor: str  # the same with `"cursor": <cursor>` last, for resuming clients
    sse_frame: bytes  # `id: <cursor>\nevent: <type>\ndata: <payload>\n\n`


def encode(type_: str, payload: dict[str, Any], session_id: str | None, cursor: int) -> Message:
    """Encode a message once for every kind of subscriber."""
    return encode_json(type_, _encoder.encode(payload), session_id, cursor)


def encode_json(type_: str, payload_json: bytes, session_id: str | None, cursor: int) -> Message:
    head = b'{"type":"%s"' % type_.encode()
    body = payload_json[1:-1]
    ws = head + (b"," + body if body else b"") + b"}"
    return Message(
        type_,
        session_id,
        cursor,
        ws.decode(),
        (ws[:-1] + b',"cursor":%d}' % cursor).decode(),
        b"id: %d\nevent: %s\ndata: %s\n\n" % (cursor, type_.encode(), payload_json),
    )


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
