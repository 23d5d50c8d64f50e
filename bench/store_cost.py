"""The store alone: CPU time of the writer thread per stored event, the real verb
(`append_event`) through the real writer, at a few group-commit sizes, with the commit's fsync
(`synchronous=FULL`, as shipped) and without (`OFF`). One process per source tree compared.
`python -m bench.store_cost [TREE ...]` (default: this tree).

No sockets and no event loop: what is left is the transaction, the statements and the commit."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from bench.harness import ROOT, SERVER_CPU
from bench.results import table

BATCHES = (1, 8, 16)

# Run inside the tree measured (its store and models), pinned to the server's CPU.
_CHILD = r"""
import json, os, sys, tempfile, threading, time
sys.path[:0] = [sys.argv[1]]
os.sched_setaffinity(0, {int(sys.argv[2])})
events_per_setting = int(sys.argv[3])
import msgspec
from store import events, sessions
try:
    from store.models import Event
    from store.sqlite import SqliteDatabase as Database
except ImportError:  # a tree from before the layout of store/sqlite.py and store/models.py
    from models import Event
    from store.db import Database

def cpu(tid):
    fields = open(f"/proc/self/task/{tid}/stat").read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

directory = tempfile.TemporaryDirectory(prefix="bench-store-")
db = Database(os.path.join(directory.name, "observability.db"), 0)
db.write_sync(sessions.create_session, "ses_cost")
event = msgspec.json.decode(sys.argv[4], type=Event)
writer = db._writer.native_id

def commits(batch, count):
    # The writer is held in an empty transaction while the batch queues up behind it.
    for _ in range(count):
        gate = threading.Event()
        held = db.submit(lambda conn: gate.wait())
        jobs = [db.submit(events.append_event, "ses_cost", event) for _ in range(batch)]
        gate.set()
        held.result()
        for job in jobs:
            job.result()

found = []
for sync in ("FULL", "OFF"):
    db._writer_conn.execute(f"PRAGMA synchronous={sync}")  # outside a transaction; the writer is idle
    for batch in [0, *json.loads(sys.argv[5])]:
        count = events_per_setting // max(batch, 1)
        commits(batch, max(1, count // 10))  # warm-up
        cpu0, wall0 = cpu(writer), time.perf_counter()
        commits(batch, count)
        found.append({"sync": sync, "batch": batch, "cpu_us": (cpu(writer) - cpu0) / count * 1e6,
                      "wall_us": (time.perf_counter() - wall0) / count * 1e6})
db.close()
directory.cleanup()
print(json.dumps(found))
"""


def measure(tree: Path, events: int) -> list[dict]:
    from bench.fanout import event_body

    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tree), str(SERVER_CPU), str(events),
         event_body("ses_cost", 0).decode(), json.dumps(BATCHES)],
        cwd=tree, capture_output=True, text=True,
    )
    if out.returncode:
        sys.exit(f"measuring {tree} failed:\n{out.stderr}")
    return json.loads(out.stdout)


def revision(tree: Path) -> str:
    found = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True)
    return found.stdout.strip() or str(tree)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="*", type=Path, default=[ROOT])
    parser.add_argument("--events", type=int, default=6000, help="events per setting")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is shown")
    args = parser.parse_args()
    runs: dict[Path, list[list[dict]]] = {tree: [] for tree in args.trees}
    for round_ in range(args.rounds):
        print(f"round {round_ + 1}/{args.rounds}", file=sys.stderr)
        for tree in args.trees:
            runs[tree].append(measure(tree.resolve(), args.events))
    rows = []
    for tree, measured in runs.items():
        median = {(s["sync"], s["batch"]): {key: statistics.median(m[i][key] for m in measured)
                                             for key in ("cpu_us", "wall_us")}
                  for i, s in enumerate(measured[0])}
        for (sync, batch), value in median.items():
            if not batch:  # the empty transaction that holds the writer, taken off the others
                continue
            cpu = value["cpu_us"] - median[sync, 0]["cpu_us"]
            wall = value["wall_us"] - median[sync, 0]["wall_us"]
            rows.append([revision(tree), f"synchronous={sync}", str(batch), f"{cpu:.0f}", f"{cpu / batch:.0f}",
                         f"{wall:.0f}"])
    print(table(["code", "setting", "events per commit", "writer CPU µs per commit", "per event",
                 "wall µs per commit"], rows))


if __name__ == "__main__":
    main()
