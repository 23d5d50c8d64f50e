"""OIDC access tokens (`AUTH_ENABLED`): JWTs checked against a real issuer of the tests' own.

The issuer is an HTTP server on 127.0.0.1 with a discovery document and a JWKS of generated keys;
tokens are signed as an identity provider would sign them, or forged the ways attackers forge them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anyio
import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings, strategies as st
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from starlette.routing import WebSocketRoute
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from coordinator_core.auth import Rejected
from coordinator_core.oidc import JwtVerifier
from coordinator_core.settings import Settings, SettingsError
from runner_client import wait_for
from server_process import ROOT, ServerProcess
from test_auth import _start_fails
from test_live import recv

AUDIENCE = "https://coordinator.example/api"
STATIC = "static-7c1e9b3a5d2f4e6a8b0c"
INVALID = {"detail": "Invalid or expired token"}
UNAVAILABLE = {"detail": "Cannot check tokens now: the issuer's signing keys could not be fetched; try again later"}


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict, claims: dict, sign=lambda signing_input: b"") -> str:
    """A token built by hand, as an attacker builds one: any header, any signature."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{b64(sign(signing_input.encode()))}"


class Issuer:
    """An OIDC issuer on 127.0.0.1: `{url}/.well-known/openid-configuration` names `{url}/certs`,
    which publishes `keys` (kid -> private key; tests change it). Counts requests, and holds
    those for the JWKS while `gate` is clear. Bound at once; `listening=False` refuses connections until `listen()`."""

    def __init__(self, listening: bool = True):
        self.keys: dict[str, object] = {"k1": rsa_key()}
        self.extra_jwks: list[dict] = []  # published as they are
        self.discovery_requests = 0
        self.jwks_requests = 0
        self.jwks_asked = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/realm/.well-known/openid-configuration":
                    issuer.discovery_requests += 1
                    body = {"issuer": issuer.url, "jwks_uri": issuer.url + "/certs"}
                elif self.path == "/realm/certs":
                    issuer.jwks_requests += 1
                    issuer.jwks_asked.set()
                    issuer.gate.wait(20)
                    body = issuer.jwks()
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
        self._server.daemon_threads = True
        self._server.server_bind()  # bound but not listening: connections are refused
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/realm"
        self._thread: threading.Thread | None = None
        if listening:
            self.listen()

    def listen(self) -> None:
        self._server.server_activate()
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.gate.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=10)
        self._server.server_close()

    def jwks(self) -> dict:
        published = []
        for kid, key in self.keys.items():
            if isinstance(key, rsa.RSAPrivateKey):
                jwk = {**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "alg": "RS256"}
            else:
                jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
            published.append({**jwk, "kid": kid, "use": "sig"})
        return {"keys": published + self.extra_jwks}

    def claims(self, **overrides) -> dict:
        now = int(time.time())
        return {"iss": self.url, "aud": AUDIENCE, "sub": "runner@clients", "iat": now, "exp": now + 600, **overrides}

    def token(self, kid: str = "k1", key=None, algorithm: str = "RS256", **claims) -> str:
        return jwt.encode(self.claims(**claims), key or self.keys[kid], algorithm=algorithm, headers={"kid": kid})


@pytest.fixture
def issuer():
    issuer = Issuer()
    yield issuer
    issuer.close()


@pytest.fixture
def start(make_server, issuer):
    """A coordinator accepting the issuer's JWTs; it fetched the keys once when `start` returns."""

    def start_server(**overrides):
        server = make_server(auth_enabled=True, oidc_issuer=issuer.url, oidc_audience=AUDIENCE, **overrides)
        wait_for(lambda: issuer.jwks_requests >= 1)
        return server

    return start_server


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_issuer_tokens_pass_forged_and_foreign_ones_get_403(start, issuer):
    server = start()
    valid = issuer.token()
    assert server.get("/sessions", headers=bearer(valid)).json() == {"sessions": []}
    assert server.post("/sessions", {"session_id": "s1"}, headers=bearer(valid)).status_code == 200
    # Login tokens carry the userinfo audience too.
    login = issuer.token(aud=[AUDIENCE, "https://issuer.example/userinfo"])
    assert server.get("/sessions/s1", headers=bearer(login)).status_code == 200

    public_pem = issuer.keys["k1"].public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    claims = issuer.claims()
    refused = {
        "expired": issuer.token(exp=int(time.time()) - 60),
        "no expiry": jwt.encode({k: v for k, v in claims.items() if k != "exp"}, issuer.keys["k1"], "RS256",
                                headers={"kid": "k1"}),
        "wrong audience": issuer.token(aud="https://other.example/api"),
        "wrong issuer": issuer.token(iss=issuer.url + "/"),
        "other key, same kid": issuer.token(key=rsa_key()),
        "unknown kid": issuer.token(kid="k9", key=rsa_key()),
        "alg none": forge({"alg": "none", "kid": "k1"}, claims),
        "HS256 with the public key as secret": forge(
            {"alg": "HS256", "kid": "k1"}, claims, lambda data: hmac.new(public_pem, data, hashlib.sha256).digest()
        ),
        "signature cut off": valid.rsplit(".", 1)[0] + ".",
        "not a JWT": "not-a-jwt",
        "the static token of another server": STATIC,
    }
    for name, token in refused.items():
        answer = server.get("/sessions", headers=bearer(token))
        assert (answer.status_code, answer.json()) == (403, INVALID), name
        assert "www-authenticate" not in answer.headers, name
    # Refused writes store nothing.
    assert server.post("/sessions", {"session_id": "s2"}, headers=bearer(refused["expired"])).status_code == 403
    assert [s["session_id"] for s in server.get("/sessions", headers=bearer(valid)).json()["sessions"]] == ["s1"]

    missing = server.get("/sessions")
    assert (missing.status_code, missing.json()) == (401, {"detail": "Not authenticated"})
    assert missing.headers["www-authenticate"] == "Bearer"
    for authorization in (f"Basic {valid}", "Bearer", "Bearer  "):
        answer = server.get("/sessions", headers={"Authorization": authorization})
        assert (answer.status_code, answer.json()) == (401, {"detail": "Not authenticated"}), authorization
    # Query tokens count only on the live streams.
    assert server.get("/sessions", params={"api_key": valid}).status_code == 401
    assert issuer.jwks_requests == 1  # all of the above used the keys fetched at start


def test_every_route_but_health_and_the_page_needs_a_credential(start, issuer):
    server = start()
    token = issuer.token()
    checked = 0
    for route in server.app.routes:
        path = re.sub(r"\{[^}]+\}", "x", route.path)
        if isinstance(route, WebSocketRoute):
            with pytest.raises(InvalidStatus) as rejected:
                connect(server.ws_url + path)
            assert rejected.value.response.status_code == 401, path
            with connect(server.ws_url + path, additional_headers=bearer(token)):
                pass
            checked += 1
            continue
        for method in route.methods:
            answer = requests.request(method, server.url + path, timeout=30)
            if path in ("/health", "/"):
                assert answer.status_code == 200, (method, path)
            else:
                assert answer.status_code == 401, (method, path)
                assert method == "HEAD" or answer.json() == {"detail": "Not authenticated"}
                with requests.request(method, server.url + path, headers=bearer(token), stream=True, timeout=30) as ok:
                    assert ok.status_code not in (401, 403), (method, path)
            checked += 1
    assert checked > 40  # the listing above is the app's own, so it grows with it
    assert server.post("/health").status_code == 401  # only reading the health is open


def test_live_streams_take_the_jwt_as_header_or_api_key(start, issuer):
    server = start()
    token = issuer.token()
    for kwargs in ({"params": {"api_key": token}}, {"headers": bearer(token)}):
        with requests.get(server.url + "/sse/sessions", stream=True, timeout=10, **kwargs) as r:
            assert r.status_code == 200 and next(r.iter_lines()).startswith(b"id: ")
    refused = requests.get(server.url + "/sse/sessions", params={"api_key": issuer.token(aud="x")}, timeout=10)
    assert (refused.status_code, refused.json()) == (403, INVALID)
    assert server.get("/sse/sessions").status_code == 401

    for url, headers in ((f"/ws?api_key={token}", None), ("/ws", bearer(token))):
        with connect(server.ws_url + url, additional_headers=headers) as ws:
            assert recv(ws)["type"] == "init"
    with pytest.raises(InvalidStatus) as rejected:
        connect(server.ws_url + "/ws?api_key=" + issuer.token(exp=int(time.time()) - 60))
    assert rejected.value.response.status_code == 403
    assert json.loads(rejected.value.response.body) == INVALID
    with pytest.raises(InvalidStatus) as missing:
        connect(server.ws_url + "/ws")
    assert missing.value.response.status_code == 401


def test_static_token_works_beside_the_issuer(start, issuer):
    server = start(api_token=STATIC)
    for session_id, credential in enumerate((STATIC, issuer.token())):
        assert server.post("/sessions", {"session_id": f"s{session_id}"}, headers=bearer(credential)).status_code == 200
        with connect(server.ws_url + f"/ws?api_key={credential}") as ws:
            assert recv(ws)["type"] == "init"
    wrong = server.get("/sessions", headers=bearer(STATIC + "x"))
    assert (wrong.status_code, wrong.json()) == (403, INVALID)
    assert len(server.get("/sessions", headers=bearer(STATIC)).json()["sessions"]) == 2


def test_a_rotated_key_is_picked_up_and_a_withdrawn_one_dropped(start, issuer):
    server = start(jwks_min_fetch_interval=0)
    old = issuer.token()
    assert server.get("/sessions", headers=bearer(old)).status_code == 200
    issuer.keys = {"k2": rsa_key()}  # the issuer rotates: a new key, the old one withdrawn
    assert server.get("/sessions", headers=bearer(issuer.token("k2"))).status_code == 200
    assert issuer.jwks_requests == 2
    # The fetch that found k2 no longer lists k1, so its tokens stop working at once.
    answer = server.get("/sessions", headers=bearer(old))
    assert (answer.status_code, answer.json()) == (403, INVALID)


def test_unknown_key_ids_fetch_the_keys_at_most_once_per_interval(start, issuer):
    server = start(jwks_min_fetch_interval=3600)
    garbage = [issuer.token(kid=f"garbage-{i}", key=issuer.keys["k1"]) for i in range(40)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda token: server.get("/sessions", headers=bearer(token)), garbage))
    assert {(a.status_code, a.json() == INVALID) for a in answers} == {(403, True)}
    assert issuer.jwks_requests == 1  # the fetch at start; the burst asked for none
    # The price: a key published within the interval is unknown until it has passed.
    issuer.keys["k2"] = rsa_key()
    assert server.get("/sessions", headers=bearer(issuer.token("k2"))).status_code == 403
    assert server.get("/sessions", headers=bearer(issuer.token("k1"))).status_code == 200
    assert issuer.jwks_requests == 1


def test_issuer_down_at_start_answers_503_until_it_is_reachable(make_server):
    issuer = Issuer(listening=False)
    try:
        server = make_server(auth_enabled=True, oidc_issuer=issuer.url, oidc_audience=AUDIENCE,
                             jwks_min_fetch_interval=0)
        token = issuer.token()
        assert server.get("/health").status_code == 200
        down = server.get("/sessions", headers=bearer(token))
        assert (down.status_code, down.json()) == (503, UNAVAILABLE)
        with pytest.raises(InvalidStatus) as rejected:
            connect(server.ws_url + f"/ws?api_key={token}")
        assert rejected.value.response.status_code == 503
        assert server.get("/sessions").status_code == 401  # no token: nothing to check

        issuer.listen()
        assert server.get("/sessions", headers=bearer(token)).status_code == 200
    finally:
        issuer.close()
    # Gone again: the known key needs no issuer; an unknown one cannot be checked.
    assert server.get("/sessions", headers=bearer(token)).status_code == 200
    unknown = server.get("/sessions", headers=bearer(issuer.token("k2", key=rsa_key())))
    assert (unknown.status_code, unknown.json()) == (503, UNAVAILABLE)


def test_a_slow_issuer_holds_up_no_token_with_a_known_key(start, issuer):
    server = start(jwks_min_fetch_interval=0)
    issuer.keys["k2"] = rsa_key()
    issuer.jwks_asked.clear()
    issuer.gate.clear()
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(server.get, "/sessions", headers=bearer(issuer.token("k2")))
        assert issuer.jwks_asked.wait(10)  # the coordinator is now waiting for the issuer
        assert server.get("/sessions", headers=bearer(issuer.token("k1"))).status_code == 200
        assert server.get("/health").status_code == 200
        assert not waiting.done()
        issuer.gate.set()
        assert waiting.result(timeout=30).status_code == 200


def test_asymmetric_keys_verify_and_a_published_secret_never_does(start, issuer):
    issuer.keys["e1"] = ec.generate_private_key(ec.SECP256R1())
    secret = b"s" * 32
    issuer.extra_jwks = [{"kty": "oct", "kid": "h1", "k": b64(secret), "alg": "HS256"}]
    server = start()
    assert server.get("/sessions", headers=bearer(issuer.token("e1", algorithm="ES256"))).status_code == 200
    hs256 = jwt.encode(issuer.claims(), secret, algorithm="HS256", headers={"kid": "h1"})
    assert server.get("/sessions", headers=bearer(hs256)).status_code == 403
    # Another key's algorithm is refused even under the right key id.
    mixed = issuer.token("e1", key=issuer.keys["k1"])
    assert server.get("/sessions", headers=bearer(mixed)).status_code == 403


@pytest.fixture
def patient(start):
    """A coordinator that fetches the keys at most once an hour: forged key ids cost no fetch."""
    return start(jwks_min_fetch_interval=3600)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
HEADER = st.dictionaries(st.sampled_from(["alg", "kid", "typ", "crit", "jku", "b64"]), JSON | st.just("k1"), max_size=4)
CLAIMS = st.dictionaries(st.sampled_from(["iss", "aud", "exp", "nbf", "iat"]), JSON, max_size=5)


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(
    st.tuples(HEADER | JSON, CLAIMS | JSON, st.binary(max_size=300)).map(
        lambda t: forge(t[0], t[1], lambda _: t[2])
    ),
    # Any header value HTTP carries: latin-1 without spaces or control characters.
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0xFF, exclude_characters="\x7f"), min_size=1, max_size=200),
))
def test_any_forged_token_is_a_403(patient, token):
    answer = patient.get("/sessions", headers=bearer(token))
    assert (answer.status_code, answer.json()) == (403, INVALID)


# -- the verifier on its own: Auth0's fixed JWKS address, discovery mismatches ---------------


def test_verifier_with_a_fixed_jwks_address_skips_discovery(issuer):
    verifier = JwtVerifier(issuer.url, AUDIENCE, issuer.url + "/certs", 30)

    async def verify_both():
        await verifier.verify(issuer.token().encode())
        with pytest.raises(Rejected) as refused:
            await verifier.verify(issuer.token(aud="x").encode())
        assert (refused.value.status, refused.value.detail) == (403, INVALID["detail"])

    anyio.run(verify_both)
    assert (issuer.discovery_requests, issuer.jwks_requests) == (0, 1)


def test_discovery_naming_another_issuer_leaves_tokens_unchecked(issuer):
    verifier = JwtVerifier(issuer.url + "/", AUDIENCE, None, 30)  # the document says: without the slash
    with pytest.raises(Rejected) as refused:
        anyio.run(verifier.verify, issuer.token(iss=issuer.url + "/").encode())
    assert (refused.value.status, refused.value.detail) == (503, UNAVAILABLE["detail"])
    assert (issuer.discovery_requests, issuer.jwks_requests) == (1, 0)


# -- configuration ---------------------------------------------------------------------------


def test_auth0_settings_map_to_its_issuer_and_jwks():
    s = Settings.from_env({"AUTH_ENABLED": "true", "AUTH0_DOMAIN": " tenant.eu.auth0.com ", "AUTH0_AUDIENCE": AUDIENCE})
    assert s.jwt_issuer == "https://tenant.eu.auth0.com/"
    assert s.jwks_uri == "https://tenant.eu.auth0.com/.well-known/jwks.json"
    assert (s.jwt_audience, s.jwks_min_fetch_interval) == (AUDIENCE, 30)


def test_oidc_settings_use_discovery_and_either_audience():
    env = {"AUTH_ENABLED": "yes", "OIDC_ISSUER": "https://id.example/realms/x", "JWKS_MIN_FETCH_INTERVAL": "5"}
    s = Settings.from_env({**env, "OIDC_AUDIENCE": "api"})
    assert (s.jwt_issuer, s.jwks_uri, s.jwt_audience) == ("https://id.example/realms/x", None, "api")
    assert s.jwks_min_fetch_interval == 5
    assert Settings.from_env({**env, "AUTH0_AUDIENCE": "api"}).jwt_audience == "api"


@pytest.mark.parametrize("env, named", [
    ({"AUTH0_AUDIENCE": "a"}, "AUTH0_DOMAIN or OIDC_ISSUER"),
    ({"AUTH0_DOMAIN": "t.auth0.com"}, "AUTH0_AUDIENCE or OIDC_AUDIENCE"),
    ({"AUTH0_DOMAIN": "t.auth0.com", "OIDC_ISSUER": "https://t.auth0.com/", "AUTH0_AUDIENCE": "a"}, "not both"),
    ({"AUTH0_DOMAIN": "t.auth0.com", "AUTH0_AUDIENCE": "a", "OIDC_AUDIENCE": "b"}, "not both"),
    ({"AUTH0_DOMAIN": "", "OIDC_ISSUER": "", "AUTH0_AUDIENCE": "a"}, "AUTH0_DOMAIN or OIDC_ISSUER"),
    ({"AUTH0_DOMAIN": "https://t.auth0.com/", "AUTH0_AUDIENCE": "a"}, "AUTH0_DOMAIN='https://t.auth0.com/'"),
    ({"OIDC_ISSUER": "t.auth0.com", "OIDC_AUDIENCE": "a"}, "OIDC_ISSUER='t.auth0.com'"),
    ({"OIDC_ISSUER": "ftp://t.example", "OIDC_AUDIENCE": "a"}, "OIDC_ISSUER="),
    ({"OIDC_ISSUER": "https://t.example", "OIDC_AUDIENCE": "a", "JWKS_MIN_FETCH_INTERVAL": "-1"},
     "JWKS_MIN_FETCH_INTERVAL="),
])
def test_unusable_auth_configuration_names_the_variables(env, named):
    with pytest.raises(SettingsError) as error:
        Settings.from_env({"AUTH_ENABLED": "true", **env})
    assert named in str(error.value)


def test_auth_off_ignores_the_issuer_settings():
    # The framework's env files carry AUTH0_* for its runner, with AUTH_ENABLED false.
    s = Settings.from_env({"AUTH_ENABLED": "false", "AUTH0_DOMAIN": "t.auth0.com", "OIDC_AUDIENCE": "a"})
    assert s.auth_enabled is False


def test_auth_enabled_without_an_issuer_refuses_to_start(tmp_path):
    stderr = _start_fails(tmp_path, {"AUTH_ENABLED": "true", "COORDINATOR_API_TOKEN": STATIC})
    assert "AUTH_ENABLED=true needs the issuer (AUTH0_DOMAIN or OIDC_ISSUER" in stderr
    assert STATIC not in stderr


def test_pyjwt_is_imported_only_with_auth_enabled():
    script = ("import sys, coordinator as c; c.create_app(c.Settings(api_token='t')); print('jwt' in sys.modules);"
              " c.create_app(c.Settings(auth_enabled=True, oidc_issuer='https://i.example', oidc_audience='a'));"
              " print('jwt' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["False", "True"]


def test_process_checks_jwts_and_keeps_them_out_of_its_log(tmp_path, issuer):
    token = issuer.token()
    with ServerProcess(tmp_path / "project", AUTH_ENABLED="true", OIDC_ISSUER=issuer.url, OIDC_AUDIENCE=AUDIENCE,
                       DEBUG_LOGGING="true") as proc:
        assert proc.get("/sessions", headers=bearer(token)).status_code == 200
        with requests.get(proc.url + "/sse/sessions", params={"api_key": token}, stream=True, timeout=10) as r:
            assert r.status_code == 200
        assert proc.get("/sessions", headers=bearer(issuer.token(aud="x"))).status_code == 403
        proc.stop()
    log = proc.log()
    assert f"accepting JWTs of {issuer.url} for the audience {AUDIENCE}" in log
    assert f"fetched the signing keys of {issuer.url}: k1" in log
    assert "authentication is off" not in log
    assert token not in log and token.split(".")[2] not in log


def test_approval_decided_with_a_jwt_names_its_subject(start, issuer):
    server = start(api_token="static-approver-1")
    jwt_headers = bearer(issuer.token(sub="alice@example.com"))
    static = bearer("static-approver-1")
    assert server.post("/sessions", {"session_id": "s1"}, headers=static).status_code == 200
    decided_by = []
    for headers in (jwt_headers, static):
        r = server.post("/approvals", {"session_id": "s1", "tool_name": "Deploy"}, headers=headers)
        approval_id = r.json()["approval"]["approval_id"]
        r = server.post(f"/approvals/{approval_id}", {"decision": "allow"}, headers=headers)
        assert r.status_code == 200
        decided_by.append(r.json()["approval"]["decided_by"])
    assert decided_by == ["alice@example.com", "api"]
