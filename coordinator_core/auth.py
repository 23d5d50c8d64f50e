"""Bearer authentication, opt-in: a pure ASGI middleware.

A credential is a static token (`COORDINATOR_API_TOKEN` or `COORDINATOR_API_TOKEN_FILE`), an OIDC
access token that `oidc.JwtVerifier` accepts (`AUTH_ENABLED`), or either when both are configured.
Every request but `GET /health` and the static page `GET /` must then carry one as
`Authorization: Bearer <credential>`; the live streams (`/ws`, `/sse/sessions`) may pass
`?api_key=<credential>` instead, because browsers cannot set headers on WebSockets and
EventSource. With neither configured the middleware is not installed: every request passes,
credentials or not. CORS preflights never get here: the CORS middleware, installed outside this
one, answers them.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

import anyio
import msgspec

if TYPE_CHECKING:
    from coordinator_core.oidc import JwtVerifier

OPEN_PATHS = {"/health", "/"}  # the live page is static: its data needs a credential
QUERY_KEY_PATHS = {"/ws", "/sse/sessions"}


class Rejected(Exception):
    """A refused credential, with the status and detail to answer."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


class BearerAuth:
    """The middleware, installed only when a static token, a JWT verifier or both are configured."""

    def __init__(self, app, token: str | None = None, verifier: JwtVerifier | None = None):
        self.app = app
        self._token = None if token is None else token.encode()
        self._verifier = verifier

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan" and self._verifier is not None:
            # The issuer's keys are fetched while the app starts, and the start does not wait for them.
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._verifier.refresh)
                await self.app(scope, receive, send)
                tasks.cancel_scope.cancel()  # a fetch still waiting must not hold up the shutdown
            return
        if scope["type"] not in ("http", "websocket") or _is_open(scope):
            await self.app(scope, receive, send)
            return
        try:
            subject = await self._check(_credential(scope))
        except Rejected as rejected:
            await _reject(scope, send, rejected.status, rejected.detail)
        else:
            if subject is not None:  # who decides an approval, in its audit trail
                scope["auth_subject"] = subject
            await self.app(scope, receive, send)

    async def _check(self, credential: bytes | None) -> str | None:
        """Return if the credential is good (with a JWT's `sub`), else raise `Rejected`."""
        if not credential:
            raise Rejected(401, "Not authenticated")
        # Constant time, so the answer's timing tells nothing about how much of a guess was right.
        if self._token is not None and hmac.compare_digest(credential, self._token):
            return None
        if self._verifier is None:
            raise Rejected(401, "Invalid token")
        subject = (await self._verifier.verify(credential)).get("sub")
        return subject if isinstance(subject, str) and subject else None


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


async def _reject(scope, send, status: int, detail: str) -> None:
    """A JSON error; a WebSocket handshake gets the same answer instead of being upgraded."""
    body = msgspec.json.encode({"detail": detail})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    if scope["type"] == "http":
        prefix = "http"
    elif "websocket.http.response" in scope.get("extensions", {}):
        prefix = "websocket.http"
    else:  # a server without handshake responses: refusing the upgrade is all there is
        await send({"type": "websocket.close", "code": 1008})
        return
    await send({"type": f"{prefix}.response.start", "status": status, "headers": headers})
    await send({"type": f"{prefix}.response.body", "body": body})
