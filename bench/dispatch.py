"""Dispatch: the run lifecycle as the framework's runner drives it.
`python -m bench.dispatch [--quick]` runs it on its own; `bench.run` includes it.

Four runners, each on its own keep-alive connection, long-poll `GET /runner/runs`; a runner that
gets a run reports it `started`, then `completed`, then polls again. One client creates runs,
either at a fixed rate (the latency a client sees) or back to back (the throughput: runs
completed per second). Latency runs from the moment `POST /runs` answered (the run exists) to
the moment a runner holds it.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import msgspec

from bench.harness import LOAD_CPU, Server, exchange, percentile, pin_to, ports_of, request_bytes

RUNNERS = 4


class _Claimed(msgspec.Struct):
    run_id: str


class _Poll(msgspec.Struct):
    run: _Claimed


_claimed_run = msgspec.json.Decoder(_Poll).decode


async def _dispatch(port: int | list[int], runs: int, rate: float | None) -> tuple[float, list[float]]:
    ports = ports_of(port)
    created: dict[str, float] = {}
    claimed: dict[str, float] = {}
    completed = 0
    done = asyncio.Event()
    registered = asyncio.Barrier(RUNNERS + 1)

    async def runner(index: int) -> None:
        nonlocal completed
        reader, writer = await asyncio.open_connection("127.0.0.1", ports[index % len(ports)])
        identity = {"hostname": f"bench-{index}-{time.time()}", "project_dir": "/bench", "executor_type": "bench"}
        _, reply = await exchange(reader, writer, request_bytes("POST", "/runner/register", msgspec.json.encode(identity)))
        runner_id = msgspec.json.decode(reply)["runner_id"]
        poll = request_bytes("GET", f"/runner/runs?runner_id={runner_id}")
        report = msgspec.json.encode({"runner_id": runner_id})
        await registered.wait()
        try:
            while not done.is_set():
                status, reply = await exchange(reader, writer, poll)
                if status == 204:
                    continue
                run_id = _claimed_run(reply).run.run_id
                claimed[run_id] = time.perf_counter()
                for step in ("started", "completed"):
                    status, reply = await exchange(
                        reader, writer, request_bytes("POST", f"/runner/runs/{run_id}/{step}", report)
                    )
                    assert status == 200, f"{step}: {status} {reply[:200]!r}"
                completed += 1
                if completed >= runs:
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
        # A runner that failed ends the wait at once, with its error.
        await asyncio.wait([asyncio.ensure_future(done.wait()), *pollers], timeout=60,
                           return_when=asyncio.FIRST_COMPLETED)
        for task in pollers:
            if task.done():
                task.result()
        if not done.is_set():
            raise TimeoutError(f"{completed} of {runs} runs completed in 60 s")
    finally:
        elapsed = time.perf_counter() - start
        for task in pollers:
            task.cancel()
        for _, each in clients:
            each.close()
    latencies = [(claimed[run_id] - at) * 1000 for run_id, at in created.items() if run_id in claimed]
    return completed / elapsed, latencies


def dispatch(port: int | list[int], runs: int, rate: float | None) -> tuple[float, list[float]]:
    """`runs` runs created at `rate` per second (None: back to back) while 4 runners poll, start
    and complete them (runners and creations spread round-robin over several ports, if given):
    completed runs per second and create→claim latencies in ms."""
    return asyncio.run(_dispatch(port, runs, rate))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds: fewer runs")
    args = parser.parse_args()
    pin_to(LOAD_CPU)
    runs = 100 if args.quick else 1000
    print(f"create -> claim, {RUNNERS} runners: poll, started, completed, poll")
    print(f"{'phase':<16} {'runs':>6} {'p50 ms':>8} {'p99 ms':>8} {'runs/s':>8}")
    with Server() as server:
        dispatch(server.port, 20, None)  # warm-up
        for name, rate in (("steady 50/s", 50), ("steady 200/s", 200), ("back to back", None)):
            per_second, latencies = dispatch(server.port, runs if rate != 50 else runs // 4, rate)
            print(f"{name:<16} {len(latencies):>6} {percentile(latencies, 50):>8.2f}"
                  f" {percentile(latencies, 99):>8.2f} {per_second:>8.0f}")


if __name__ == "__main__":
    main()
