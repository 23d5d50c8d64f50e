"""Prometheus metrics at `GET /metrics`, when METRICS_ENABLED is on (needs the `metrics` extra,
`prometheus_client`); otherwise the route answers 404.

Requests are counted by route template (`/sessions/{session_id}`), never by raw path, so the
number of series stays bounded. Live subscribers, runs and runners are read when scraped. Every
app has its own registry, so any number of apps can live in one process.
"""

from __future__ import annotations

from datetime import datetime

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route

from store.stats import status_counts

try:
    import prometheus_client as prom
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
except ImportError:  # optional: METRICS_ENABLED refuses to start without it
    prom = None

EVENT_ROUTES = {("POST", "/sessions/{session_id}/events"), ("POST", "/events")}
RUN_STATUSES = ("pending", "claimed", "running", "stopping", "completed", "failed", "stopped")
RUNNER_STATUSES = ("online", "stale")


class Metrics:
    """The app's registry and instruments; created in the lifespan when metrics are on."""

    def __init__(self, state):
        self.registry = prom.CollectorRegistry()
        self.requests = prom.Counter(
            "coordinator_http_requests", "Requests answered, by route template and status",
            ["method", "route", "status"], registry=self.registry,
        )
        self.latency = prom.Histogram(
            "coordinator_http_request_duration_seconds", "Time to answer an HTTP request (streams: their lifetime)",
            ["method", "route"], registry=self.registry,
        )
        self.events = prom.Counter("coordinator_events_ingested", "Events stored", registry=self.registry)
        self.writes = prom.Histogram(
            "coordinator_store_write_duration_seconds", "Store writes, from queuing to commit, by verb",
            ["verb"], registry=self.registry,
        )
        self.claims = prom.Histogram(
            "coordinator_run_claim_latency_seconds", "From a run's creation to its claim by a runner",
            registry=self.registry, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30, 300),
        )
        self.scraped = _ScrapeTime(state)
        self.registry.register(self.scraped)

    def observe_claim(self, created_at: str, claimed_at: str) -> None:
        waited = datetime.fromisoformat(claimed_at) - datetime.fromisoformat(created_at)
        self.claims.observe(max(waited.total_seconds(), 0.0))

    def observe_write(self, verb: str, seconds: float) -> None:
        self.writes.labels(verb).observe(seconds)

    def observe_request(self, scope: dict, status: int, seconds: float) -> None:
        route = _template(scope)
        if scope["type"] == "websocket":
            self.requests.labels("WS", route, status).inc()
            return
        self.requests.labels(scope["method"], route, status).inc()
        self.latency.labels(scope["method"], route).observe(seconds)
        if status == 200 and (scope["method"], route) in EVENT_ROUTES:
            self.events.inc()


def observe_claim(state, run) -> None:
    """Record how long a claimed run waited in the queue, when metrics are on."""
    metrics = getattr(state, "metrics", None)
    if metrics is not None:
        metrics.observe_claim(run.created_at, run.claimed_at)


def observe_request(scope: dict, status: int, seconds: float) -> None:
    """A `RequestLog` observer: hands the request to the app's metrics, once they exist."""
    metrics = getattr(scope["app"].state, "metrics", None)
    if metrics is not None:
        metrics.observe_request(scope, status, seconds)


def _template(scope: dict) -> str:
    """The path template of the route that served the request; requests answered before
    routing (e.g. authentication failures) are matched here. Unknown paths share one label."""
    route = scope.get("route")
    if route is None:
        route = next((r for r in scope["app"].routes if r.matches(scope)[0] is not Match.NONE), None)
    return route.path if route is not None else "unmatched"


class _ScrapeTime:
    """Values owned by others, read at scrape time: the broadcaster's subscribers, and the run
    and runner counts that the handler reads from the store just before."""

    def __init__(self, state):
        self.state = state
        self.counts: dict[str, dict[str, int]] = {"runs": {}, "runners": {}}

    def collect(self):
        broadcaster = self.state.broadcaster
        yield GaugeMetricFamily("coordinator_live_subscribers", "Live subscribers (/ws and SSE)",
                                value=broadcaster.subscriber_count)
        yield CounterMetricFamily("coordinator_live_subscribers_dropped", "Subscribers dropped for falling behind",
                                  value=broadcaster.dropped_total)
        yield GaugeMetricFamily("coordinator_live_buffered_bytes",
                                "Bytes held for live subscribers: queued messages and replay pages",
                                value=broadcaster.buffered_bytes)
        for table, statuses, help_ in (("runs", RUN_STATUSES, "Runs by status"),
                                       ("runners", RUNNER_STATUSES, "Registered runners by status")):
            family = GaugeMetricFamily(f"coordinator_{table}", help_, labels=["status"])
            counts = self.counts[table]
            for status in dict.fromkeys((*statuses, *counts)):
                family.add_metric([status], counts.get(status, 0))
            yield family


async def metrics(request: Request):
    collected = getattr(request.app.state, "metrics", None)
    if collected is None:
        raise HTTPException(404)
    collected.scraped.counts = await request.app.state.db.read(status_counts)
    return Response(prom.generate_latest(collected.registry), media_type=prom.CONTENT_TYPE_LATEST)


routes = [Route("/metrics", metrics, methods=["GET"])]
