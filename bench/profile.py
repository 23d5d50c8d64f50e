"""Where the coordinator's CPU goes under ingest: the CPU time of each of its threads per
request, and py-spy's samples of the interpreter (those holding the GIL) summed by function.
Needs py-spy (`pip install py-spy`).
`python -m bench.profile [--legacy] [--seconds N] [--server 'durable app']`.

A function's µs per request is its share of its thread's samples times that thread's Python CPU
per request: time spent in C while the GIL is released (SQLite, fsync) shows in the thread's CPU
but not in its samples."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from bench.harness import BARE, DURABLE, LOAD_CPU, Server, pin_to, stat_cpu_seconds
from bench.results import fmt, table
from bench.run import INGEST_SESSIONS, ingest, seed


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """The OS name and CPU seconds (user + system) so far of each thread of a process, by id."""
    return {int(task.name): ((task / "comm").read_text().strip(), stat_cpu_seconds((task / "stat").read_text()))
            for task in Path(f"/proc/{pid}/task").iterdir()}


def read_samples(path: Path) -> tuple[dict[int, str], Counter, dict[int, Counter], dict[int, Counter]]:
    """py-spy's raw format: `thread (tid): name;frame;...;frame count` per line."""
    names: dict[int, str] = {}
    per_thread: Counter = Counter()
    inclusive: dict[int, Counter] = defaultdict(Counter)
    own: dict[int, Counter] = defaultdict(Counter)
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        head, *frames = stack.split(";")
        tid, _, names_ = head.removeprefix("thread (").partition("): ")
        thread = int(tid, 0)
        names[thread] = names_
        per_thread[thread] += int(count)
        for frame in set(frames):
            inclusive[thread][frame] += int(count)
        own[thread][frames[-1]] += int(count)
    return names, per_thread, inclusive, own


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--legacy", action="store_true", help="POST /events instead of /sessions/{id}/events")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rate", type=int, default=100, help="samples per second")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--server", choices=["coordinator", "durable app", "bare app"], default="coordinator",
                        help="the same for a limit app, to compare")
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    pin_to(LOAD_CPU)
    with Server(args.server, {"durable app": DURABLE, "bare app": BARE}.get(args.server)) as server:
        out = server.project_dir / "samples.txt"
        seed(server.port, INGEST_SESSIONS, {})
        ingest(server, 1, args.legacy)  # warm-up
        before = thread_cpu(server.pid)
        recorder = subprocess.Popen(
            [spy, "record", "--pid", str(server.pid), "--duration", str(args.seconds), "--rate", str(args.rate),
             "--format", "raw", "--threads", "--nolineno", "--gil", "--output", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        time.sleep(0.2)  # attached
        result = ingest(server, args.seconds, args.legacy)
        after = thread_cpu(server.pid)
        _, error = recorder.communicate()
        if recorder.returncode:
            sys.exit(f"py-spy failed: {error.decode().strip()}")
        names, per_thread, inclusive, own = read_samples(out)
    requests = result.requests
    cpu_us = {tid: (seconds - before.get(tid, ("", 0))[1]) / requests * 1e6 for tid, (_, seconds) in after.items()}
    names = {tid: name for tid, (name, _) in after.items()} | names  # Python's names where it has them

    route = "POST /events" if args.legacy else "POST /sessions/{id}/events"
    print(f"{args.server}, {route}, 16 clients: {result.rps:,.0f}/s, p50 {sorted(result.latencies_ms)[requests // 2]:.2f} ms; "
          f"server CPU {sum(cpu_us.values()):.0f} µs per request")
    samples = sum(per_thread.values())
    rows = [[f"{names[tid]} ({tid})", fmt(us, 1), fmt(100 * per_thread[tid] / samples, 0)]
            for tid, us in sorted(cpu_us.items(), key=lambda item: -item[1]) if us >= 0.5]
    print("\n" + table(["thread", "CPU µs/request", "% of GIL samples"], rows))
    for tid in sorted(per_thread, key=lambda tid: -per_thread[tid]):
        share = cpu_us.get(tid, 0) / per_thread[tid]
        rows = [[frame, fmt(n * share, 1), fmt(own[tid][frame] * share, 1)]
                for frame, n in inclusive[tid].most_common(args.top if names[tid] == "MainThread" else 8)]
        print(f"\n{names[tid]}: {per_thread[tid]} samples holding the GIL\n")
        print(table(["function", "µs/request incl.", "own"], rows))


if __name__ == "__main__":
    main()
