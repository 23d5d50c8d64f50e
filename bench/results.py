"""Benchmark results: one value per round for each workload and server, medians, ratios taken
round by round (servers measured in the same round share its noise), markdown tables."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable

from bench.harness import percentile

NAN = float("nan")


@dataclass
class Sample:
    """One workload on one server: a value per round."""

    throughput: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)  # the server's CPU time per request
    lost: int = 0
    saturated: bool = False

    def median(self, metric: str) -> float:
        values = [v for v in getattr(self, metric) if v == v]
        return statistics.median(values) if values else NAN


class Results:
    def __init__(self) -> None:
        self._samples: dict[tuple[str, str], Sample] = {}

    def record(self, workload: str, server: str, throughput: float, latencies: list[float], *,
               cpu_us: float = NAN, lost: int = 0, saturated: bool = False) -> None:
        sample = self._samples.setdefault((workload, server), Sample())
        sample.throughput.append(throughput)
        sample.p50.append(percentile(latencies, 50))
        sample.p99.append(percentile(latencies, 99))
        sample.cpu_us.append(cpu_us)
        sample.lost += lost
        sample.saturated |= saturated

    def workloads(self) -> list[str]:
        return list(dict.fromkeys(workload for workload, _ in self._samples))

    def servers(self) -> list[str]:
        return list(dict.fromkeys(server for _, server in self._samples))

    def get(self, workload: str, server: str) -> Sample | None:
        return self._samples.get((workload, server))

    def median(self, workload: str, server: str, metric: str) -> float:
        sample = self.get(workload, server)
        return sample.median(metric) if sample else NAN

    def ratio(self, workload: str, server: str, other: str, metric: str) -> float:
        """The median over rounds of `server`'s value over `other`'s in the same round."""
        a, b = self.get(workload, server), self.get(workload, other)
        if not a or not b:
            return NAN
        ratios = [x / y for x, y in zip(getattr(a, metric), getattr(b, metric)) if x == x and y == y and y]
        return statistics.median(ratios) if ratios else NAN

    def per_round_ratios(self, workload: str, server: str, other: str, metric: str) -> list[float]:
        a, b = self.get(workload, server), self.get(workload, other)
        if not a or not b:
            return []
        return [x / y if y else NAN for x, y in zip(getattr(a, metric), getattr(b, metric))]


def fmt(value: float, digits: int = 1) -> str:
    return "-" if value != value else f"{value:,.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def side_by_side(results: Results, servers: list[str], extra: dict[str, Callable[[str], str]] | None = None) -> str:
    """A row per workload: each server's median /s, p50 and p99, then the `extra` columns
    (header -> the cell for a workload)."""
    extra = extra or {}
    rows = []
    for workload in results.workloads():
        row = [workload]
        for server in servers:
            row += [fmt(results.median(workload, server, metric), digits)
                    for metric, digits in (("throughput", 0), ("p50", 2), ("p99", 2))]
        rows.append(row + [cell(workload) for cell in extra.values()])
    header = ["workload"] + [f"{server} {column}" for server in servers for column in ("/s", "p50 ms", "p99 ms")]
    return table(header + list(extra), rows)
