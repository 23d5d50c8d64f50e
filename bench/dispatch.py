"""Dispatch benchmark: how fast a queued run reaches a long-polling runner.
`python -m bench.dispatch [--quick] [--runners N]`.

A coordinator process (temp project dir, 127.0.0.1) and N runner threads, each long-polling
with its own keep-alive connection and polling again right after every claim. Two phases:

- one at a time: a run is created only once the previous one was claimed, so every run meets
  idle runners (the latency a single client sees);
- steady: four client threads create runs at a fixed total rate (the latency under load);
- burst: the same clients create runs back to back (the throughput; runs queue up, so latency
  here is mostly waiting in line).

The runners and clients share one process (and GIL) on the other CPU: at the burst rate they,
rather than the coordinator, may set the pace.

Latency is measured from just before `POST /runs` is sent to the moment a runner has the run.
"""

from __future__ import annotations

import argparse
import threading
import time

import requests

from bench.harness import Server, percentile

CLIENTS = 4
STEADY_RATE = 200  # runs per second


class Runners:
    """N runner threads; `claimed[run_id]` is when a runner got the run (perf_counter)."""

    def __init__(self, url: str, count: int):
        self.url = url
        self.claimed: dict[str, float] = {}
        self.runner_ids: list[str] = []
        self.changed = threading.Condition()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._poll, args=(url, i), daemon=True) for i in range(count)]

    def __enter__(self) -> Runners:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        # Deregistering wakes the waiting polls (they end with 401), so nobody waits them out.
        for runner_id in self.runner_ids:
            requests.delete(f"{self.url}/runners/{runner_id}", params={"self": "true"}, timeout=10)
        for thread in self.threads:
            thread.join(timeout=5)

    def _poll(self, url: str, index: int) -> None:
        http = requests.Session()
        identity = {"hostname": f"bench-{index}", "project_dir": "/bench", "executor_type": "bench"}
        runner_id = http.post(url + "/runner/register", json=identity, timeout=10).json()["runner_id"]
        self.runner_ids.append(runner_id)
        while not self.stop.is_set():
            response = http.get(url + "/runner/runs", params={"runner_id": runner_id}, timeout=10)
            if response.status_code == 200:
                now = time.perf_counter()
                with self.changed:
                    self.claimed[response.json()["run"]["run_id"]] = now
                    self.changed.notify_all()

    def wait_for(self, run_ids: list[str], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        with self.changed:
            while not all(run_id in self.claimed for run_id in run_ids):
                if not self.changed.wait(deadline - time.monotonic()):
                    raise RuntimeError("runs were not claimed in time")


def create(http: requests.Session, url: str) -> tuple[str, float]:
    sent = time.perf_counter()
    response = http.post(url + "/runs", json={"type": "start_session", "prompt": "bench"}, timeout=10)
    return response.json()["run_id"], sent


def one_at_a_time(url: str, runners: Runners, count: int) -> dict:
    http = requests.Session()
    sent: dict[str, float] = {}
    started = time.perf_counter()
    for _ in range(count):
        run_id, sent[run_id] = create(http, url)
        runners.wait_for([run_id])
    return summary(sent, runners, started)


def paced(url: str, runners: Runners, count: int, rate: float | None) -> dict:
    """CLIENTS threads create `count` runs, together `rate` per second (None: flat out)."""
    sent: dict[str, float] = {}
    interval = CLIENTS / rate if rate else 0.0

    def client(n: int) -> None:
        http = requests.Session()
        due = time.perf_counter()
        for _ in range(n):
            time.sleep(max(0.0, due - time.perf_counter()))
            run_id, at = create(http, url)
            sent[run_id] = at
            due += interval

    threads = [threading.Thread(target=client, args=(count // CLIENTS,)) for _ in range(CLIENTS)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    runners.wait_for(list(sent))
    return summary(sent, runners, started)


def summary(sent: dict[str, float], runners: Runners, started: float) -> dict:
    latencies = [(runners.claimed[run_id] - at) * 1000 for run_id, at in sent.items()]
    finished = max(runners.claimed[run_id] for run_id in sent)
    return {
        "runs": len(sent),
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
        "rate": len(sent) / (finished - started),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds: fewer runs")
    parser.add_argument("--runners", type=int, default=4)
    args = parser.parse_args()
    sequential, steady, bursty = (100, 200, 400) if args.quick else (1000, 2000, 4000)
    with Server() as server:
        url = f"http://127.0.0.1:{server.port}"
        with Runners(url, args.runners) as runners:
            one_at_a_time(url, runners, 20)  # warm-up
            rows = [("one at a time", one_at_a_time(url, runners, sequential)),
                    (f"steady {STEADY_RATE}/s", paced(url, runners, steady, STEADY_RATE)),
                    ("burst", paced(url, runners, bursty, None))]
    print(f"create -> claim, {args.runners} long-polling runners")
    print(f"{'phase':<15} {'runs':>6} {'p50 ms':>8} {'p99 ms':>8} {'runs/s':>8}")
    for name, row in rows:
        print(f"{name:<15} {row['runs']:>6} {row['p50']:>8.2f} {row['p99']:>8.2f} {row['rate']:>8.0f}")


if __name__ == "__main__":
    main()
