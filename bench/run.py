"""The benchmark: every workload against the coordinator and the bare limit app, alternately,
and the ratio of the two. `python -m bench.run [--quick] [--rounds N] [--database-url URL]`
(with a URL, the coordinator stores in that PostgreSQL database, a new schema per server).

Server and load generator are pinned to different CPUs (when there are two); a load generator
that uses most of its CPU is flagged, since then it, not the server, sets the pace.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import apsw
import msgspec

from bench.dispatch import dispatch
from bench.fanout import event_body, fanout
from bench.harness import (
    CPUS,
    LOAD_CPU,
    LoadResult,
    Server,
    current_rss_mb,
    database_env,
    fetch_all,
    http_load,
    percentile,
    pin_to,
    request_bytes,
    rss_mb,
)

INGEST_SESSIONS = [f"ses_ingest{i}" for i in range(4)]


@dataclass
class Sample:
    throughput: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    lost: int = 0
    saturated: bool = False

    def add(self, throughput: float, latencies: list[float]) -> None:
        self.throughput.append(throughput)
        self.p50.append(percentile(latencies, 50))
        self.p99.append(percentile(latencies, 99))

    def median(self, values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")


# -- workloads (each returns throughput and latencies for one server) ----------------------


def ingest(port: int, seconds: float, legacy: bool) -> LoadResult:
    def make(worker: int, n: int) -> bytes:
        session_id = INGEST_SESSIONS[worker % len(INGEST_SESSIONS)]
        path = "/events" if legacy else f"/sessions/{session_id}/events"
        return request_bytes("POST", path, event_body(session_id, n))

    return http_load(port, make, concurrency=16, seconds=seconds)


def read(port: int, seconds: float, path: str) -> LoadResult:
    raw = request_bytes("GET", path)
    return http_load(port, lambda w, n: raw, concurrency=8, seconds=seconds)


# -- set-up ------------------------------------------------------------------------------


def seed(port: int, sessions: list[str], events_per_session: dict[str, int], pad_to: int = 0) -> None:
    """Create sessions (padded to `pad_to` sessions in all) and their events."""
    body = msgspec.json.encode
    names = sessions + [f"ses_pad{i:04d}" for i in range(pad_to - len(sessions))]
    raws = [request_bytes("POST", "/sessions", body({"session_id": sid, "project_dir": "/p"})) for sid in names]
    for sid, count in events_per_session.items():
        raws += [request_bytes("POST", f"/sessions/{sid}/events", event_body(sid, n)) for n in range(count)]
    fetch_all(port, raws)


def seed_million_postgres(url: str, events: int) -> None:
    """`seed_million` for a coordinator on PostgreSQL (its schema made first, as a start would)."""
    import psycopg

    from store.postgres import migrate

    data = msgspec.json.decode(event_body("ses_big", 0))
    with psycopg.connect(url) as conn:
        migrate(conn)
        conn.execute("INSERT INTO sessions (session_id, status, created_at) VALUES ('ses_big', 'running', 't')")
        conn.execute(
            "INSERT INTO events (session_id, event_type, timestamp, tool_name, tool_input, tool_output)"
            " SELECT 'ses_big', 'post_tool', '2025-01-01T00:00:' || lpad(i::text, 9, '0'), 'Bash', %s, %s"
            " FROM generate_series(0, %s - 1) i",
            (msgspec.json.encode(data["tool_input"]).decode(), msgspec.json.encode(data["tool_output"]).decode(),
             events),
        )
        conn.execute("INSERT INTO changes (id, type, session_id) SELECT id, 'event', session_id FROM events")


def seed_million(db_path: Path, events: int) -> None:
    """Write `events` stored events straight into a fresh database (the server is not running)."""
    conn = apsw.Connection(str(db_path))
    from store.sqlite import migrate

    migrate(conn)
    payload = event_body("ses_big", 0)
    data = msgspec.json.decode(payload)
    with conn:
        conn.execute("INSERT INTO sessions (session_id, status, created_at) VALUES ('ses_big', 'running', 't')")
        conn.executemany(
            "INSERT INTO events (session_id, event_type, timestamp, tool_name, tool_input, tool_output)"
            " VALUES ('ses_big', 'post_tool', ?, 'Bash', ?, ?)",
            ((f"2025-01-01T00:00:{i:09d}", msgspec.json.encode(data["tool_input"]).decode(),
              msgspec.json.encode(data["tool_output"]).decode()) for i in range(events)),
        )
        # Each event is a change of the live log too, under the same id.
        conn.execute("INSERT INTO changes (id, type, session_id) SELECT id, 'event', session_id FROM events")
    conn.close()


# -- the run -----------------------------------------------------------------------------


def fmt(value: float, digits: int = 1) -> str:
    return "-" if value != value else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--database-url", metavar="URL", help="run the coordinator on this PostgreSQL database")
    args = parser.parse_args()
    database_url = args.database_url
    quick = args.quick
    rounds = 1 if quick else args.rounds
    seconds = 0.5 if quick else 3.0
    fan_sizes = (1, 10) if quick else (1, 50, 200)
    fan_seconds = 0.5 if quick else 4.0
    dispatch_runs = 20 if quick else 300
    growth_events = 10_000 if quick else 1_000_000
    pin_to(LOAD_CPU)

    results: dict[tuple[str, str], Sample] = {}
    memory: dict[str, float] = {}

    def record(workload: str, server: Server, throughput: float, latencies: list[float], cpu=0.0, lost=0):
        sample = results.setdefault((workload, server.name), Sample())
        sample.add(throughput, latencies)
        sample.lost += lost
        sample.saturated |= cpu > 0.9

    coordinator, limit = Server(env=database_env(database_url)), Server(limit=True)
    with coordinator, limit:
        memory["idle"] = current_rss_mb(coordinator.proc.pid)
        for server in (coordinator, limit):
            seed(server.port, ["ses_100", "ses_1000", *INGEST_SESSIONS], {"ses_100": 100, "ses_1000": 1000}, 1000)
        for round_ in range(rounds):
            print(f"round {round_ + 1}/{rounds}", file=sys.stderr)
            for server in (coordinator, limit):
                for name, legacy in (("ingest", False), ("legacy ingest", True)):
                    r = ingest(server.port, seconds, legacy)
                    assert r.errors == 0, f"{name}: {r.errors} errors on {server.name}"
                    record(name, server, r.rps, r.latencies_ms, r.cpu_share)
                if server is coordinator:
                    memory["ingest"] = max(memory.get("ingest", 0), current_rss_mb(coordinator.proc.pid))
                for name, path in (("read 100 events", "/sessions/ses_100/events"),
                                   ("read 1,000 events", "/sessions/ses_1000/events"),
                                   ("read 1,000 sessions", "/sessions")):
                    r = read(server.port, seconds, path)
                    record(name, server, r.rps, r.latencies_ms, r.cpu_share)
                for k in fan_sizes:
                    before = current_rss_mb(server.proc.pid)
                    f = fanout(server.port, k, 200, fan_seconds, probe=lambda: current_rss_mb(server.proc.pid))
                    record(f"fan-out {k} subscribers", server, f.posted / fan_seconds, f.latencies_ms, lost=f.lost)
                    if server is coordinator and k == fan_sizes[-1]:
                        memory["subscribers"] = max(memory.get("subscribers", 0), f.probed - before)
                rps, lat = dispatch(server.port, dispatch_runs, 50)
                record("dispatch latency (50 runs/s)", server, rps, lat)
                rps, lat = dispatch(server.port, dispatch_runs, None)
                record("dispatch throughput", server, rps, lat)
        memory["peak"] = rss_mb(coordinator.proc.pid)

    # Growth: the same ingest and read on an empty database and on one with many events.
    for label, events in (("empty", 0), (f"{growth_events:,} events", growth_events)):
        server = Server(env=database_env(database_url))
        server.project_dir = Path(tempfile.mkdtemp(prefix="bench-growth-"))
        (server.project_dir / ".agent-orchestrator").mkdir()
        if events and database_url:
            seed_million_postgres(server.env["COORDINATOR_DATABASE_URL"], events)
        elif events:
            seed_million(server.project_dir / ".agent-orchestrator" / "observability.db", events)
        with server:
            seed(server.port, ["ses_100", *INGEST_SESSIONS], {"ses_100": 100})
            for _ in range(rounds):
                r = ingest(server.port, seconds, False)
                record(f"growth ingest, {label}", server, r.rps, r.latencies_ms, r.cpu_share)
                r = read(server.port, seconds, "/sessions/ses_100/events")
                record(f"growth read 100, {label}", server, r.rps, r.latencies_ms, r.cpu_share)

    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.machine()}, {len(CPUS)} CPUs, Python "
          f"{platform.python_version()}, {rounds} rounds of {seconds:g} s (median shown)\n")
    print("| workload | coordinator /s | p50 ms | p99 ms | limit app /s | p50 ms | p99 ms | ratio /s | p99 ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for workload in dict.fromkeys(w for w, _ in results):
        a = results.get((workload, "coordinator"))
        b = results.get((workload, "limit app"))
        cells = [workload]
        for s in (a, b):
            cells += [fmt(s.median(s.throughput), 0), fmt(s.median(s.p50), 2), fmt(s.median(s.p99), 2)] if s \
                else ["-", "-", "-"]
        if a and b:
            cells += [fmt(a.median(a.throughput) / b.median(b.throughput), 2),
                      fmt(a.median(a.p99) / b.median(b.p99), 2)]
        else:
            cells += ["-", "-"]
        notes = [f"lost {s.lost}" for s in (a, b) if s and s.lost]
        notes += ["load generator saturated"] if any(s and s.saturated for s in (a, b)) else []
        print("| " + " | ".join(cells) + " |" + (f" {'; '.join(notes)}" if notes else ""))
    print(f"\ncoordinator RSS: idle {memory['idle']:.0f} MB, after ingest {memory['ingest']:.0f} MB, "
          f"+{memory['subscribers']:.0f} MB while {fan_sizes[-1]} subscribers stream, peak of the whole run "
          f"{memory['peak']:.0f} MB")


if __name__ == "__main__":
    main()
