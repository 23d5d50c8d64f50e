"""The one place where failures become JSON `{"detail": ...}` responses."""

from __future__ import annotations

import logging
import re

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Match, Route

from store.errors import Conflict, Forbidden, NotFound, Rejected, StorageFailed, StorageFull, StoreError

log = logging.getLogger("coordinator.errors")


class ValidationFailed(Exception):
    """A request body or query value that does not fit: answered 422 with a list of problems."""

    def __init__(self, problems: list[dict]):
        self.problems = problems

    @classmethod
    def one(cls, loc: list, msg: str, type_: str = "value_error") -> ValidationFailed:
        return cls([{"type": type_, "loc": loc, "msg": msg}])


_PATH_PART = re.compile(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]")
_MISSING = re.compile(r"missing required field `([^`]+)`")


def from_msgspec(exc: msgspec.ValidationError | msgspec.DecodeError) -> ValidationFailed:
    """Translate msgspec's message (`... - at `$.a[0]``) into a `loc`/`msg` item."""
    message = str(exc)
    if isinstance(exc, msgspec.ValidationError):
        text, _, path = message.partition(" - at `")
        loc: list = ["body"]
        for name, index in _PATH_PART.findall(path.rstrip("`").removeprefix("$")):
            loc.append(int(index) if index.isdigit() else index or name)  # `[...]`: a dict value
        missing = _MISSING.search(text)
        if missing:
            loc.append(missing.group(1))
        return ValidationFailed.one(loc, text, "missing" if missing else "value_error")
    return ValidationFailed.one(["body"], message, "json_invalid")


def json_error(status: int, detail, headers: dict | None = None) -> Response:
    return Response(
        msgspec.json.encode({"detail": detail}),
        status_code=status,
        headers=headers,
        media_type="application/json",
    )


async def _http_exception(request: Request, exc: HTTPException) -> Response:
    if exc.status_code in (204, 304):
        return Response(status_code=exc.status_code, headers=exc.headers)
    return json_error(exc.status_code, exc.detail, exc.headers)


async def _method_not_allowed(request: Request, exc: HTTPException) -> Response:
    # Starlette's router answers from the first route whose path matched, naming only its
    # methods; other routes of the same path take more. Only a wrong method pays for this walk.
    methods = set()
    for route in request.app.routes:
        if isinstance(route, Route) and route.matches(request.scope)[0] is not Match.NONE:
            methods |= route.methods
    return json_error(405, exc.detail, {"Allow": ", ".join(sorted(methods))})


async def _validation_failed(request: Request, exc: ValidationFailed) -> Response:
    return json_error(422, exc.problems)


# A storage fault is the server's, not the request's: 507 Insufficient Storage when the disk (or
# DATABASE_MAX_MB) is full, 503 for other I/O errors. Both are answered like any error, so the
# connection stays open, and were logged in one line where they happened (store.sqlite, store.postgres).
_STORE_STATUS = {NotFound: 404, Conflict: 409, Rejected: 400, Forbidden: 403, StorageFull: 507, StorageFailed: 503}


async def _store_error(request: Request, exc: StoreError) -> Response:
    return json_error(_STORE_STATUS[type(exc)], exc.detail)


async def _client_left(request: Request, exc: ClientDisconnect) -> Response:
    # Nobody is left to answer: 499 (the client closed the request) is for the request line.
    return Response(status_code=499)


async def _unhandled(request: Request, exc: Exception) -> Response:
    # ServerErrorMiddleware logs the traceback; the client only learns that it failed.
    return json_error(500, "Internal Server Error")


handlers = {
    405: _method_not_allowed,
    HTTPException: _http_exception,
    ValidationFailed: _validation_failed,
    StoreError: _store_error,
    ClientDisconnect: _client_left,
    Exception: _unhandled,
}
