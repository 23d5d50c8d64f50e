"""The benchmark's quick mode still runs end to end (numbers are not judged here)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_benchmark_quick_mode_runs_every_workload():
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for workload in ("| ingest |", "| legacy ingest |", "| read 100 events |", "| read 1,000 sessions |",
                     "| fan-out 10 subscribers |", "| dispatch throughput |", "| growth ingest, empty |"):
        assert workload in proc.stdout
    assert "lost" not in proc.stdout
    assert "coordinator RSS: idle" in proc.stdout
