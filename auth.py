"""Bearer-token authentication, opt-in: a pure ASGI middleware.

With a token configured (`COORDINATOR_API_TOKEN` or `COORDINATOR_API_TOKEN_FILE`), every
request but `GET /health` and the static page `GET /` must carry `Authorization: Bearer
<token>`; the live streams (`/ws`, `/sse/sessions`) may pass `?api_key=<token>` instead, because
browsers cannot set headers on WebSockets and EventSource. Without a token the middleware is not
installed: every request passes, credentials or not. CORS preflights never get here: the CORS
middleware, installed outside this one, answers them.
"""

from __future__ import annotations

import hmac
from urllib.parse import parse_qsl

import msgspec

OPEN_PATHS = {"/health", "/"}  # the live page is static: its data needs the token
QUERY_KEY_PATHS = {"/ws", "/sse/sessions"}


class TokenAuth:
    """The middleware, installed only when a token is configured."""

    def __init__(self, app, token: str):
        self.app = app
        self._token = token.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket") or _is_open(scope):
            await self.app(scope, receive, send)
            return
        credential = _credential(scope)
        if credential is None:
            await _reject(scope, send, "Not authenticated")
        # Constant time, so the answer's timing tells nothing about how much of a guess was right.
        elif not hmac.compare_digest(credential, self._token):
            await _reject(scope, send, "Invalid token")
        else:
            await self.app(scope, receive, send)


def _is_open(scope) -> bool:
    return scope["path"] in OPEN_PATHS and scope.get("method") in ("GET", "HEAD")


def _credential(scope) -> bytes | None:
    """The presented token: a Bearer `Authorization` header, else `api_key` on the live streams."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer":
                return token.strip()
    if scope["path"] in QUERY_KEY_PATHS:
        for key, value in parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True):
            if key == "api_key":
                return value.encode()
    return None


async def _reject(scope, send, detail: str) -> None:
    """401 JSON; a WebSocket handshake gets the same answer instead of being upgraded."""
    body = msgspec.json.encode({"detail": detail})
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"www-authenticate", b"Bearer"),
    ]
    if scope["type"] == "http":
        prefix = "http"
    elif "websocket.http.response" in scope.get("extensions", {}):
        prefix = "websocket.http"
    else:  # a server without handshake responses: refusing the upgrade is all there is
        await send({"type": "websocket.close", "code": 1008})
        return
    await send({"type": f"{prefix}.response.start", "status": 401, "headers": headers})
    await send({"type": f"{prefix}.response.body", "body": body})
