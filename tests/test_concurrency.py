"""Many writers and readers at once: no 5xx ("database is locked" or otherwise), and every
acknowledged write is there afterwards, exactly once."""

import threading
import time
from collections import defaultdict

import requests

from test_sessions import event

THREADS = 8
SECONDS = 3.0
MAX_ROUNDS = 500  # per thread, whatever the machine's speed


class Worker:
    """One client thread: creates its own sessions, posts events into them (legacy route too),
    reads them back, patches their metadata, deletes some, and reads others' all the while.
    Remembers what was acknowledged."""

    def __init__(self, url: str, index: int, deadline: float):
        self.url, self.index, self.deadline = url, index, deadline
        self.http = requests.Session()
        self.sessions: set[str] = set()
        self.deleted: set[str] = set()
        self.events: dict[str, list[int]] = defaultdict(list)  # session -> markers acknowledged
        self.agent_name: dict[str, str] = {}  # session -> last acknowledged patch
        self.statuses: list[int] = []
        self.stale: list[tuple[str, list[int]]] = []  # event lists missing acknowledged events

    def call(self, method: str, path: str, **kwargs) -> requests.Response:
        response = self.http.request(method, self.url + path, timeout=30, **kwargs)
        self.statuses.append(response.status_code)
        return response

    def run(self) -> None:
        with self.http:
            self.rounds()

    def rounds(self) -> None:
        for n in range(MAX_ROUNDS):
            if time.monotonic() > self.deadline:
                return
            sid = f"t{self.index}-{n}"
            if n % 2:
                created = self.call("POST", "/sessions", json={"session_id": sid})
            else:
                created = self.call("POST", "/events", json=event(sid, "session_start", tool_input={"m": -1}))
                if created.status_code == 200:
                    self.events[sid].append(-1)
            if created.status_code != 200:
                continue
            self.sessions.add(sid)
            for marker in range(3):
                body = event(sid, tool_input={"m": marker})
                if self.call("POST", f"/sessions/{sid}/events", json=body).status_code == 200:
                    self.events[sid].append(marker)
            # Read-your-writes through the cached whole list: only this thread writes to `sid`.
            listed = self.call("GET", f"/sessions/{sid}/events")
            if listed.status_code == 200:
                markers = sorted(e["tool_input"]["m"] for e in listed.json()["events"])
                if markers != sorted(self.events[sid]):
                    self.stale.append((sid, markers))
            patched = self.call("PATCH", f"/sessions/{sid}/metadata", json={"agent_name": f"agent-{n}"})
            if patched.status_code == 200:
                self.agent_name[sid] = f"agent-{n}"
            self.call("GET", "/sessions?limit=20")
            self.call("GET", f"/sessions/{sid}/events?after=0&limit=2")
            self.call("GET", f"/events/t{(self.index + 1) % THREADS}-{n}")
            if n % 5 == 4 and self.call("DELETE", f"/sessions/{sid}").status_code == 200:
                self.deleted.add(sid)


def test_concurrent_writers_and_readers_lose_nothing(server):
    deadline = time.monotonic() + SECONDS
    workers = [Worker(server.url, i, deadline) for i in range(THREADS)]
    threads = [threading.Thread(target=w.run) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=SECONDS + 60)
    assert not any(t.is_alive() for t in threads)

    statuses = [s for w in workers for s in w.statuses]
    assert len(statuses) > THREADS * 20, "the load never got going"
    assert all(s < 500 for s in statuses), sorted(set(statuses))
    assert set(statuses) <= {200}  # nobody's write or read conflicted with another's
    assert [stale for w in workers for stale in w.stale] == []

    stored = {s["session_id"]: s for s in server.get("/sessions").json()["sessions"]}
    for w in workers:
        for sid in w.sessions - w.deleted:
            assert sid in stored
            markers = [e["tool_input"]["m"] for e in server.get(f"/sessions/{sid}/events").json()["events"]]
            assert sorted(markers) == sorted(w.events[sid])  # each acknowledged event exactly once
            assert stored[sid]["agent_name"] == w.agent_name.get(sid)
        for sid in w.deleted:
            assert sid not in stored
            assert server.get(f"/events/{sid}").json()["events"] == []


def test_legacy_session_start_of_one_session_from_many_threads(server):
    """Upserts of one session land in the same group commits: each must still answer 200."""
    assert server.post("/events", event("s", "session_start")).status_code == 200
    statuses: list[int] = []

    def post_many():
        with requests.Session() as http:
            for _ in range(60):
                statuses.append(http.post(server.url + "/events", json=event("s", "session_start"), timeout=30).status_code)

    threads = [threading.Thread(target=post_many) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200] * THREADS * 60
    assert len(server.get("/sessions/s/events").json()["events"]) == THREADS * 60 + 1
    assert server.get("/sessions/s").json()["session"]["status"] == "running"
