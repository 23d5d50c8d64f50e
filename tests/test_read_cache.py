"""The read cache: the LRU itself, the writer's triggers dropping exactly what a commit changed
(on a real APSW file), and the cached routes following every kind of change on a real server."""

import anyio
import msgspec
import pytest

from coordinator_core.settings import Settings, SettingsError
from store import cache, events, sessions
from store.cache import ReadCache
from store.db import Database
from store.models import Event
from store.retention import delete_expired_sessions
from test_sessions import create, event

# -- the LRU -------------------------------------------------------------------------------


def fill(c: ReadCache, key: str, value: bytes) -> None:
    c.fill(key, c.start_fill(key), value)


def test_lru_keeps_within_its_bytes_and_evicts_the_least_recently_used():
    c = ReadCache(max_bytes=10)
    fill(c, "a", b"aaaa")
    fill(c, "b", b"bbbb")
    assert c.get("a") == b"aaaa"  # now b is the least recently used
    fill(c, "c", b"cccc")
    assert (c.get("a"), c.get("b"), c.get("c")) == (b"aaaa", None, b"cccc")
    assert c.size == 8
    fill(c, "a", b"a")  # replacing an entry counts only the new value
    assert c.size == 5
    fill(c, "big", b"x" * 11)  # larger than the whole cache: not kept, nothing evicted
    assert (c.get("big"), len(c), c.size) == (None, 2, 5)


def test_a_fill_is_refused_once_its_key_was_dropped():
    c = ReadCache(max_bytes=100)
    token = c.start_fill("k")
    c.drop(["k"])  # a commit changed the rows while the read ran
    c.fill("k", token, b"stale")
    assert c.get("k") is None
    older, newer = c.start_fill("k"), c.start_fill("k")
    c.fill("k", older, b"older")  # superseded by a later read of the same key
    assert c.get("k") is None
    c.fill("k", newer, b"newer")
    assert c.get("k") == b"newer"
    c.fill("k", c.start_fill("k"), None)  # a failed read stores nothing and leaves the entry
    assert c.get("k") == b"newer"
    c.drop(["k", "unknown"])
    assert (c.get("k"), len(c), c.size) == (None, 0, 0)


# -- the writer's triggers on a real database ----------------------------------------------


@pytest.fixture
def db(tmp_path):
    database = Database(tmp_path / "observability.db")
    yield database
    database.close()


def stored_event(session_id: str, event_type: str = "post_tool") -> Event:
    return msgspec.convert(event(session_id, event_type), Event)


KEYS = [cache.SESSIONS, cache.events_key("a"), cache.events_key("b")]


def cached_keys(db: Database) -> set[str]:
    return {key for key in KEYS if db.cache.get(key) is not None}


def fill_all(db: Database) -> None:
    for key in KEYS:
        fill(db.cache, key, key.encode())


@pytest.mark.parametrize(
    "change, dropped",
    [
        (lambda conn: events.append_event(conn, "a", stored_event("a")), {cache.events_key("a")}),
        (lambda conn: events.append_legacy_event(conn, stored_event("b", "session_start")),
         {cache.SESSIONS, cache.events_key("b")}),  # "b" comes to life
        (lambda conn: events.append_event(conn, "a", stored_event("a", "session_stop")),
         {cache.SESSIONS, cache.events_key("a")}),
        (lambda conn: sessions.update_session(conn, "a", agent_name="x"), {cache.SESSIONS}),
        (lambda conn: sessions.delete_session(conn, "a"), {cache.SESSIONS, cache.events_key("a")}),
        (lambda conn: sessions.create_session(conn, "c"), {cache.SESSIONS}),
    ],
    ids=["event", "legacy session_start", "session_stop", "session update", "delete", "new session"],
)
def test_a_commit_drops_exactly_the_answers_it_changed(db, change, dropped):
    db.write_sync(sessions.create_session, "a")
    db.write_sync(events.append_event, "a", stored_event("a"))
    fill_all(db)
    db.write_sync(change)
    assert cached_keys(db) == set(KEYS) - dropped


def test_deleting_a_session_without_events_drops_its_event_list(db):
    # Its answer turns from an empty list into a 404, though no event row changed.
    db.write_sync(sessions.create_session, "b")
    fill_all(db)
    db.write_sync(sessions.delete_session, "b")
    assert cached_keys(db) == {cache.events_key("a")}


def test_retention_drops_what_it_deleted(db):
    db.write_sync(sessions.create_session, "a")
    db.write_sync(events.append_event, "a", stored_event("a", "session_stop"))
    fill_all(db)
    assert db.write_sync(delete_expired_sessions, "9999") == ["a"]
    assert cached_keys(db) == {cache.events_key("b")}


def test_a_rolled_back_write_drops_nothing(db):
    db.write_sync(sessions.create_session, "a")
    fill_all(db)

    def insert_then_fail(conn):
        events.append_event(conn, "a", stored_event("a"))
        raise RuntimeError("changed its mind")

    with pytest.raises(RuntimeError):
        db.write_sync(insert_then_fail)
    assert cached_keys(db) == set(KEYS)


def test_a_read_overtaken_by_a_commit_is_not_kept(db):
    db.write_sync(sessions.create_session, "a")
    key = cache.events_key("a")

    def read_then_commit(conn):
        answer = events.session_events_json(conn, "a")  # this snapshot has no event
        db.write_sync(events.append_event, "a", stored_event("a"))  # committed while the read runs
        return answer

    stale = anyio.run(db.read_cached, key, read_then_commit)
    assert msgspec.json.decode(stale) == {"events": []}
    assert db.cache.get(key) is None
    fresh = anyio.run(db.read_cached, key, events.session_events_json, "a")
    assert len(msgspec.json.decode(fresh)["events"]) == 1
    assert db.cache.get(key) == fresh


def test_an_unknown_session_is_not_kept(db):
    assert anyio.run(db.read_cached, cache.events_key("nope"), events.session_events_json, "nope") is None
    assert len(db.cache) == 0


# -- the routes ----------------------------------------------------------------------------


def event_ids(server, path):
    r = server.get(path)
    assert r.status_code == 200
    return [e["event_type"] for e in r.json()["events"]]


@pytest.mark.parametrize("cache_mb", [32, 0])
def test_event_lists_follow_every_kind_of_change(make_server, cache_mb):
    server = make_server(read_cache_mb=cache_mb)
    create(server, "a")
    assert event_ids(server, "/sessions/a/events") == []
    server.post("/sessions/a/events", event("a", "pre_tool"))
    assert event_ids(server, "/sessions/a/events") == ["pre_tool"]
    assert event_ids(server, "/events/a") == ["pre_tool"]
    server.post("/events", event("a", "post_tool"))
    assert event_ids(server, "/events/a") == ["pre_tool", "post_tool"]
    assert event_ids(server, "/sessions/a/events") == ["pre_tool", "post_tool"]
    assert event_ids(server, "/sessions/a/events?after=0&limit=1") == ["pre_tool"]
    assert len(server.state.db.cache) == (1 if cache_mb else 0)
    server.delete("/sessions/a")
    r = server.get("/sessions/a/events")
    assert (r.status_code, r.json()) == (404, {"detail": "Session not found"})
    assert event_ids(server, "/events/a") == []
    server.post("/events", event("a", "session_start"))  # the legacy route brings it back
    assert event_ids(server, "/sessions/a/events") == ["session_start"]


def test_cache_size_setting():
    assert Settings().read_cache_mb == 32
    assert Settings.from_env({"READ_CACHE_MB": "0.5"}).read_cache_mb == 0.5
    with pytest.raises(SettingsError, match="READ_CACHE_MB"):
        Settings.from_env({"READ_CACHE_MB": "-1"})
