"""Agent Coordinator: the app factory, its lifespan, and the command line.

`python -m coordinator [--host H] [--port P]` serves the API; every setting comes from the
environment once, at start-up (see README, "Configuration"). `python -m coordinator backup PATH`
writes a consistent copy of the SQLite database, also while the server runs; `python -m
coordinator copy-db --to URL` copies it into an empty PostgreSQL database.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import logging
import sys
from pathlib import Path

import anyio
import apsw
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware

from coordinator_core import logs
from coordinator_core.auth import BearerAuth
from coordinator_core.broadcast import Broadcaster
from coordinator_core.cors import Cors
from coordinator_core.dispatch import Dispatcher
from coordinator_core.http_guard import GuardedHttpProtocol
from coordinator_core.logs import RequestLog, log_request
from coordinator_core.settings import Settings, SettingsError, parse_database_url, redact_url
from routes import agents, approvals, errors, health, hooks, live, metrics, openapi, page, runner, runs, sessions
from routes.approval_broker import ApprovalBroker
from store import backup, changes, retention
from store.agents import remove_leftovers
from store.backend import open_database
from store.errors import DatabaseUnusable

log = logging.getLogger("coordinator")

# Seconds a live subscriber resuming from a cursor this process has not fanned out yet waits for
# it (another process handed it out a moment ago), before it is taken as beyond the newest.
RESUME_WAIT = 2.0


def create_app(settings: Settings | None = None) -> Starlette:
    """Build the ASGI app; the store and background tasks live only inside its lifespan."""
    settings = settings or Settings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        cache_bytes = int(settings.read_cache_mb * 1024 * 1024)
        db = await anyio.to_thread.run_sync(open_database, settings, cache_bytes)
        await anyio.to_thread.run_sync(remove_leftovers, settings.agents_dir)
        broadcaster = Broadcaster(
            functools.partial(db.read, changes.page),
            loop=asyncio.get_running_loop(),
            queue_size=settings.broadcast_queue_size,
            buffer_bytes=settings.subscriber_buffer_bytes,
            max_subscribers=settings.max_subscribers,
            resume_wait=RESUME_WAIT if db.shared else 0.0,
        )
        # Changes handed over before this assignment wait in the loop until the broadcaster runs.
        broadcaster.cursor = await anyio.to_thread.run_sync(db.start_changes, broadcaster.committed)
        app.state.settings = settings
        app.state.db = db
        app.state.broadcaster = broadcaster
        if settings.metrics_enabled:
            app.state.metrics = metrics.Metrics(app.state)
            db.on_write = app.state.metrics.observe_write
        app.state.dispatcher = dispatcher = Dispatcher(db, settings)
        app.state.approvals = approval_broker = ApprovalBroker(db, settings)
        # Set once the server begins to shut down (see Server): held polls and streams end then.
        app.state.shutting_down = asyncio.Event()
        # Wake-ups from the other processes serving the database (a runner id, None: all runners,
        # or an approval decided) arrive on a thread of the store.
        def woken(target: str | None) -> None:
            if target is None or not approval_broker.signalled(target):
                dispatcher.wake_here(target)

        loop = asyncio.get_running_loop()
        alone = await anyio.to_thread.run_sync(db.join, lambda target: loop.call_soon_threadsafe(woken, target))
        if settings.database_url is not None:
            log.info("serving the database %s", "alone" if alone else "beside other coordinators")
        try:
            await dispatcher.recover(alone)
            await approval_broker.expire_held(alone)
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(broadcaster.run)
                tasks.start_soon(dispatcher.close_when, app.state.shutting_down)
                tasks.start_soon(broadcaster.close_when, app.state.shutting_down)
                tasks.start_soon(approval_broker.close_when, app.state.shutting_down)
                tasks.start_soon(approval_broker.run)
                if settings.retention_days:
                    tasks.start_soon(retention.run_periodically, db, settings.retention_days, settings.retention_interval)
                tasks.start_soon(dispatcher.run)
                yield
                tasks.cancel_scope.cancel()
        finally:
            await anyio.to_thread.run_sync(db.close)
            await anyio.to_thread.run_sync(logs.flush_request_lines)

    request_observers = [log_request, *([metrics.observe_request] if settings.metrics_enabled else [])]
    return Starlette(
        routes=[
            *sessions.routes,
            *hooks.routes,
            *runner.routes,
            *runs.routes,
            *health.routes,
            *agents.routes,
            *approvals.routes,
            *live.routes,
            *page.routes,
            *metrics.routes,
            *openapi.routes,
        ],
        middleware=[
            Middleware(RequestLog, observers=request_observers),
            Middleware(
                Cors,
                allow_origins=list(settings.cors_origins),
                allow_methods=["*"],
                allow_headers=["*"],
            ),
            # Inside CORS: preflights are answered before it, and its 401s carry CORS headers.
            *_auth_middleware(settings),
        ],
        exception_handlers=errors.handlers,
        lifespan=lifespan,
    )


STREAMS_GOODBYE_TIMEOUT = 1.0


class Server(uvicorn.Server):
    """uvicorn's server, setting the app's `shutting_down` event as its shutdown begins (on
    SIGTERM or SIGINT). uvicorn runs the lifespan shutdown only once every connection has
    closed, so held long-polls and live streams need the word earlier: otherwise they hold the
    exit up until `timeout_graceful_shutdown` and are then cancelled mid-answer."""

    async def shutdown(self, sockets=None) -> None:
        # Those waiting on the event run at the first pause of uvicorn's shutdown, after it told
        # every connection to close: their last answers go out with `Connection: close`.
        state = self.config.app.state
        state.shutting_down.set()
        # Live streams end themselves first (a WebSocket with 1001 "going away"), before uvicorn
        # closes whatever is left with its own code.
        with anyio.move_on_after(STREAMS_GOODBYE_TIMEOUT):
            await state.broadcaster.wait_unsubscribed()
        await super().shutdown(sockets)


def server_config(app: Starlette, settings: Settings, host: str, port: int, **overrides) -> uvicorn.Config:
    """uvicorn's settings for serving the app: its HTTP protocol with the head and body limits
    (`coordinator_core.http_guard`), WebSocket pings, no access log of its own (RequestLog
    writes the request lines, without query strings)."""
    options = dict(
        host=host,
        port=port,
        ws="websockets-sansio",
        # Pings keep idle proxies from cutting live subscribers, and close peers that stop answering.
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
        log_config=None,  # configured by `logs.configure`
        log_level="debug" if settings.debug_logging else "info",
        access_log=False,
        timeout_graceful_shutdown=10,
        http=functools.partial(
            GuardedHttpProtocol,
            header_timeout=settings.header_timeout,
            max_header_bytes=settings.max_header_bytes,
            body_timeout=settings.body_timeout,
        ),
        timeout_keep_alive=settings.keep_alive_timeout,
        limit_concurrency=settings.max_connections,  # beyond: 503 at once
    )
    return uvicorn.Config(app, **(options | overrides))


def _auth_middleware(settings: Settings) -> list[Middleware]:
    """Bearer checks for the static token, the issuer's JWTs or both; none when neither is set."""
    verifier = None
    if settings.auth_enabled:
        from coordinator_core.oidc import JwtVerifier  # PyJWT is an optional extra, imported only when used

        verifier = JwtVerifier(
            settings.jwt_issuer, settings.jwt_audience, settings.jwks_uri, settings.jwks_min_fetch_interval
        )
    if settings.api_token is None and verifier is None:
        return []
    return [Middleware(BearerAuth, token=settings.api_token, verifier=verifier)]


def _backup(settings: Settings, target: Path) -> None:
    if settings.database_url is not None:
        sys.exit("agent-coordinator: backup copies the SQLite database; with COORDINATOR_DATABASE_URL"
                 " set, back up with pg_dump (README, Backup and restore)")
    source = settings.db_path
    try:
        pages = backup.backup(source, target)
    except (OSError, apsw.Error) as exc:
        sys.exit(f"agent-coordinator: backup failed: {exc} (copying {source} to {target})")
    print(f"backed up {source} to {target} ({pages} pages)")


def _copy_db(settings: Settings, url: str) -> None:
    try:
        url = parse_database_url(url)
    except ValueError as exc:
        sys.exit(f"agent-coordinator: copy-db --to {redact_url(url)!r}: {exc}")
    target = redact_url(url)
    try:
        from store import copy  # psycopg, an optional extra, only here
    except ImportError as exc:
        sys.exit(f"agent-coordinator: copy-db needs psycopg: pip install 'agent-coordinator[postgres]' ({exc})")
    import psycopg

    try:
        copied = copy.copy_database(settings.db_path, url)
    except copy.Refused as exc:
        sys.exit(f"agent-coordinator: copy-db refused: {exc}")
    except (OSError, apsw.Error, psycopg.Error, DatabaseUnusable) as exc:
        sys.exit(f"agent-coordinator: copy-db failed, nothing was copied to {target}: {' '.join(str(exc).split())}")
    counts = ", ".join(f"{rows} {table}" for table, rows in copied.items())
    print(f"copied {settings.db_path} to {target}: {counts}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="agent-coordinator", description=__doc__.splitlines()[0])
    parser.add_argument("--host", help="bind address (default: COORDINATOR_HOST or 0.0.0.0)")
    parser.add_argument("--port", type=int, help="port (default: COORDINATOR_PORT or 8765)")
    commands = parser.add_subparsers(dest="command", title="commands (default: serve)")
    backup_command = commands.add_parser(
        "backup", help="write a consistent copy of the database; safe while the server runs"
    )
    backup_command.add_argument("path", type=Path, help="file to write the copy to (replaced if it exists)")
    copy_command = commands.add_parser(
        "copy-db", help="copy the SQLite database into an empty PostgreSQL database (stop the server first)"
    )
    copy_command.add_argument("--to", required=True, metavar="URL", help="postgresql://user@host:port/database")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        sys.exit(f"agent-coordinator: invalid configuration: {exc}")
    if args.command == "backup":
        _backup(settings, args.path)
        return
    if args.command == "copy-db":
        _copy_db(settings, args.to)
        return
    logs.configure(settings.log_format == "json", settings.debug_logging)
    # Opened (its directory made or its server reached, its schema migrated) once before serving:
    # a database that cannot be used stops the start with one line, where the lifespan would end
    # in a traceback.
    try:
        open_database(settings).close()
    except DatabaseUnusable as exc:
        sys.exit(f"agent-coordinator: cannot use the database {settings.database_name}: {exc}")
    if settings.auth_enabled:
        log.info("accepting JWTs of %s for the audience %s", settings.jwt_issuer, settings.jwt_audience)
    elif settings.api_token is None:
        log.warning("authentication is off: whoever can reach the port can use the API")

    app = create_app(settings)
    # What is loaded by now lives as long as the process: full collections need not scan it
    # again (they took ~30 ms instead of ~5 with 200 live subscribers, pausing every one).
    gc.freeze()
    # A request's objects are freed by reference counting as it ends; collecting the youngest
    # generation every 700 allocations (the default) instead of every 10,000 only costs CPU
    # (4 µs per ingested event), and a collection of 10,000 objects takes about 0.15 ms.
    gc.set_threshold(10_000)
    config = server_config(app, settings, args.host or settings.host, settings.port if args.port is None else args.port)
    server = Server(config)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn raises SIGINT again once it has stopped
        server.run()
    if not server.started:
        sys.exit(3)  # uvicorn logged why; its own exit status for a failed start


if __name__ == "__main__":
    main()
