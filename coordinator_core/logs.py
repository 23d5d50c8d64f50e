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


_second: tuple[int, str] = (-1, "")


def clock_text(created: float) -> str:
    """`2026-11-24 20:51:15,838` in local time, as `logging.Formatter` writes it; the part up to
    the second is computed once per second."""
    global _second
    whole = int(created)
    second, text = _second
    if whole != second:
        text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(whole))
        _second = (whole, text)
    return f"{text},{int((created - whole) * 1000):03d}"


def json_line(created: float, level: str, logger: str, message: str, extra: dict[str, Any]) -> str:
    line: dict[str, Any] = {
        "time": datetime.datetime.fromtimestamp(created, datetime.timezone.utc).isoformat(timespec="milliseconds"),
        "level": level,
        "logger": logger,
        "message": message,
    }
    line.update(extra)
    return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT, with the time written by `clock_text`."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return clock_text(record.created)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, the record's `fields` (if
    any), and the formatted exception."""

    def format(self, record: logging.LogRecord) -> str:
        extra = dict(getattr(record, "fields", {}))
        if record.exc_info:
            extra["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            extra["stack"] = self.formatStack(record.stack_info)
        return json_line(record.created, record.levelname, record.name, record.getMessage(), extra)


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
    formatter = {"()": JsonFormatter if json_lines else TextFormatter}
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

# What a request line says: time, method, path, status, duration in ms.
RequestLine = tuple[float, str, str, int, float]


def _message(method: str, path: str, status: int, duration_ms: float) -> str:
    return f"{method} {path} {status} {duration_ms:.1f}ms"


def _fields(method: str, path: str, status: int, duration_ms: float) -> dict[str, Any]:
    """The request line's own keys in JSON lines."""
    return {"method": method, "path": path, "status": status, "duration_ms": duration_ms}


def text_request_line(created: float, method: str, path: str, status: int, duration_ms: float) -> str:
    message = _message(method, path, status, duration_ms)
    return TEXT_FORMAT % {
        "asctime": clock_text(created), "levelname": "INFO", "name": access_log.name, "message": message,
    }


def json_request_line(created: float, method: str, path: str, status: int, duration_ms: float) -> str:
    message = _message(method, path, status, duration_ms)
    return json_line(created, "INFO", access_log.name, message, _fields(method, path, status, duration_ms))


class _RequestLines(logging.handlers.QueueListener):
    """The request lines of the serving process. On the event loop a request only adds what
    its line says to a batch (creating and dispatching a LogRecord cost more than routing the
    request); the batch waits up to FLUSH_SECONDS for the lines after it, then this listener's
    thread formats it and writes it with one write per handler. Lines are INFO, which every
    level passes, and the handlers' filter concerns only uvicorn's records."""

    def __init__(self, json_lines: bool, handlers: Iterable[logging.Handler]) -> None:
        super().__init__(queue.SimpleQueue(), *handlers)
        self._format = json_request_line if json_lines else text_request_line
        self._batch: list[RequestLine] = []

    def add(self, line: RequestLine) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # outside an event loop: on its own
            self.queue.put_nowait([line])
            return
        if not self._batch:
            loop.call_later(FLUSH_SECONDS, self.flush)
        self._batch.append(line)

    def flush(self) -> None:
        """Queue the batch now."""
        batch, self._batch = self._batch, []
        if batch:
            self.queue.put_nowait(batch)

    def handle(self, batch: list[RequestLine]) -> None:
        text = "".join(self._format(*line) + "\n" for line in batch)
        for handler in self.handlers:
            try:
                with handler.lock:
                    handler.stream.write(text)
                    handler.flush()
            except Exception:
                handler.handleError(logging.makeLogRecord({"name": access_log.name, "msg": text}))


_request_lines: _RequestLines | None = None


def configure(json_lines: bool, debug: bool) -> None:
    """Set up logging for the server process (`logging_config`), and request lines written by a
    thread of their own (`_RequestLines`): the event loop neither formats them nor waits on
    stderr (which may be a slow pipe)."""
    global _request_lines
    # No format uses the process, the thread or the calling line: do not compute them for every
    # record (the logging HOWTO's "Optimization" switches).
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None
    logging.config.dictConfig(logging_config(json_lines, debug))
    _request_lines = _RequestLines(json_lines, logging.getLogger().handlers)
    _request_lines.start()


def flush_request_lines() -> None:
    """Write every request line logged so far now. Called as the app shuts down: the process
    may end by a signal right after, and must not take the last lines with it."""
    if _request_lines is not None:
        _request_lines.flush()
        _request_lines.stop()  # drains the queue
        _request_lines.start()


def log_request(scope: dict, status: int, seconds: float) -> None:
    method = "WS" if scope["type"] == "websocket" else scope["method"]
    duration_ms = round(seconds * 1000, 3)
    path = scope["path"]
    if _request_lines is not None:
        _request_lines.add((time.time(), method, path, status, duration_ms))
        return
    # Not set up for serving (the app embedded elsewhere, tests): an ordinary record.
    line = (method, path, status, duration_ms)
    access_log.info("%s", _message(*line), extra={"fields": _fields(*line)})


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
