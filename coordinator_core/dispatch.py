"""Run dispatch: runners' long-polls, what wakes them and how a shutdown ends them, the periodic
checks (silent runners, unmatched runs, runs nobody will report on), callbacks, and start-up
recovery.

Dispatch is event-driven. Every waiting poll has an event; the route that commits a change a
runner must hear about sets it right after the commit: a new or returned run wakes every waiting
poll (each tries one atomic claim in the writer; losers wait again), a stop command or a
deregistration wakes that runner's polls. A waiter's event is cleared *before* each poll round,
so a wake-up that lands during a round is never lost.

A new run is offered first to the polls parked at that moment: the transaction that queues it
also claims it for the first of their runners that can take it, and the claimed run is handed
to that runner's parked poll (one commit instead of two on the way from client to runner). A
poll that stopped waiting meanwhile gets nothing: the run is given back and everyone woken.

With several processes on one database (PostgreSQL), a wake-up also goes to the others
(`Database.signal_wake`, a NOTIFY), whose listeners wake their own polls (`wake_here`); the
periodic checks run in one process only, the leader (`Database.leader`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Iterator

import anyio
from starlette.types import Receive

from coordinator_core.settings import Settings
from store import callbacks, runners, runs
from store.backend import Database
from store.models import Run
from store.stamps import now_ts

log = logging.getLogger("coordinator.dispatch")


class _Waiter:
    __slots__ = ("event", "gone", "parked", "handed")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.gone = False  # the client hung up
        self.parked = False  # waiting for its event, between two poll rounds
        self.handed: dict[str, Any] | None = None  # an outcome claimed for it by someone else

    @property
    def idle(self) -> bool:
        """Parked, and nothing has woken it yet: it may be handed an outcome."""
        return self.parked and not self.event.is_set() and not self.gone


class Dispatcher:
    def __init__(self, db: Database, settings: Settings):
        self.db = db
        self.settings = settings
        self._waiters: dict[str, set[_Waiter]] = {}
        self.closing = False  # the server is shutting down: polls are answered at once
        # Session id -> when a lifecycle check first saw it being stopped (monotonic clock).
        self._stopping_since: dict[str, float] = {}
        # Runner silence is counted from here at the earliest: a restart is not their fault. A
        # registration not seen alive since is free for a new one of its identity.
        self.started_at = now_ts()

    # -- long-polls ---------------------------------------------------------------------

    def wake(self, runner_id: str | None = None) -> None:
        """Cut waiting polls short, here and in the other processes serving the database: one
        runner's, or (None: a run became claimable) all."""
        self.wake_here(runner_id)
        self.db.signal_wake(runner_id)

    def wake_here(self, runner_id: str | None = None) -> None:
        """`wake` for this process's polls only."""
        groups = self._waiters.values() if runner_id is None else [self._waiters.get(runner_id, ())]
        for group in groups:
            for waiter in group:
                waiter.event.set()

    async def close_when(self, shutting_down: asyncio.Event) -> None:
        """Once the server shuts down, answer every held poll, and any later one, at once with
        nothing (204): the runners poll again and reach the next process, instead of being cut
        off with an error when the graceful shutdown times out."""
        await shutting_down.wait()
        self.closing = True
        self.wake_here()

    def idle_runners(self) -> list[str]:
        """Runners with a poll parked right now, in the order they began polling."""
        return [runner_id for runner_id, group in self._waiters.items() if any(w.idle for w in group)]

    async def hand_over(self, runner_id: str, run: Run) -> None:
        """Give a run claimed for `runner_id` to one of its parked polls; if none is parked any
        more, put the run back and wake everyone."""
        for waiter in self._waiters.get(runner_id, ()):
            if waiter.idle:
                waiter.handed = {"run": run}
                waiter.event.set()
                return
        await self._give_back(runner_id, {"run": run})

    @contextlib.contextmanager
    def _waiting(self, runner_id: str) -> Iterator[_Waiter]:
        waiter = _Waiter()
        self._waiters.setdefault(runner_id, set()).add(waiter)
        try:
            yield waiter
        finally:
            group = self._waiters[runner_id]
            group.discard(waiter)
            if not group:
                del self._waiters[runner_id]

    async def poll(self, runner_id: str, receive: Receive) -> dict[str, Any] | None:
        """A runner's long-poll: stop commands, a deregistration or a claimed run as soon as
        there is one, else None once RUNNER_POLL_TIMEOUT has passed (monotonic clock) or the
        server shuts down. Raises runners.UnknownRunner. Nothing is taken for a client that has
        gone away, and what was taken as it left is put back."""
        deadline = time.monotonic() + self.settings.runner_poll_timeout
        with self._waiting(runner_id) as waiter:
            watcher = asyncio.ensure_future(_watch_disconnect(receive, waiter))
            try:
                while not (waiter.gone or self.closing):
                    waiter.event.clear()
                    outcome = await self.db.write(runners.next_for_runner, runner_id, self.started_at)
                    if outcome is None:
                        waiter.parked = True
                        with anyio.move_on_after(deadline - time.monotonic()):
                            await waiter.event.wait()
                        waiter.parked = False
                        outcome, waiter.handed = waiter.handed, None
                    if outcome is not None:
                        if waiter.gone:
                            await self._give_back(runner_id, outcome)
                            return None
                        return outcome
                    if time.monotonic() >= deadline:
                        return None
                return None
            finally:
                watcher.cancel()

    async def _give_back(self, runner_id: str, outcome: dict[str, Any]) -> None:
        if "run" in outcome:
            if await self.db.write(runs.unclaim_run, outcome["run"].run_id, runner_id):
                self.wake()
        elif "stop_runs" in outcome:
            await self.db.write(runs.queue_stops, runner_id, outcome["stop_runs"])

    # -- callbacks ----------------------------------------------------------------------

    async def session_stopped(self, session_id: str) -> None:
        """After a `session_stop` via /sessions/{id}/events: deliver the parent callbacks. The event
        is stored whatever happens here, so a failure is logged, not answered."""
        try:
            created = await self.db.write(callbacks.on_session_stop, session_id)
        except Exception:
            log.exception("callbacks after session_stop of %s failed", session_id)
            return
        if created:
            self.wake()

    # -- start-up and periodic checks -----------------------------------------------------

    async def recover(self, alone: bool) -> None:
        """Start-up recovery, when this process is the only one serving the database: with
        others alive, the runs in flight are theirs, executing (README, "Running several
        coordinators")."""
        if not alone:
            log.info("run recovery skipped: other coordinators serve this database")
            return
        mode = self.settings.run_recovery_mode
        counts = await self.db.write(runs.recover_runs, mode)
        log.info(
            "run recovery (mode %s): %d claimed -> pending, %d running -> failed, %d stopping -> stopped,"
            " %d stop commands queued again",
            mode, counts["requeued"], counts["failed"], counts["stopped"], counts["stops_requeued"],
        )

    async def run(self) -> None:
        """Every RUNNER_LIFECYCLE_INTERVAL, in the leader: mark silent runners stale or remove
        them, fail pending runs whose demands nobody met in time (announced as `run_failed`),
        and settle the runs no runner will report on."""
        while True:
            await anyio.sleep(self.settings.runner_lifecycle_interval)
            if not self.db.leader:
                continue
            try:
                await self.check()
            except Exception:
                log.exception("lifecycle check failed")

    async def check(self) -> None:
        s = self.settings
        removed = await self.db.write(
            runners.update_lifecycle, s.runner_stale_threshold, s.runner_remove_threshold, self.started_at
        )
        for runner_id in removed:
            log.info("runner %s removed: no heartbeat for %g s", runner_id, s.runner_remove_threshold)
            self.wake(runner_id)
        for run in await self.db.write(runs.fail_timed_out_runs):  # each announced as `run_failed`
            log.info("run %s failed: no matching runner within %g s", run.run_id, s.run_no_match_timeout)
        if self.db.shared:
            # A claim whose answer died with the process that made it: the runner never got it.
            if requeued := await self.db.write(runs.requeue_unstarted, s.run_claim_timeout):
                log.info("runs %s pending again: not started within %g s of their claim",
                         ", ".join(requeued), s.run_claim_timeout)
                self.wake()
        await self._settle_lost_runs()

    async def _settle_lost_runs(self) -> None:
        """Settle the runs no runner will report on: those in flight whose runner is gone, and
        those of sessions stopping for RUN_STOP_TIMEOUT whose runner never sent `/stopped` (it
        had lost the run). A stop's time is not stored: the timeout counts from the first check
        that saw it."""
        now = time.monotonic()
        stopping = await self.db.read(runs.stopping_sessions)
        self._stopping_since = {session_id: self._stopping_since.get(session_id, now) for session_id in stopping}
        timeout = self.settings.run_stop_timeout
        overdue = [session_id for session_id, since in self._stopping_since.items() if now - since >= timeout]
        settled = await self.db.write(runners.settle_lost_runs, overdue)  # announced by the verb
        for run in settled.ended:
            if run.status == "failed":
                log.info("run %s failed: runner %s no longer registered", run.run_id, run.runner_id)
            else:
                log.info("run %s stopped: no stop report from runner %s", run.run_id, run.runner_id)
        if settled.resumed:
            self.wake()


async def _watch_disconnect(receive: Receive, waiter: _Waiter) -> None:
    """Flag the waiter and wake it when the client hangs up (a GET has no body to read, so
    the next message is the disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    waiter.gone = True
    waiter.event.set()
