"""Before and after: the coordinator of another source tree (an older commit, checked out with
`git worktree add /tmp/base <commit>`) against this tree's, in alternating rounds: ingest (both
routes), reads, fan-out and live-stream memory.
`python -m bench.compare /tmp/base [--quick] [--rounds N]`."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from bench.harness import LOAD_CPU, ROOT, Server, pin_to
from bench.memory import describe, live_memory
from bench.results import fmt, side_by_side
from bench.run import fanout_workloads, load_average, request_workloads, run_rounds, seed_reads, versions


def revision(tree: Path) -> str:
    found = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True)
    return found.stdout.strip() or str(tree)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path, help="source tree of the coordinator to compare with")
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds
    seconds = 0.5 if args.quick else 3.0
    fan_sizes = (1, 10) if args.quick else (1, 50, 200)
    fan_seconds = 0.5 if args.quick else 4.0
    pin_to(LOAD_CPU)
    before = Server(f"before ({revision(args.before)})", root=args.before.resolve())
    after = Server(f"after ({revision(ROOT)})")
    servers = [before, after]
    loads = [load_average()]

    for server in servers:
        server.start()
    try:
        for server in servers:
            seed_reads(server)
        results = run_rounds(servers, request_workloads(seconds) + fanout_workloads(fan_sizes, fan_seconds), rounds)
    finally:
        for server in servers:
            server.stop()
    memory = {}
    for server in servers:
        print(f"live-stream memory, {server.name}", file=sys.stderr)
        with Server(server.name, root=server.root) as fresh:
            m = live_memory(fresh, 20, 2, 2, seconds=0.5, flat_for=0.5) if args.quick else live_memory(fresh)
            memory[server.name] = describe(m)
    loads.append(load_average())

    print(f"\n{versions()}; {rounds} rounds of {seconds:g} s (median shown); "
          f"load average (1/5/15 min) {' -> '.join(loads)}\n")
    names = [server.name for server in servers]

    def ratio(metric: str):
        return lambda workload: fmt(results.ratio(workload, after.name, before.name, metric), 2)

    def per_round(workload: str) -> str:
        key = "p99" if workload.startswith("fan-out") else "throughput"
        return ", ".join(fmt(r, 2) for r in results.per_round_ratios(workload, after.name, before.name, key))

    print(side_by_side(results, names, {
        "after ÷ before /s": ratio("throughput"), "p50": ratio("p50"), "p99": ratio("p99"),
        "CPU µs before / after": lambda w: " / ".join(fmt(results.median(w, name, "cpu_us"), 0) for name in names),
        "rounds (/s; fan-out p99)": per_round,
    }))
    for server in servers:
        print(f"\n{server.name} RSS: {memory[server.name]}")


if __name__ == "__main__":
    main()
