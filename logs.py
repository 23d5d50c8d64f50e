"""Logging: the configuration shared with uvicorn (text or one JSON object per line) and the
middleware that reports every request once it is answered.

Request lines carry method, path, status and duration only: never the query string (it may
carry `api_key`), headers or bodies (event contents stay out of the logs).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import logging.config
import logging.handlers
import queue
import time
from typing import Any, Callable, Iterable

access_log = logging.getLogger("coordinator.access")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

Observer = Callable[[dict, int, float], None]


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, the record's `fields` (if
    any), and the formatted exception."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)


class _NoWebSocketHandshakes(logging.Filter):
    """uvicorn logs each WebSocket handshake with its query string (which may hold `api_key`);
    the request line of `RequestLog` reports it instead. The WebSocket library's debug trace
    (`< GET /ws?api_key=...`, `< authorization: ...`, frames with their payloads) goes too."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "uvicorn.error":
            return True
        message = str(record.msg)
        return '"WebSocket %s"' not in message and not message.startswith(("< ", "> "))


def logging_config(json_lines: bool, debug: bool) -> dict[str, Any]:
    """A `logging.config.dictConfig` for our loggers and uvicorn's alike: everything goes to
    stderr through one handler, as text or as JSON lines."""
    formatter = {"()": JsonFormatter} if json_lines else {"format": TEXT_FORMAT}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "filters": {"no_ws_handshakes": {"()": _NoWebSocketHandshakes}},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "filters": ["no_ws_handshakes"],
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["default"], "level": "DEBUG" if debug else "INFO"},
        # uvicorn's loggers lose their own handlers and propagate to ours.
        "loggers": {
            name: {"handlers": [], "propagate": True} for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
        },
    }


# Request lines wait up to this long for the ones after them, then are written together.
FLUSH_SECONDS = 0.01


class _Batches(logging.handlers.QueueHandler):
    """Queues request records as they are (the listener's thread formats them), gathered into
    a batch for up to FLUSH_SECONDS: waking the thread for each request would cost more than
    writing its line. A record logged outside an event loop is queued on its own."""

    def __init__(self, records: queue.SimpleQueue) -> None:
        super().__init__(records)
        self._batch: list[logging.LogRecord] = []

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.queue.put_nowait([record])
            return
        if not self._batch:
            loop.call_later(FLUSH_SECONDS, self.flush)
        self._batch.append(record)

    def flush(self) -> None:
        """Queue the batch now (also called by `logging.shutdown` at exit)."""
        batch, self._batch = self._batch, []
        if batch:
            self.queue.put_nowait(batch)


class _BatchListener(logging.handlers.QueueListener):
    """Writes each queued batch through the configured (stream) handlers, with one write per
    handler: the thread takes the interpreter lock once per batch, not once per line."""

    def handle(self, batch: list[logging.LogRecord]) -> None:
        for handler in self.handlers:
            try:
                text = "".join(
                    handler.format(record) + handler.terminator
                    for record in batch
                    if record.levelno >= handler.level and handler.filter(record)
                )
                with handler.lock:
                    handler.stream.write(text)
                    handler.flush()
            except Exception:
                handler.handleError(batch[0])


_request_lines: _BatchListener | None = None


def configure(json_lines: bool, debug: bool) -> None:
    """Set up logging for the server process (`logging_config`). Request lines, one per
    request, are formatted and written by a thread of their own behind a queue, so the event
    loop neither formats them nor waits on stderr (which may be a slow pipe)."""
    global _request_lines
    # No format uses the process, the thread or the calling line: do not compute them for every
    # record (the logging HOWTO's "Optimization" switches).
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None
    logging.config.dictConfig(logging_config(json_lines, debug))
    batches: queue.SimpleQueue[list[logging.LogRecord]] = queue.SimpleQueue()
    _request_lines = _BatchListener(batches, *logging.getLogger().handlers)
    access_log.handlers = [_Batches(batches)]
    access_log.propagate = False
    _request_lines.start()


def flush_request_lines() -> None:
    """Write every request line logged so far now. Called as the app shuts down: the process
    may end by a signal right after, and must not take the last lines with it."""
    if _request_lines is not None:
        for handler in access_log.handlers:
            handler.flush()
        _request_lines.stop()  # drains the queue
        _request_lines.start()


def log_request(scope: dict, status: int, seconds: float) -> None:
    method = "WS" if scope["type"] == "websocket" else scope["method"]
    duration_ms = round(seconds * 1000, 3)
    access_log.info(
        "%s %s %d %.1fms",
        method,
        scope["path"],
        status,
        duration_ms,
        extra={"fields": {"method": method, "path": scope["path"], "status": status, "duration_ms": duration_ms}},
    )


class RequestLog:
    """Pure ASGI middleware: once a request is answered (or a WebSocket closed), call every
    observer with (scope, status, seconds): `log_request`, and the metrics when they are on.
    The status of a WebSocket is 101 once accepted; 500 stands for an exception before any
    response, 0 for a request that ended unanswered (the client left first)."""

    def __init__(self, app, observers: Iterable[Observer]):
        self.app = app
        self.observers = tuple(observers)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        status = 0
        started = time.perf_counter()

        async def send_and_note(message) -> None:
            nonlocal status
            kind = message["type"]
            if kind in ("http.response.start", "websocket.http.response.start"):
                status = message["status"]
            elif kind == "websocket.accept":
                status = 101
            elif kind == "websocket.close" and not status:
                status = 403  # closed before accepting: uvicorn answers the handshake with 403
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception:
            status = status or 500
            raise
        finally:
            seconds = time.perf_counter() - started
            for observe in self.observers:
                observe(scope, status, seconds)
