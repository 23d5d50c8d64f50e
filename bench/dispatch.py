"""Dispatch: how fast a queued run reaches a long-polling runner.
`python -m bench.dispatch [--quick]` runs it on its own; `bench.run` includes it.

Four runners long-poll, each on its own keep-alive connection, polling again right after every
claim; one client creates runs, either at a fixed rate (the latency a client sees) or back to
back (the throughput). Latency runs from the moment `POST /runs` answered (the run exists) to
the moment a runner holds it.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import msgspec

from bench.harness import LOAD_CPU, Server, exchange, percentile, pin_to, ports_of, request_bytes

RUNNERS = 4


async def _dispatch(port: int | list[int], runs: int, rate: float | None) -> tuple[float, list[float]]:
    ports = ports_of(port)
    created: dict[str, float] = {}
    claimed: dict[str, float] = {}
    done = asyncio.Event()
    registered = asyncio.Barrier(RUNNERS + 1)

    async def runner(index: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", ports[index % len(ports)])
        identity = {"hostname": f"bench-{index}-{time.time()}", "project_dir": "/bench", "executor_type": "bench"}
        _, reply = await exchange(reader, writer, request_bytes("POST", "/runner/register", msgspec.json.encode(identity)))
        poll = request_bytes("GET", f"/runner/runs?runner_id={msgspec.json.decode(reply)['runner_id']}")
        await registered.wait()
        try:
            while not done.is_set():
                status, reply = await exchange(reader, writer, poll)
                if status == 200:
                    claimed[msgspec.json.decode(reply)["run"]["run_id"]] = time.perf_counter()
                    if len(claimed) >= runs:
                        done.set()
        finally:
            writer.close()

    pollers = [asyncio.ensure_future(runner(i)) for i in range(RUNNERS)]
    await registered.wait()
    await asyncio.sleep(0.05)  # the polls are on their way: let them park
    clients = [await asyncio.open_connection("127.0.0.1", each) for each in ports]
    reader, writer = clients[0]
    # Runs resume one session, so the benchmark does not grow the session list other workloads read.
    await exchange(reader, writer, request_bytes("POST", "/sessions", b'{"session_id":"ses_dispatch"}'))  # 409 later
    create = request_bytes(
        "POST", "/runs", b'{"type":"resume_session","session_id":"ses_dispatch","prompt":"benchmark run"}'
    )
    start = time.perf_counter()
    try:
        for n in range(runs):
            if rate:
                await asyncio.sleep(max(0.0, start + n / rate - time.perf_counter()))
            _, reply = await exchange(*clients[n % len(clients)], create)
            created[msgspec.json.decode(reply)["run_id"]] = time.perf_counter()
        await asyncio.wait_for(done.wait(), 30)
    finally:
        elapsed = time.perf_counter() - start
        for task in pollers:
            task.cancel()
        for _, each in clients:
            each.close()
    latencies = [(claimed[run_id] - at) * 1000 for run_id, at in created.items() if run_id in claimed]
    return len(claimed) / elapsed, latencies


def dispatch(port: int | list[int], runs: int, rate: float | None) -> tuple[float, list[float]]:
    """`runs` runs created at `rate` per second (None: back to back) while 4 runners poll
    (runners and creations spread round-robin over several ports):
    claimed runs per second and create→claim latencies in ms."""
    return asyncio.run(_dispatch(port, runs, rate))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds: fewer runs")
    args = parser.parse_args()
    pin_to(LOAD_CPU)
    runs = 100 if args.quick else 1000
    print(f"create -> claim, {RUNNERS} long-polling runners")
    print(f"{'phase':<16} {'runs':>6} {'p50 ms':>8} {'p99 ms':>8} {'runs/s':>8}")
    with Server() as server:
        dispatch(server.port, 20, None)  # warm-up
        for name, rate in (("steady 50/s", 50), ("steady 200/s", 200), ("back to back", None)):
            per_second, latencies = dispatch(server.port, runs if rate != 50 else runs // 4, rate)
            print(f"{name:<16} {len(latencies):>6} {percentile(latencies, 50):>8.2f}"
                  f" {percentile(latencies, 99):>8.2f} {per_second:>8.0f}")


if __name__ == "__main__":
    main()
