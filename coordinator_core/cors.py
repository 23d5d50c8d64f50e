"""Starlette's CORS middleware, with a short way for the requests that carry no `Origin`
(runners, the CLI, hooks: nearly all of them).

For those Starlette only adds `Vary: Origin` to the answer, but it parses the request's headers
twice and the answer's once, and adds a coroutine frame, per request. Here they get the same
header from one small wrapper of `send`; preflights and requests with an `Origin` go through
Starlette's code unchanged.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.types import Message, Receive, Scope, Send

_NO_ORIGIN = Headers()


class Cors(CORSMiddleware):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or any(name == b"origin" for name, _ in scope["headers"]):
            await super().__call__(scope, receive, send)
            return

        async def send_varying(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.get("headers", ())
                if any(name == b"vary" for name, _ in headers):  # merged as Starlette merges it
                    await self.send(message, send, _NO_ORIGIN)
                    return
                message["headers"] = [*headers, (b"vary", b"Origin")]
            await send(message)

        await self.app(scope, receive, send_varying)
