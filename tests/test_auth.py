"""Opt-in bearer-token authentication, its configuration, and CORS without credentials."""

import subprocess
import sys

import pytest
import requests
from hypothesis import HealthCheck, given, settings, strategies as st
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from coordinator_core.settings import Settings, SettingsError
from server_process import ServerProcess
from test_live import recv

TOKEN = "tok-3f9a1c7e5b2d4a6f8e0c"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def guarded(make_server):
    return make_server(api_token=TOKEN)


def test_every_route_but_health_and_the_page_needs_the_token(guarded):
    assert guarded.get("/health").status_code == 200
    assert guarded.get("/").status_code == 200  # static HTML; everything it loads needs the token
    missing = guarded.get("/sessions")
    assert (missing.status_code, missing.json()) == (401, {"detail": "Not authenticated"})
    assert missing.headers["www-authenticate"] == "Bearer"
    for headers in ({"Authorization": "Bearer nope"}, {"Authorization": f"Bearer {TOKEN}x"},
                    {"Authorization": f"Bearer {TOKEN[:-1]}"}):
        wrong = guarded.get("/sessions", headers=headers)
        assert (wrong.status_code, wrong.json()) == (401, {"detail": "Invalid token"})
    assert guarded.get("/sessions", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    # Query tokens only count on the live streams.
    assert guarded.get(f"/sessions?api_key={TOKEN}").status_code == 401
    # Unknown routes do not reveal themselves without the token.
    assert guarded.get("/nope").status_code == 401
    assert guarded.get("/nope", headers=BEARER).status_code == 404
    assert guarded.post("/health").status_code == 401


def test_right_token_reads_and_writes_wrong_one_writes_nothing(guarded):
    assert guarded.post("/sessions", {"session_id": "no"}).status_code == 401
    assert guarded.post("/sessions", {"session_id": "no"}, headers={"Authorization": "Bearer x"}).status_code == 401
    ok = guarded.post("/sessions", {"session_id": "yes"}, headers={"Authorization": f"bearer  {TOKEN} "})
    assert ok.status_code == 200
    listed = guarded.get("/sessions", headers=BEARER).json()["sessions"]
    assert [s["session_id"] for s in listed] == ["yes"]


def test_live_streams_take_header_or_api_key(guarded):
    with pytest.raises(InvalidStatus) as rejected:
        connect(guarded.ws_url + "/ws")
    assert rejected.value.response.status_code == 401
    assert b"Not authenticated" in rejected.value.response.body
    with pytest.raises(InvalidStatus) as wrong:
        connect(guarded.ws_url + "/ws?api_key=nope")
    assert wrong.value.response.status_code == 401
    with connect(guarded.ws_url + f"/ws?api_key={TOKEN}") as ws:
        assert recv(ws)["type"] == "init"
    with connect(guarded.ws_url + "/ws", additional_headers=BEARER) as ws:
        assert recv(ws)["type"] == "init"

    assert guarded.get("/sse/sessions").status_code == 401
    assert guarded.get("/sse/sessions?api_key=nope").status_code == 401
    for kwargs in ({"params": {"api_key": TOKEN}}, {"headers": BEARER}):
        with requests.get(guarded.url + "/sse/sessions", stream=True, timeout=10, **kwargs) as r:
            assert r.status_code == 200 and next(r.iter_lines()).startswith(b"id: ")


# Header values as HTTP carries them: latin-1, no control characters, no surrounding spaces.
HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
                      max_size=80).map(str.strip)


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["/sessions", "/sse/sessions", "/runs", "/nope"]),
       st.none() | HEADER_TEXT | HEADER_TEXT.map(lambda t: "Bearer " + t) | st.just(f"Bearer {TOKEN}"),
       st.none() | st.text(max_size=40) | st.just(TOKEN))
def test_any_credential_is_a_200_or_a_401(guarded, path, authorization, api_key):
    headers = {"Authorization": authorization} if authorization is not None else {}
    params = {"api_key": api_key} if api_key is not None else {}
    scheme, _, presented = (authorization or "").partition(" ")
    if scheme.lower() == "bearer":
        right = presented.strip(" \t") == TOKEN
    else:
        right = path == "/sse/sessions" and api_key == TOKEN
    with requests.get(guarded.url + path, headers=headers, params=params, stream=True, timeout=10) as r:
        assert r.status_code == ((404 if path == "/nope" else 200) if right else 401)


def test_preflight_needs_no_token_and_401_carries_cors_headers(guarded):
    preflight = requests.options(
        guarded.url + "/sessions", timeout=10,
        headers={"Origin": "http://dash.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"},
    )
    assert preflight.status_code == 200
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    denied = guarded.get("/sessions", headers={"Origin": "http://dash.example"})
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == "*"


def test_without_a_token_credentials_are_ignored(server):
    assert server.get("/sessions", headers={"Authorization": "Bearer anything"}).status_code == 200
    assert server.post("/sessions", {"session_id": "s"}, headers={"Authorization": "Basic eDp5"}).status_code == 200
    with requests.get(server.url + "/sse/sessions?api_key=jwt", stream=True, timeout=10) as r:
        assert r.status_code == 200
    with connect(server.ws_url + "/ws?api_key=jwt", additional_headers={"Authorization": "Bearer jwt"}) as ws:
        assert recv(ws)["type"] == "init"


@pytest.mark.parametrize("origins", [("*",), ("http://dash.example",)])
def test_cors_never_allows_credentials(make_server, origins):
    srv = make_server(cors_origins=origins)
    preflight = requests.options(
        srv.url + "/sessions", timeout=10,
        headers={"Origin": "http://dash.example", "Access-Control-Request-Method": "GET", "Cookie": "sid=1",
                 "Access-Control-Request-Headers": "authorization"},
    )
    assert preflight.status_code == 200
    assert "access-control-allow-credentials" not in preflight.headers
    plain = srv.get("/sessions", headers={"Origin": "http://dash.example", "Cookie": "sid=1"})
    assert "access-control-allow-credentials" not in plain.headers
    assert plain.headers["access-control-allow-origin"] in ("*", "http://dash.example")


# -- configuration ------------------------------------------------------------------------


def test_token_from_env_or_file(tmp_path):
    assert Settings.from_env({}).api_token is None
    assert Settings.from_env({"COORDINATOR_API_TOKEN": f" {TOKEN}\n"}).api_token == TOKEN
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    assert Settings.from_env({"COORDINATOR_API_TOKEN_FILE": str(path)}).api_token == TOKEN


@pytest.mark.parametrize("kind", ["missing", "directory", "empty", "both"])
def test_unusable_token_configuration_names_the_variable(tmp_path, kind):
    (tmp_path / "empty").write_text("\n")
    env = {
        "missing": {"COORDINATOR_API_TOKEN_FILE": str(tmp_path / "nope")},
        "directory": {"COORDINATOR_API_TOKEN_FILE": str(tmp_path)},
        "empty": {"COORDINATOR_API_TOKEN_FILE": str(tmp_path / "empty")},
        "both": {"COORDINATOR_API_TOKEN": TOKEN, "COORDINATOR_API_TOKEN_FILE": str(tmp_path / "empty")},
    }[kind]
    with pytest.raises(SettingsError, match="COORDINATOR_API_TOKEN_FILE") as error:
        Settings.from_env(env)
    assert TOKEN not in str(error.value)
    with pytest.raises(SettingsError, match="COORDINATOR_API_TOKEN="):
        Settings.from_env({"COORDINATOR_API_TOKEN": "  "})


def _start_fails(tmp_path, env) -> str:
    proc = subprocess.run([sys.executable, "-m", "coordinator", "--port", "0"], env={"PATH": "/usr/bin:/bin", **env},
                          cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr


def test_unreadable_token_file_stops_startup(tmp_path):
    assert "COORDINATOR_API_TOKEN_FILE" in _start_fails(tmp_path, {"COORDINATOR_API_TOKEN_FILE": str(tmp_path / "x")})


def test_process_with_token_file_keeps_the_token_out_of_its_log(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with ServerProcess(tmp_path / "project", COORDINATOR_API_TOKEN_FILE=str(token_file), DEBUG_LOGGING="true") as proc:
        assert proc.get("/sessions").status_code == 401
        assert proc.get("/sessions", headers=BEARER).status_code == 200
        assert proc.post("/sessions", {"session_id": "s"}, headers=BEARER).status_code == 200
        with requests.get(proc.url + f"/sse/sessions?api_key={TOKEN}", stream=True, timeout=10) as r:
            assert r.status_code == 200
        ws_url = proc.url.replace("http", "ws")
        for url, headers in ((ws_url + f"/ws?api_key={TOKEN}", None), (ws_url + "/ws", BEARER)):
            with connect(url, additional_headers=headers) as ws:
                assert recv(ws)["type"] == "init"
        with pytest.raises(InvalidStatus):
            connect(ws_url + f"/ws?api_key={TOKEN}wrong")
        assert proc.get(f"/sessions?api_key={TOKEN}").status_code == 401
        proc.stop()  # a graceful stop writes the request lines still waiting to be written
    log = proc.log()
    assert "/sse/sessions" in log and "/ws" in log  # requests are logged, tokens are not
    assert TOKEN not in log
