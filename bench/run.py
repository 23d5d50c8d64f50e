"""The benchmark: every workload against the coordinator, the durable limit app and the bare
limit app, alternately, and the ratios. `python -m bench.run [--quick] [--rounds N]
[--database-url URL]` (with a URL, the coordinator stores in that PostgreSQL database, a new
schema per server).

Server and load generator are pinned to different CPUs (when there are two); a load generator
that uses most of its CPU is flagged, since then it, not the server, sets the pace. Each round
runs every server once, in an order that rotates from round to round; ratios are taken within
a round and their median shown.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import apsw
import msgspec

from bench.dispatch import dispatch
from bench.fanout import event_body, fanout
from bench.harness import (
    BARE,
    CPUS,
    DURABLE,
    LOAD_CPU,
    ROOT,
    LoadResult,
    Server,
    cpu_seconds,
    database_env,
    fetch_all,
    http_load,
    pin_to,
    request_bytes,
    rss_mb,
)
from bench.memory import describe, live_memory
from bench.results import NAN, Results, fmt, side_by_side, table

INGEST_SESSIONS = [f"ses_ingest{i}" for i in range(4)]


# -- workloads (each returns throughput and latencies for one server) ----------------------


def ingest(server: Server, seconds: float, legacy: bool) -> LoadResult:
    def make(worker: int, n: int) -> bytes:
        session_id = INGEST_SESSIONS[worker % len(INGEST_SESSIONS)]
        path = "/events" if legacy else f"/sessions/{session_id}/events"
        return request_bytes("POST", path, event_body(session_id, n))

    return http_load(server.port, make, concurrency=16, seconds=seconds, server_pid=server.pid)


def read(server: Server, seconds: float, path: str) -> LoadResult:
    raw = request_bytes("GET", path)
    return http_load(server.port, lambda w, n: raw, concurrency=8, seconds=seconds, server_pid=server.pid)


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

COORDINATOR, DURABLE_APP, BARE_APP = "coordinator", "durable app", "bare app"

# What the coordinator should reach, as a ratio to the durable app (median of the rounds).
TARGETS = [
    ("ingest", "throughput", ">=", 0.75),
    ("legacy ingest", "throughput", ">=", 0.75),
    ("dispatch throughput", "throughput", ">=", 0.60),
    ("dispatch latency (50 runs/s)", "p50", "<=", 1.5),
    ("fan-out 200 subscribers", "p99", "<=", 1.2),
]
METRIC = {"throughput": "/s", "p50": "p50", "p99": "p99"}


def versions() -> str:
    packages = ", ".join(f"{name} {importlib.metadata.version(name)}"
                         for name in ("uvicorn", "uvloop", "httptools", "starlette", "msgspec", "apsw"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return f"{packages}, SQLite {apsw.sqlite_lib_version()}; code at {commit.stdout.strip() or '?'}"


def load_average() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


Workload = Callable[[Server, Results], None]  # runs once against one server, records its numbers


def ingest_workload(name: str, legacy: bool, seconds: float) -> Workload:
    def run(server: Server, results: Results) -> None:
        r = ingest(server, seconds, legacy)
        assert r.errors == 0, f"{name}: {r.errors} errors on {server.name}"
        results.record(name, server.name, r.rps, r.latencies_ms, cpu_us=r.server_cpu_us, saturated=r.cpu_share > 0.9)
    return run


def read_workload(name: str, path: str, seconds: float) -> Workload:
    def run(server: Server, results: Results) -> None:
        r = read(server, seconds, path)
        results.record(name, server.name, r.rps, r.latencies_ms, cpu_us=r.server_cpu_us, saturated=r.cpu_share > 0.9)
    return run


def request_workloads(seconds: float) -> list[Workload]:
    """Ingest (both routes) and reads."""
    return [ingest_workload("ingest", False, seconds), ingest_workload("legacy ingest", True, seconds),
            read_workload("read 100 events", "/sessions/ses_100/events", seconds),
            read_workload("read 1,000 events", "/sessions/ses_1000/events", seconds),
            read_workload("read 1,000 sessions", "/sessions", seconds)]


def fanout_workloads(sizes, seconds: float) -> list[Workload]:
    def fanout_to(k: int) -> Workload:
        def run(server: Server, results: Results) -> None:
            f = fanout(server.port, k, 200, seconds)
            results.record(f"fan-out {k} subscribers", server.name, f.posted / seconds, f.latencies_ms, lost=f.lost)
        return run

    return [fanout_to(k) for k in sizes]


def dispatch_workloads(runs: int) -> list[Workload]:
    def dispatch_at(name: str, rate: float | None, count: int) -> Workload:
        def run(server: Server, results: Results) -> None:
            cpu0 = cpu_seconds(server.pid)
            rps, latencies = dispatch(server.port, count, rate)
            results.record(name, server.name, rps, latencies, cpu_us=(cpu_seconds(server.pid) - cpu0) / count * 1e6)
        return run

    return [dispatch_at("dispatch latency (50 runs/s)", 50, runs // 3), dispatch_at("dispatch throughput", None, runs)]


def run_rounds(servers: list[Server], workloads: list[Workload], rounds: int) -> Results:
    """Each workload on every server in turn, so that they share the machine's mood; the order
    of the servers rotates from round to round."""
    results = Results()
    for round_ in range(rounds):
        print(f"round {round_ + 1}/{rounds} (load {load_average()})", file=sys.stderr)
        order = servers[round_ % len(servers):] + servers[:round_ % len(servers)]
        for workload in workloads:
            for server in order:
                workload(server, results)
    return results


def seed_reads(server: Server) -> None:
    seed(server.port, ["ses_100", "ses_1000", *INGEST_SESSIONS], {"ses_100": 100, "ses_1000": 1000}, 1000)


def print_report(results: Results, rounds: int, seconds: float, memory: str, peak: float, loads: list[str]) -> None:
    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.machine()}, {len(CPUS)} CPUs, Python "
          f"{platform.python_version()}, {versions()}")
    print(f"{rounds} rounds of {seconds:g} s per workload (median shown); load average (1/5/15 min) "
          f"{' -> '.join(loads)}\n")
    servers = [COORDINATOR, DURABLE_APP, BARE_APP]

    def notes(workload: str) -> str:
        samples = [results.get(workload, server) for server in servers]
        found = [f"{server} lost {s.lost}" for server, s in zip(servers, samples) if s and s.lost]
        return "; ".join(found + (["load generator saturated"] if any(s and s.saturated for s in samples) else []))

    print(side_by_side(results, servers, {"notes": notes}))

    print("\nRatios, the coordinator's over each limit app's (median of the rounds' ratios); server CPU "
          "time per request (per run for dispatch), in µs:\n")
    rows = []
    for workload in results.workloads():
        if not results.get(workload, DURABLE_APP):
            continue
        row = [workload]
        for other in (DURABLE_APP, BARE_APP):
            row += [fmt(results.ratio(workload, COORDINATOR, other, metric), 2) for metric in ("throughput", "p50", "p99")]
        row.append(" / ".join(fmt(results.median(workload, server, "cpu_us"), 0) for server in servers))
        rows.append(row)
    print(table(["workload", "÷ durable /s", "p50", "p99", "÷ bare /s", "p50", "p99",
                 "CPU µs: coordinator / durable / bare"], rows))

    print("\nTargets (the coordinator over the durable app):\n")
    rows = []
    for workload, metric, compare, bound in TARGETS:
        per_round = results.per_round_ratios(workload, COORDINATOR, DURABLE_APP, metric)
        value = results.ratio(workload, COORDINATOR, DURABLE_APP, metric)
        met = "-" if value != value else "met" if (value >= bound if compare == ">=" else value <= bound) else "NOT met"
        # On a shared machine a server gets what CPU the others leave it: the ratio of CPU time
        # per request says what the throughput ratio would be with the core to itself.
        by_cpu = results.ratio(workload, DURABLE_APP, COORDINATOR, "cpu_us") if metric == "throughput" else NAN
        rows.append([f"{workload} {METRIC[metric]}", f"{compare} {bound:g}", fmt(value, 2),
                     ", ".join(fmt(r, 2) for r in per_round), met, fmt(by_cpu, 2)])
    print(table(["target", "bound", "median", "rounds", "result", "by CPU time per request"], rows))
    print(f"\ncoordinator RSS: {memory}; peak of the rounds {peak:.0f} MB")


def growth(events: int, rounds: int, seconds: float, database_url: str | None) -> Results:
    """Ingest and a 100-event read on an empty database and on one with `events` stored."""
    servers = []
    for count in (0, events):
        server = Server("empty" if not count else f"{count:,} events", env=database_env(database_url))
        if count and database_url:
            seed_million_postgres(server.env["COORDINATOR_DATABASE_URL"], count)
        elif count:
            database = server.prepare() / ".agent-orchestrator" / "observability.db"
            database.parent.mkdir()
            seed_million(database, count)
        servers.append(server)
    print("growth", file=sys.stderr)
    for server in servers:
        server.start()
    try:
        for server in servers:
            seed(server.port, ["ses_100", *INGEST_SESSIONS], {"ses_100": 100})
        workloads = [ingest_workload("ingest", False, seconds),
                     read_workload("read 100 events", "/sessions/ses_100/events", seconds)]
        return run_rounds(servers, workloads, rounds)
    finally:
        for server in servers:
            server.stop()


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
    dispatch_runs = 30 if quick else 900
    growth_events = 10_000 if quick else 1_000_000
    pin_to(LOAD_CPU)
    loads = [load_average()]

    servers = [Server(env=database_env(database_url)), Server(DURABLE_APP, DURABLE), Server(BARE_APP, BARE)]
    for server in servers:
        server.start()
    try:
        for server in servers:
            seed_reads(server)
        workloads = request_workloads(seconds) + fanout_workloads(fan_sizes, fan_seconds) + dispatch_workloads(dispatch_runs)
        results = run_rounds(servers, workloads, rounds)
        peak = rss_mb(servers[0].pid)
    finally:
        for server in servers:
            server.stop()

    print("live-stream memory", file=sys.stderr)
    with Server(env=database_env(database_url)) as server:
        if quick:
            memory = describe(live_memory(server, 20, 2, 2, seconds=0.5, flat_for=0.5))
        else:
            memory = describe(live_memory(server))

    growth_results = growth(growth_events, rounds, seconds, database_url)
    loads.append(load_average())
    print_report(results, rounds, seconds, memory, peak, loads)
    print(f"\nGrowth: the same ingest and read on an empty database and on one with {growth_events:,} events "
          "(both servers in each round):\n")
    empty, full = growth_results.servers()
    print(side_by_side(growth_results, [empty, full],
                       {"ratio /s": lambda w: fmt(growth_results.ratio(w, full, empty, "throughput"), 2)}))


if __name__ == "__main__":
    main()
