"""Benchmark plumbing: start a server process pinned to one CPU, a keep-alive HTTP load
generator on asyncio streams, WebSocket subscribers, and percentile helpers.

Everything talks to 127.0.0.1 only and stops by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CPUS = sorted(os.sched_getaffinity(0))
SERVER_CPU = CPUS[0]
LOAD_CPU = CPUS[-1]  # the same CPU when there is only one


def pin_to(cpu: int) -> None:
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {cpu})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status_mb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb(pid: int) -> float:
    """Peak resident set size (VmHWM) of a process, in MB."""
    return _status_mb(pid, "VmHWM")


def current_rss_mb(pid: int) -> float:
    return _status_mb(pid, "VmRSS")


def stat_cpu_seconds(stat: str) -> float:
    """User + system CPU time from the text of a /proc/.../stat file."""
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU time a process (every thread) has used so far."""
    return stat_cpu_seconds(Path(f"/proc/{pid}/stat").read_text())


BARE = "bench.limit_app:app"
DURABLE = "bench.limit_app:durable_app"


def database_env(url: str | None) -> dict[str, str]:
    """The coordinator's environment for a run on PostgreSQL (`--database-url`): a new, empty
    schema of that database for each server, as each SQLite server gets a new project dir.
    None (SQLite): nothing to set."""
    if url is None:
        return {}
    import psycopg

    schema = "bench_" + uuid.uuid4().hex[:12]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    parts = urllib.parse.urlsplit(url)
    query = "&".join(filter(None, [parts.query, urllib.parse.urlencode({"options": f"-csearch_path={schema}"})]))
    return {"COORDINATOR_DATABASE_URL": urllib.parse.urlunsplit(parts._replace(query=query))}


@dataclass
class Server:
    """A server process: the coordinator of the source tree `root`, started the way
    `python -m coordinator` starts it (its settings from the environment), or one of the limit
    apps (`app`: BARE or DURABLE)."""

    name: str = "coordinator"
    app: str | None = None
    root: Path = ROOT
    env: dict = field(default_factory=dict)
    project_dir: Path | None = None
    port: int = 0
    proc: subprocess.Popen | None = None
    _temporary: bool = False

    def prepare(self) -> Path:
        """The project directory: a temporary one unless given, removed again at `stop`."""
        if self.project_dir is None:
            self.project_dir = Path(tempfile.mkdtemp(prefix="bench-"))
            self._temporary = True
        return self.project_dir

    def start(self) -> Server:
        self.port = free_port()
        self.prepare()
        if self.app:
            serve = (f"uvicorn.run({self.app!r}, host='127.0.0.1', port=int(sys.argv[3]),"
                     " log_level='warning', ws='websockets-sansio')")
        else:
            serve = "from coordinator import main; main(['--host', '127.0.0.1', '--port', sys.argv[3]])"
        code = (
            "import sys, uvicorn; sys.path[:0] = [sys.argv[1]];"
            "from bench.harness import pin_to; pin_to(int(sys.argv[2]));" + serve
        )
        env = {**os.environ, "AGENT_ORCHESTRATOR_PROJECT_DIR": str(self.project_dir), **self.env}
        # The coordinator logs every request, as it does in production: into a file here.
        with open(self.project_dir / "server.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code, str(self.root), str(SERVER_CPU), str(self.port)],
                env=env, cwd=self.root, stderr=log,
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("server did not start")
                time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._temporary:
            shutil.rmtree(self.project_dir, ignore_errors=True)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# -- HTTP load --------------------------------------------------------------------------


def request_bytes(method: str, path: str, body: bytes | None = None) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + (body or b"")


async def exchange(reader, writer, raw: bytes) -> tuple[int, bytes]:
    writer.write(raw)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    body = await reader.readexactly(length) if length else b""
    return status, body


@dataclass
class LoadResult:
    requests: int
    seconds: float
    latencies_ms: list[float]
    errors: int
    cpu_share: float  # load generator CPU time / wall time (1.0 = one core saturated)
    server_cpu_us: float  # the server's CPU time per request, in µs (nan when not measured)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def ports_of(port: int | list[int]) -> list[int]:
    """One server's port, or the ports of several serving one database (load spread round-robin)."""
    return [port] if isinstance(port, int) else port


async def _load(port: int | list[int], make_request, concurrency: int, seconds: float,
                server_pid: int | None) -> LoadResult:
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def worker(index: int) -> None:
        nonlocal errors
        ports = ports_of(port)
        reader, writer = await asyncio.open_connection("127.0.0.1", ports[index % len(ports)])
        n = 0
        try:
            while time.perf_counter() < stop_at:
                raw = make_request(index, n)
                n += 1
                t0 = time.perf_counter()
                status, _ = await exchange(reader, writer, raw)
                latencies.append((time.perf_counter() - t0) * 1000)
                if status >= 400:
                    errors += 1
        finally:
            writer.close()

    server0 = cpu_seconds(server_pid) if server_pid else float("nan")
    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    wall = time.perf_counter() - t0
    load_cpu = time.process_time() - cpu0
    server_cpu = cpu_seconds(server_pid) - server0 if server_pid else float("nan")
    return LoadResult(len(latencies), wall, latencies, errors, load_cpu / wall,
                      server_cpu / max(1, len(latencies)) * 1e6)


def http_load(port: int | list[int], make_request, concurrency: int = 16, seconds: float = 3.0,
              server_pid: int | None = None) -> LoadResult:
    """Closed-loop load: `concurrency` keep-alive connections (spread over the ports, if several),
    each sending `make_request(worker_index, n)` (raw request bytes) back to back for `seconds`;
    with `server_pid`, the server's CPU time per request too."""
    return asyncio.run(_load(port, make_request, concurrency, seconds, server_pid))


def fetch_all(port: int, raws: list[bytes]) -> list[tuple[int, bytes]]:
    """Send raw requests one after another on one keep-alive connection."""

    async def run():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            return [await exchange(reader, writer, raw) for raw in raws]
        finally:
            writer.close()

    return asyncio.run(run())


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 10) - 1]
