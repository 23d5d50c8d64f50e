"""OIDC access tokens: JWTs signed by an issuer's keys, checked with PyJWT (the `oidc` extra).

Imported only when `AUTH_ENABLED` is on. The issuer's public keys (its JWKS) are fetched once at
start-up and kept; a token naming an unknown key id (`kid`) triggers a new fetch, at most one per
`min_fetch_interval`, so a stream of made-up key ids cannot make the coordinator hammer the issuer.
A token with a known key never waits on the network. Fetches run in a worker thread with a
timeout; while the keys cannot be fetched, tokens that need them get 503 and the coordinator keeps
trying (at the same pace) until the issuer answers.
"""

from __future__ import annotations

import logging
import math
import time
import urllib.request
from typing import Any

import anyio
import jwt
import msgspec

from coordinator_core.auth import Rejected

log = logging.getLogger("coordinator.oidc")

FETCH_TIMEOUT = 5.0  # seconds, per connect and per read
# Asymmetric only: a key the issuer publishes must never double as an HMAC secret.
ALGORITHMS = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
INVALID = "Invalid or expired token"
UNAVAILABLE = "Cannot check tokens now: the issuer's signing keys could not be fetched; try again later"


class _Discovery(msgspec.Struct):
    issuer: str
    jwks_uri: str


class _Jwks(msgspec.Struct):
    keys: list[dict[str, Any]]


class JwtVerifier:
    """Checks bearer JWTs: signature by one of the issuer's keys, `iss`, `aud` and `exp`.

    `jwks_uri` None: found in the issuer's `/.well-known/openid-configuration`."""

    def __init__(self, issuer: str, audience: str, jwks_uri: str | None, min_fetch_interval: float):
        self.issuer = issuer
        self.audience = audience
        self._jwks_uri = jwks_uri
        self._min_fetch_interval = min_fetch_interval
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._fetched_at = -math.inf  # the last attempt, successful or not
        self._fetch_failed = False
        self._lock = anyio.Lock()

    async def verify(self, token: bytes) -> dict[str, Any]:
        """The token's claims if it is good, else raise `Rejected` (403, or 503 without the keys)."""
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError:
            raise Rejected(403, INVALID) from None
        key = self._keys.get(kid)
        if key is None:
            await self.refresh()
            key = self._keys.get(kid)
        if key is None:
            raise Rejected(503, UNAVAILABLE) if self._fetch_failed else Rejected(403, INVALID)
        try:
            return jwt.decode(token, key, algorithms=[key.algorithm_name], audience=self.audience, issuer=self.issuer,
                              options={"require": ["exp", "iss", "aud"]})
        except jwt.PyJWTError:
            raise Rejected(403, INVALID) from None

    async def refresh(self) -> None:
        """Fetch the keys unless that was tried less than `min_fetch_interval` ago."""
        async with self._lock:  # one fetch at a time; who waited sees its outcome
            now = time.monotonic()
            if now - self._fetched_at < self._min_fetch_interval:
                return
            self._fetched_at = now
            try:
                self._keys = await anyio.to_thread.run_sync(self._fetch, abandon_on_cancel=True)
            except (OSError, ValueError, jwt.PyJWTError) as exc:
                self._fetch_failed = True
                log.warning("cannot fetch the signing keys of %s: %s", self.issuer, exc)
            else:
                self._fetch_failed = False
                log.info("fetched the signing keys of %s: %s", self.issuer, ", ".join(map(str, self._keys)))

    def _fetch(self) -> dict[str | None, jwt.PyJWK]:
        if self._jwks_uri is None:
            url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
            discovery = msgspec.json.decode(_get(url), type=_Discovery)
            if discovery.issuer != self.issuer:  # tokens would all fail their `iss` check
                raise ValueError(f"{url} names the issuer {discovery.issuer!r}, not {self.issuer!r}")
            if not discovery.jwks_uri.startswith(("https://", "http://")):
                raise ValueError(f"{url} names no HTTP(S) jwks_uri: {discovery.jwks_uri!r}")
            self._jwks_uri = discovery.jwks_uri
        published = msgspec.json.decode(_get(self._jwks_uri), type=_Jwks).keys
        # PyJWKSet skips keys it cannot use, and fails if none is left.
        keys = jwt.PyJWKSet([key for key in published if key.get("use", "sig") == "sig"]).keys
        usable = {key.key_id: key for key in keys if key.algorithm_name in ALGORITHMS}
        if not usable:
            raise ValueError(f"{self._jwks_uri} holds no signing key for {', '.join(sorted(ALGORITHMS))}")
        return usable


def _get(url: str) -> bytes:
    """The body of a 200 answer; other statuses raise HTTPError, an OSError."""
    with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT) as response:
        return response.read()
