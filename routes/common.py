"""Request decoding and response encoding shared by every route module."""

from __future__ import annotations

import re
from array import array
from itertools import accumulate
from typing import Any, TypeVar

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from coordinator_core.http_guard import body_timed_out
from routes.errors import ValidationFailed, from_msgspec

T = TypeVar("T")

_encoder = msgspec.json.Encoder()


def json_response(content: Any, status_code: int = 200) -> Response:
    """Encode with msgspec straight to bytes (Structs keep their field order)."""
    return Response(_encoder.encode(content), status_code=status_code, media_type="application/json")


_STRING = re.compile(rb'"[^"]*"')
# Brackets become +1/-1 (as signed bytes), everything else is deleted.
_BRACKETS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[{]}"))


def json_depth(body: bytes) -> int:
    """How deeply a JSON document nests arrays and objects, ignoring brackets in strings.
    Linear time, all in C but one addition per bracket."""
    # Escapes go first (`\\` pairs, then `\"`), so that every quote left delimits a string.
    unescaped = bytes(body).replace(b"\\\\", b"").replace(b'\\"', b"")
    steps = array("b", _STRING.sub(b"", unescaped).translate(_BRACKETS, _NOT_BRACKETS))
    return max(accumulate(steps), default=0)


async def read_body(request: Request, decoder: msgspec.json.Decoder[T]) -> T:
    """Decode the body with a module-level decoder: JSON whatever the Content-Type says.
    Too large (413), too slow to arrive (408) and too deeply nested (422) never reach it."""
    settings = request.app.state.settings
    limit = settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"Request body larger than {limit} bytes")
    body = await _receive_body(request, limit, settings.body_timeout)
    depth = settings.max_json_depth
    if body.count(b"[") + body.count(b"{") > depth and json_depth(body) > depth:
        raise ValidationFailed.one(["body"], f"JSON nested deeper than {depth} levels", "json_depth")
    try:
        return decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise from_msgspec(exc) from None
    except UnicodeDecodeError:  # how msgspec reports a string that is not UTF-8
        raise ValidationFailed.one(["body"], "JSON string is not valid UTF-8", "json_invalid") from None


async def _receive_body(request: Request, limit: int, timeout: float) -> bytes:
    """The whole body, as `Request.body` reads it but bounded in bytes and in time: the server's
    protocol marks the request once the body is `timeout` seconds late (see
    `coordinator_core.http_guard`)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"Request body larger than {limit} bytes")
        if not message.get("more_body", False):
            return b"".join([*chunks, chunk]) if chunks else chunk
        chunks.append(chunk)
        if body_timed_out(request.scope):
            # The rest of the body may still come: the connection cannot carry another request.
            detail = f"Request body not received within {timeout:g} s"
            raise HTTPException(408, detail, headers={"Connection": "close"})


_TRUE = {"true", "1", "yes", "on", "t", "y"}
_FALSE = {"false", "0", "no", "off", "f", "n"}


def query_bool(request: Request, name: str, default: bool) -> bool:
    """Parse a boolean query value the way the reference (pydantic) does."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ValidationFailed.one(["query", name], "Input should be a valid boolean", "bool_parsing")


SQL_INT_MAX = 2**63 - 1  # the largest integer SQLite takes


def query_int(request: Request, name: str, low: int, high: int = SQL_INT_MAX) -> int | None:
    """An optional integer query value within [low, high]; anything else is a 422."""
    raw = request.query_params.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValidationFailed.one(["query", name], "Input should be a valid integer", "int_parsing") from None
    if not low <= value <= high:
        raise ValidationFailed.one(["query", name], f"Input should be between {low} and {high}")
    return value


async def upgrade_required(request: Request) -> Response:
    """A plain HTTP request to a WebSocket route: 426 names the protocol instead of a bare 404."""
    raise HTTPException(426, "WebSocket only: send an Upgrade: websocket request", headers={"Upgrade": "websocket"})
