"""Replicas: ingest, dispatch and fan-out on SQLite (one process) and on PostgreSQL with one and
two coordinator processes, the load spread round-robin over the processes as a load balancer
would. `python -m bench.replicas [--quick] [--database-url URL]`.

Without a URL, a throwaway PostgreSQL cluster is started from the server binaries (as the tests
do); every set-up gets an empty schema. The coordinator processes share one CPU and the load
generator has the other; PostgreSQL runs wherever the OS puts it, so on a 2-CPU machine it
competes with both (see README, "Running several coordinators").
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from bench.dispatch import dispatch
from bench.fanout import event_body, fanout
from bench.harness import LOAD_CPU, Server, fetch_all, http_load, percentile, pin_to, request_bytes
from bench.run import INGEST_SESSIONS

TESTS = Path(__file__).resolve().parent.parent / "tests"


def ingest(ports: list[int], seconds: float):
    def make(worker: int, n: int) -> bytes:
        session_id = INGEST_SESSIONS[worker % len(INGEST_SESSIONS)]
        return request_bytes("POST", f"/sessions/{session_id}/events", event_body(session_id, n))

    fetch_all(ports[0], [request_bytes("POST", "/sessions", b'{"session_id":"%s"}' % s.encode()) for s in INGEST_SESSIONS])
    return http_load(ports, make, concurrency=16, seconds=seconds)


def measure(name: str, ports: list[int], quick: bool) -> None:
    seconds = 1.0 if quick else 4.0
    load = ingest(ports, seconds)
    print(f"| {name} | ingest | {load.rps:,.0f} events/s | {percentile(load.latencies_ms, 50):.1f} ms"
          f" | {percentile(load.latencies_ms, 99):.1f} ms |")
    dispatch(ports, 20, None)  # warm-up
    per_second, latencies = dispatch(ports, 100 if quick else 500, None)
    print(f"| {name} | dispatch, back to back | {per_second:,.0f} runs/s | {percentile(latencies, 50):.1f} ms"
          f" | {percentile(latencies, 99):.1f} ms |")
    per_second, latencies = dispatch(ports, 50 if quick else 200, 50)
    print(f"| {name} | dispatch, 50 runs/s | {per_second:,.0f} runs/s | {percentile(latencies, 50):.1f} ms"
          f" | {percentile(latencies, 99):.1f} ms |")
    result = fanout(ports, 10 if quick else 50, 200, seconds)
    print(f"| {name} | fan-out {result.subscribers} subscribers, 200 events/s | {result.posted} posted,"
          f" {result.lost} lost | {percentile(result.latencies_ms, 50):.1f} ms"
          f" | {percentile(result.latencies_ms, 99):.1f} ms |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--database-url", help="a PostgreSQL server to use (default: a throwaway cluster)")
    args = parser.parse_args()
    if args.database_url:
        os.environ["COORDINATOR_TEST_DATABASE_URL"] = args.database_url
    sys.path.insert(0, str(TESTS))
    from postgres_server import RunDatabase

    pin_to(LOAD_CPU)
    print("| set-up | workload | throughput | p50 | p99 |\n|---|---|---|---|---|")
    with Server() as server:
        measure("SQLite, 1 process", [server.port], args.quick)
    database = RunDatabase()
    try:
        for count in (1, 2):
            env = {"COORDINATOR_DATABASE_URL": database.fresh_schema()}
            with contextlib.ExitStack() as stack:
                servers = [stack.enter_context(Server(env=env)) for _ in range(count)]
                measure(f"PostgreSQL, {count} process{'es' if count > 1 else ''}",
                        [server.port for server in servers], args.quick)
    finally:
        database.drop()


if __name__ == "__main__":
    main()
