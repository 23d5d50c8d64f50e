"""Approvals in flight: the requests that wait for a decision, what wakes them, and time-outs.

A hook request whose tool call a rule holds for a person waits here (an asyncio wait, no thread)
until the approval is decided, its time runs out, the client hangs up or the server shuts down;
so does a client's `GET /approvals/{id}/wait`. Whoever commits a decision wakes the waiters of
that approval right after the commit. One task applies the default decision to every approval
whose time ran out, waiting or not, so a timed-out approval reads as decided everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Iterator

import anyio
from starlette.types import Receive

from store.models import Approval
from store import approvals
from store.backend import Database

if TYPE_CHECKING:
    from coordinator_core.settings import Settings

log = logging.getLogger("coordinator.approvals")

HUNG_UP = "The hook request was closed before a decision"
SHUT_DOWN = "The coordinator shut down before a decision"
RESTARTED = "The coordinator restarted before a decision"
# How a decision is told to the other processes serving the database (`Database.signal_wake`).
SIGNAL_PREFIX = "approval:"


class _Waiter:
    __slots__ = ("event", "gone")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.gone = False  # the client hung up


def _seconds_until(stamp: str) -> float:
    return (datetime.fromisoformat(stamp) - datetime.now(timezone.utc)).total_seconds()


class ApprovalBroker:
    def __init__(self, db: Database, settings: Settings):
        self.db = db
        self.settings = settings
        self._waiters: dict[str, set[_Waiter]] = {}
        self._created = asyncio.Event()  # a new approval: the time-out task looks again
        self.closing = False  # the server is shutting down: waits end at once

    def created(self) -> None:
        self._created.set()

    def waiting(self, approval_id: str) -> int:
        """How many requests wait for this approval right now."""
        return len(self._waiters.get(approval_id, ()))

    def wake(self, approval_ids) -> None:
        for approval_id in approval_ids:
            for waiter in self._waiters.get(approval_id, ()):
                waiter.event.set()

    async def decide(self, approval_id: str, decision: str, reason: str | None, decided_by: str) -> Approval:
        """A person's decision (store.errors.Conflict if it came too late); waiters answer at
        once, in this process and in the others serving the database."""
        approval = await self.db.write(approvals.decide, approval_id, decision, reason, decided_by)
        self.wake([approval_id])
        self.db.signal_wake(SIGNAL_PREFIX + approval_id)
        return approval

    def signalled(self, target: str) -> bool:
        """Wake the waiters of a decision another process signalled; False if `target` is not
        about an approval."""
        if not target.startswith(SIGNAL_PREFIX):
            return False
        self.wake([target[len(SIGNAL_PREFIX):]])
        return True

    async def time_out(self) -> None:
        s = self.settings
        decided = await self.db.write(approvals.apply_timeouts, s.approval_timeout_decision, s.approval_timeout)
        for approval in decided:
            log.info("approval %s timed out: %s by default", approval.approval_id, approval.decision)
        self.wake(approval.approval_id for approval in decided)

    @contextlib.contextmanager
    def _waiting(self, approval_id: str) -> Iterator[_Waiter]:
        waiter = _Waiter()
        self._waiters.setdefault(approval_id, set()).add(waiter)
        try:
            yield waiter
        finally:
            group = self._waiters[approval_id]
            group.discard(waiter)
            if not group:
                del self._waiters[approval_id]

    async def wait(self, approval_id: str, receive: Receive, seconds: float = math.inf) -> tuple[Approval, str | None]:
        """The approval once it is no longer pending, or as it is when the client hangs up
        ("gone"), the server shuts down ("closing") or `seconds` pass ("waited"); with that
        reason, None when decided. Its time running out is its decision (the default)."""
        deadline = anyio.current_time() + seconds
        with self._waiting(approval_id) as waiter:
            watcher = asyncio.ensure_future(_watch_disconnect(receive, waiter))
            try:
                while True:
                    waiter.event.clear()  # before reading: a decision committed after it wakes us
                    approval = await self.db.read(approvals.require_approval, approval_id)
                    if approval.status != "pending":
                        return approval, None
                    if waiter.gone or self.closing:
                        return approval, "gone" if waiter.gone else "closing"
                    left = deadline - anyio.current_time()
                    if left <= 0:
                        return approval, "waited"
                    due = _seconds_until(approval.expires_at)
                    if due <= 0:
                        await self.time_out()
                        continue
                    with anyio.move_on_after(min(left, due)):
                        await waiter.event.wait()
            finally:
                watcher.cancel()

    async def hold(self, approval_id: str, receive: Receive) -> Approval:
        """A hook request's wait: decided, or `expired` when nobody can be answered any more
        (the client hung up, or the server shuts down and answers it at once)."""
        approval, ended = await self.wait(approval_id, receive)
        if ended is not None:
            approval = await self.db.write(approvals.expire, approval_id, HUNG_UP if ended == "gone" else SHUT_DOWN)
            log.info("approval %s expired: %s", approval_id, approval.reason)
        return approval

    async def expire_held(self, alone: bool) -> None:
        """At start-up: approvals held by the requests of a previous process cannot be answered.
        Beside other live processes serving the database, pending approvals may be theirs."""
        if not alone:
            return
        count = await self.db.write(approvals.expire_held, RESTARTED)
        if count:
            log.info("%d pending approvals expired: their hook requests ended with the previous process", count)

    async def close_when(self, shutting_down: asyncio.Event) -> None:
        """Once the server shuts down, every wait ends at once (see `hold`, `wait`)."""
        await shutting_down.wait()
        self.closing = True
        self.wake(list(self._waiters))

    async def run(self) -> None:
        """Apply the default decision to each approval when its time runs out."""
        while True:
            self._created.clear()
            try:
                due = await self.db.read(approvals.next_expiry)
                if due is not None and _seconds_until(due) <= 0:
                    await self.time_out()
                    continue
            except Exception:
                log.exception("applying approval time-outs failed")
                await anyio.sleep(1)
                continue
            with anyio.move_on_after(math.inf if due is None else _seconds_until(due)):
                await self._created.wait()


async def _watch_disconnect(receive: Receive, waiter: _Waiter) -> None:
    """Flag the waiter and wake it when the client hangs up (its body was read already, so the
    next message is the disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    waiter.gone = True
    waiter.event.set()
