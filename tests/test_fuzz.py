"""Bad input never yields a 500: random bodies, path segments and query values at every HTTP
route of the app (enumerated from the app itself, so new routes are covered), then a check that
the store is consistent, everything written reads back, and the server still answers."""

import http.client
import json
import sys
from urllib.parse import quote, unquote

import apsw
import msgspec
import msgspec.inspect as mi
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from starlette.routing import Route, WebSocketRoute
from websockets.sync.client import connect

from coordinator import create_app
from coordinator_core.settings import Settings
from store import agents as agent_store, models

# The server under test runs in this process, and on PostgreSQL its connection pool draws from
# the global random generator in its own threads (jittering connection lifetimes); hypothesis
# would take that for a strategy using the global generator and warn mid-example.
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")

EXAMPLES_PER_ROUTE = 40
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES_PER_ROUTE,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)

APP_ROUTES = create_app(Settings()).routes  # building the app touches nothing; its lifespan does
assert all(isinstance(r, (Route, WebSocketRoute)) for r in APP_ROUTES), "fuzz new kinds of routes too"
HTTP_ROUTES = sorted({(m, r.path) for r in APP_ROUTES if isinstance(r, Route) for m in r.methods if m != "HEAD"})

# Every request and record Struct: bodies shaped like them reach past validation, and their
# field names make the merely random bodies look almost right.
STRUCTS = sorted({obj for module in (models, agent_store) for obj in vars(module).values()
                  if isinstance(obj, type) and issubclass(obj, msgspec.Struct)}, key=lambda c: c.__qualname__)
FIELDS = sorted({name for struct in STRUCTS for name in struct.__struct_fields__} | {"type"})
QUERY_KEYS = ["limit", "after", "status", "since", "session_id", "include_init", "last_event_id", "tags",
              "runner_id", "self", "api_key", "created_by"]
WORDS = ["session_start", "session_stop", "message", "post_tool", "assistant", "user", "start_session",
         "resume_session", "sync", "async_poll", "async_callback", "active", "inactive", "pending", "running",
         "finished", "stdio", "http", "2025-01-01T00:00:00.000000+00:00", "s1", "a1", "true", "0", "-1"]

# -- strategies ---------------------------------------------------------------------------


def picked(items: list):
    """Like `sampled_from`, without the items in its repr (some are huge)."""
    return st.integers(0, len(items) - 1).map(items.__getitem__)


BIG = picked(["x" * 10_240, "é" * 100_000, "\x00" * 1000, "[" * 5000])


def _deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def bodies(known: list[str], structs: list[type], ids: dict):
    """Request bodies: none, random bytes, random JSON, hostile JSON, and JSON shaped like the
    given Structs, exactly or with wrong values thrown in. A field named like an id (`ids`:
    name -> strategy) often holds a known one, or the path's (shared strategies)."""
    text = st.one_of(st.sampled_from(known), st.sampled_from(WORDS), st.text(max_size=30), BIG)
    integers = st.integers() | st.sampled_from([2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**400])
    scalars = st.one_of(st.none(), st.booleans(), integers, st.floats(), text)
    values = st.recursive(
        scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4), max_leaves=12
    )

    def shaped(t: mi.Type, sloppy: bool):
        """Values of a msgspec type; if sloppy, some wrong ones (and unknown keys) too."""
        if isinstance(t, mi.StructType):
            def field(f):
                own = shaped(f.type, sloppy)
                return own | ids[f.name] if f.name in ids else own

            required = {f.encode_name: field(f) for f in t.fields if f.required}
            optional = {f.encode_name: field(f) for f in t.fields if not f.required}
            tag = {t.tag_field: st.just(t.tag)} if t.tag_field else {}
            return st.fixed_dictionaries(tag | required, optional=optional | ({"unknown": values} if sloppy else {}))
        kinds = {
            mi.StrType: text, mi.IntType: integers, mi.FloatType: st.floats(), mi.BoolType: st.booleans(),
            mi.NoneType: st.none(),
        }
        if type(t) in kinds:
            right = kinds[type(t)]
        elif isinstance(t, mi.LiteralType):
            right = st.sampled_from(t.values)
        elif isinstance(t, mi.UnionType):
            right = st.one_of([shaped(member, sloppy) for member in t.types])
        elif isinstance(t, mi.ListType):
            right = st.lists(shaped(t.item_type, sloppy), max_size=3)
        elif isinstance(t, mi.DictType):
            right = st.dictionaries(text, shaped(t.value_type, sloppy), max_size=3)  # JSON keys are strings
        else:
            right = values
        return st.one_of(right, right, right, values) if sloppy else right

    def encode(value) -> bytes:
        return json.dumps(value).encode()

    exact = st.one_of([shaped(mi.type_info(struct), False) for struct in structs])
    sloppy = st.one_of([shaped(mi.type_info(struct), True) for struct in structs])
    return st.one_of(
        st.none(),
        st.binary(max_size=300),  # invalid UTF-8 included
        values.map(encode),
        st.dictionaries(st.sampled_from(FIELDS), values | st.lists(text, max_size=3), max_size=8).map(encode),
        exact.map(encode),
        exact.map(encode),
        exact.map(encode),
        sloppy.map(encode),
        sloppy.map(lambda v: encode(v).replace(b'"', b'"\xff', 1)),  # a key that is not UTF-8
        picked([b"", _deep(63), _deep(65), _deep(100_000), b"[" * 100_000, b'{"a":' * 1000,
                b"1" * (1024 * 1024 + 1), b'{"session_id": "' + b"y" * 1_000_000 + b'"}']),
    )


def structs_near(route: Route) -> list[type]:
    """The Structs a route's module decodes bodies into (those it names, if one of its decoders
    takes any object), else all of them."""
    namespace = list(vars(sys.modules[route.endpoint.__module__]).values())
    decoded = [d.type for d in namespace if isinstance(d, msgspec.json.Decoder)]
    if any(t not in STRUCTS for t in decoded):
        decoded += namespace
    return [s for s in STRUCTS if s in decoded] or STRUCTS


ODD_SEGMENTS = [
    "", ".", "..", "%2e%2e", "%2F", "..%2F..%2Fetc%2Fpasswd", "%00", "a%00b", "%FF", "%C3%28", "%E2%82",
    "%", "%zz", "%20", "~", "%25", "con", "NUL", "a" * 10_240, "%F0%9F%98%80", ";", "a;b=c", "*",
]


def _encoded(text: str) -> str:
    return quote(text, safe="")


def segments(known: list[str]):
    odd = st.one_of(picked(ODD_SEGMENTS), st.text(max_size=20).map(_encoded))
    return odd | st.sampled_from(known) if known else odd


QUERY_VALUES = st.one_of(picked(["", "%00", "%FF", "-1", "0", "1", "1001", "9" * 5000, "99999999999999999999",
                                 "%C2%B2", "%D9%A3", "true", "maybe", "s1", "a1", "1.5", "%2C%2C", ",a,,b"]),
                         st.text(max_size=20).map(_encoded))
QUERIES = st.lists(st.tuples(st.sampled_from(QUERY_KEYS) | st.text(max_size=8).map(_encoded), QUERY_VALUES),
                   max_size=4).map(lambda pairs: "&".join(f"{k}={v}" for k, v in pairs))
HEADERS = st.fixed_dictionaries({
    "Content-Type": st.sampled_from([None, "application/json", "text/plain", "application/x-www-form-urlencoded",
                                     "multipart/form-data; boundary=x", "application/json; charset=latin-1"]),
    # Control characters are not HTTP: the HTTP server refuses them before the app is reached.
    "Last-Event-ID": st.none() | QUERY_VALUES.map(
        lambda v: "".join(c for c in unquote(v, encoding="latin-1") if c >= " " and c != "\x7f")),
})


# -- requests -----------------------------------------------------------------------------


def send(port: int, method: str, target: str, body: bytes | None = None, headers: dict | None = None,
         chunked: bool = False) -> tuple[int, dict, bytes | None]:
    """One request on its own connection. Of a stream, only its start is read: it must begin
    (or wait) without breaking."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = {k: v for k, v in (headers or {}).items() if v is not None}
        if chunked and body is not None:
            conn.request(method, target, body=iter([body[:len(body) // 2], body[len(body) // 2:]]),
                         headers=headers, encode_chunked=True)
        else:
            conn.request(method, target, body=body, headers=headers)
        response = conn.getresponse()
        answer = {k.lower(): v for k, v in response.getheaders()}
        if not answer.get("content-type", "").startswith("text/event-stream"):
            return response.status, answer, response.read()
        conn.sock.settimeout(0.2)
        try:
            response.read1(65536)
        except TimeoutError:
            pass  # a stream without init waits for news
        return response.status, answer, None
    finally:
        conn.close()


def check_answer(method: str, status: int, headers: dict, body: bytes | None) -> None:
    assert status < 500, (status, body[:500] if body else body)
    if status == 307:  # trailing slash: a redirect to the path without it
        assert "location" in headers
        return
    assert 200 <= status < 500, status
    if method == "HEAD" or status == 204 or body is None:
        return
    if status >= 400 or headers.get("content-type", "").startswith("application/json"):
        assert headers["content-type"].startswith("application/json"), headers
        decoded = json.loads(body)
        if status >= 400:
            assert "detail" in decoded


def seed(server) -> dict[str, list[str]]:
    """Known ids for every kind of path parameter, so that fuzzing reaches past the 404s."""
    assert server.post("/sessions", {"session_id": "s1"}).status_code == 200
    assert server.post("/sessions", {"session_id": "child", "parent_session_id": "s1"}).status_code == 200
    event = {"event_type": "message", "session_id": "s1", "timestamp": "2025-01-01T00:00:00Z", "role": "assistant",
             "content": [{"type": "text", "text": "hi"}]}
    assert server.post("/sessions/s1/events", event).status_code == 200
    assert server.post("/agents", {"name": "a1", "description": "d"}).status_code == 201
    runner = server.post("/runner/register", {"hostname": "h", "project_dir": "/p", "executor_type": "t"}).json()
    run = server.post("/runs", {"type": "start_session", "prompt": "p"}).json()
    return {"session_id": ["s1", "child", run["session_id"]], "run_id": [run["run_id"]],
            "runner_id": [runner["runner_id"]], "name": ["a1"]}


def check_store_and_reads(server) -> None:
    """After fuzzing: the database is sound, every stored thing reads back, the server answers."""
    if server.settings.database_url is None:  # PostgreSQL checks its foreign keys itself
        with apsw.Connection(str(server.settings.db_path)) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    reads = ["/health", "/sessions", "/runs", "/runners", "/agents"]
    for s in server.get("/sessions").json()["sessions"]:
        sid = _encoded(s["session_id"])
        reads += [f"/sessions/{sid}{tail}" for tail in ("", "/events", "/status", "/result", "/affinity")]
    reads += [f"/runs/{_encoded(r['run_id'])}" for r in server.get("/runs").json()["runs"]]
    reads += [f"/agents/{_encoded(a['name'])}" for a in server.get("/agents").json()]
    # Ids of (nearly) a megabyte are listed above, but no HTTP server takes such a request line.
    for path in (p for p in reads if len(p) < 16_384):
        check_answer("GET", *send(server.port, "GET", path))
    assert server.get("/health").status_code == 200


# -- tests --------------------------------------------------------------------------------


@pytest.fixture
def fuzz_server(make_server):
    # Long-polls of the seeded runner return at once, so examples stay quick.
    return make_server(runner_poll_timeout=0.05, runner_lifecycle_interval=0.5)


@pytest.mark.parametrize("method,path", HTTP_ROUTES, ids=[f"{m} {p}" for m, p in HTTP_ROUTES])
def test_route_never_answers_500(fuzz_server, method, path):
    known = seed(fuzz_server)
    route = next(r for r in APP_ROUTES if isinstance(r, Route) and r.path == path and method in r.methods)
    params = list(route.param_convertors)
    seeded = [value for values in known.values() for value in values]
    path_ids = {p: st.shared(segments(known.get(p, [])), key=p) for p in params}
    ids = {name: st.sampled_from(values) for name, values in known.items()} | path_ids

    @FUZZ_SETTINGS
    @given(st.fixed_dictionaries(path_ids), QUERIES, bodies(seeded, structs_near(route), ids), HEADERS,
           st.booleans(), st.sampled_from([method] * 8 + ["HEAD", "PUT", "DELETE", "PATCH"]))
    def fuzz(values, query, body, headers, chunked, verb):
        target = route.path_format.format(**values) + (f"?{query}" if query else "")
        check_answer(verb, *send(fuzz_server.port, verb, target, body, headers, chunked))

    fuzz()
    check_store_and_reads(fuzz_server)


@FUZZ_SETTINGS
@given(st.lists(picked(ODD_SEGMENTS) | st.text(max_size=10).map(_encoded), max_size=4), QUERIES,
       st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]))
def test_unmatched_paths_answer_json(fuzz_server, parts, query, verb):
    target = "/" + "/".join(parts) + (f"?{query}" if query else "")
    check_answer(verb, *send(fuzz_server.port, verb, target))


@pytest.mark.parametrize("cursor", ["%C2%B2", "99999999999999999999", "9" * 5000, "-1", "1e3", "%20", "0x10", ""])
def test_live_streams_take_any_cursor(fuzz_server, cursor):
    """/ws is left out above; its resume cursor (and SSE's) must not break a stream either."""
    seed(fuzz_server)
    with connect(f"{fuzz_server.ws_url}/ws?since={cursor}") as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "init"
        fuzz_server.post("/sessions", {"session_id": "new"})
        assert json.loads(ws.recv(timeout=10))["type"] in ("event", "replay_gap", "session_created")
    by_query = send(fuzz_server.port, "GET", f"/sse/sessions?last_event_id={cursor}")
    by_header = send(fuzz_server.port, "GET", "/sse/sessions", headers={"Last-Event-ID": unquote(cursor) or None})
    assert by_query[0] == by_header[0] == 200
    assert fuzz_server.get("/health").status_code == 200
