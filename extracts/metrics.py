"""``GET /metrics``: the Prometheus exposition, with prometheus-client (SPEC: Web page and metrics).

Two sources. What the state database knows — runs by status and trigger, their
durations, records and bytes written, active and queued runs, the live
instances — is counted there at each scrape, so it is right whatever instance
answers and survives restarts. What only this process sees — HTTP requests,
downloads and the bytes they served — is counted in memory by ``RequestMetrics``,
an ASGI middleware. Labels come from small fixed sets: a request is labelled by
its route *template* (``/api/data/extracts/{id}``), never by its raw path.

Each app has its own ``CollectorRegistry`` (never the global one): tests run
several apps in one process, and a scrape shows exactly this app's series.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from typing import Any

from databases import Database
from prometheus_client import CollectorRegistry, Counter, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from executor.messages import RunStatus
from extracts.http import Unauthorized, bearer_problem
from extracts.instances import Instance
from extracts.state import TriggeredBy

# Seconds; a run of a small table takes a second, one of a large database hours.
RUN_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0)
ENDED = (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED)
WAITING = (RunStatus.PENDING, RunStatus.QUEUED)
METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"}
UNMATCHED = "unmatched"  # the route label of a path no route matches: one value, whatever the path
# The download routes (templates) and what each serves.
DOWNLOADS = {
    "/api/extracts/runs/{id}/download": "zip",
    "/api/extracts/artifacts/{id}/download": "file",
}
SERVED = (200, 206, 307)  # a download begun (307: sent to the object store's signed URL)


def template(path: str) -> str:
    """A route's path as a label and in the OpenAPI document: ``{schema:path}`` → ``{schema}``."""
    return re.sub(r"{(\w+):\w+}", r"{\1}", path)


class StateCollector:
    """The series counted in the state database; ``refresh`` reads them, ``collect`` yields them."""

    def __init__(self, db: Database, instance: Instance) -> None:
        self.db, self.instance = db, instance
        self.families: list[Metric] = []

    def describe(self) -> list[Metric]:
        return []  # the names vary with nothing; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        yield from self.families

    async def refresh(self) -> None:
        """Read the counts (one aggregate query over the runs, then the live instances) and build
        this scrape's families."""
        buckets = ", ".join(
            f"sum(CASE WHEN duration_seconds <= {bound!r} THEN 1 ELSE 0 END) AS le_{i}"
            for i, bound in enumerate(RUN_BUCKETS)
        )
        # One statement, so one snapshot: counted in two, a run that started or ended between
        # them was counted both as queued and as active, or in none of queued, active and ended.
        rows = await self.db.fetch_all(
            # The instance only for the running ones: ended runs keep the id of every instance
            # that ever ran one (a new one at each start), and the rows would grow with restarts.
            "SELECT status, triggered_by, CASE WHEN status = :running THEN instance_id END AS instance_id, "
            "count(*) AS runs, "
            "coalesce(sum(records_exported), 0) AS records, coalesce(sum(total_size_bytes), 0) AS bytes, "
            "count(duration_seconds) AS timed, coalesce(sum(duration_seconds), 0) AS seconds, "
            f"{buckets} FROM extract_runs GROUP BY status, triggered_by, "
            "CASE WHEN status = :running THEN instance_id END",
            {"running": RunStatus.RUNNING.value},
        )
        runs = [dict(r._mapping) for r in rows]
        live = await self.instance.live()
        self.families = [*self._runs(runs), *self._instances(runs, live)]

    def _runs(self, rows: list[dict[str, Any]]) -> Iterator[Metric]:
        ended = [r for r in rows if r["status"] in ENDED]
        runs = CounterMetricFamily(
            "extracts_runs",
            "Runs that ended, by final status and by what started them",
            labels=["status", "triggered_by"],
        )
        counts: dict[tuple[str, str], int] = {}
        for r in ended:  # a row per instance too: summed over them
            pair = (r["status"], r["triggered_by"])
            counts[pair] = counts.get(pair, 0) + r["runs"]
        for status in ENDED:  # every pair shown, 0 included: rate() and alerts need the series
            for trigger in TriggeredBy:
                runs.add_metric([status.value, trigger.value], counts.get((status.value, trigger.value), 0))
        yield runs
        yield CounterMetricFamily(
            "extracts_records_exported",
            "Records written by completed runs",
            value=sum(int(r["records"]) for r in ended if r["status"] == RunStatus.COMPLETED),
        )
        yield CounterMetricFamily(
            "extracts_bytes_written",
            "Bytes of the files runs wrote (manifests included), counted when each run ends",
            value=sum(int(r["bytes"]) for r in ended),
        )
        durations = HistogramMetricFamily(
            "extracts_run_duration_seconds",
            "How long runs took from start to end, by final status",
            labels=["status"],
        )
        for status in ENDED:
            mine = [r for r in ended if r["status"] == status]
            cumulative = [
                (repr(b), sum(int(r[f"le_{i}"] or 0) for r in mine)) for i, b in enumerate(RUN_BUCKETS)
            ]
            timed = sum(int(r["timed"]) for r in mine)
            seconds = sum(float(r["seconds"]) for r in mine)
            durations.add_metric([status.value], [*cumulative, ("+Inf", timed)], seconds)
        yield durations
        queued = GaugeMetricFamily(
            "extracts_runs_queued", "Runs waiting for a worker (retries waiting for their time included)"
        )
        queued.add_metric([], sum(r["runs"] for r in rows if r["status"] in WAITING))
        yield queued

    def _instances(self, rows: list[dict[str, Any]], live: list[dict[str, Any]]) -> Iterator[Metric]:
        active = GaugeMetricFamily(
            "extracts_runs_active",
            "Runs being executed, by the instance executing them",
            labels=["instance_id"],
        )
        counts: dict[str | None, int] = {}
        for row in rows:
            if row["status"] == RunStatus.RUNNING:
                counts[row["instance_id"]] = counts.get(row["instance_id"], 0) + row["runs"]
        for instance_id in dict.fromkeys([*(i["id"] for i in live), *counts]):
            active.add_metric([instance_id or ""], counts.get(instance_id, 0))
        yield active
        workers = GaugeMetricFamily(
            "extracts_instance_workers", "Worker processes of each live instance", labels=["instance_id"]
        )
        for instance in live:
            workers.add_metric([instance["id"]], instance["workers"])
        yield workers
        info = GaugeMetricFamily(
            "extracts_instance_info",
            "The instance that answered this scrape (its requests and downloads are the series without "
            "an instance_id)",
            labels=["instance_id"],
        )
        info.add_metric([self.instance.id], 1)
        yield info


class Metrics:
    """This app's registry: the state collector, request and download counters, process metrics."""

    def __init__(self, db: Database, instance: Instance, token: str, routes: Sequence[tuple[str, Route]]):
        self.token = token.encode()
        self.routes = [(prefix, route, prefix + template(route.path)) for prefix, route in routes]
        self.registry = CollectorRegistry()
        self.state = StateCollector(db, instance)
        self.registry.register(self.state)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.requests = Counter(
            "extracts_http_requests",
            "HTTP requests answered, by method, route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "extracts_http_request_duration_seconds",
            "Time from a request's arrival to the end of its response, by route template",
            ["route"],
            registry=self.registry,
        )
        self.downloads = Counter(
            "extracts_downloads",
            "Downloads begun (200, 206, or 307 to a signed URL): kind zip (a run) or file (an artifact)",
            ["kind"],
            registry=self.registry,
        )
        self.served = Counter(
            "extracts_download_bytes",
            "Bytes of downloads sent by this instance, by kind",
            ["kind"],
            registry=self.registry,
        )
        for kind in DOWNLOADS.values():  # present from the start, at 0
            self.downloads.labels(kind)
            self.served.labels(kind)

    def route_of(self, path: str) -> str:
        """The template of the route ``path`` matches, or ``unmatched``: a bounded label."""
        for prefix, route, name in self.routes:
            if path.startswith(prefix) and route.path_regex.match(path[len(prefix) :]):
                return name
        return UNMATCHED

    def observe(self, method: str, path: str, status: int, seconds: float, sent: int) -> None:
        route = self.route_of(path)
        self.requests.labels(method if method in METHODS else "other", route, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        kind = DOWNLOADS.get(route)
        if kind is not None and method == "GET" and status in SERVED:
            self.downloads.labels(kind).inc()
            self.served.labels(kind).inc(sent)

    async def exposition(self, request: Request) -> Response:
        """``GET /metrics``: bearer token required; the format the scraper's Accept asks for."""
        problem = bearer_problem(request.headers.raw, self.token)
        if problem is not None:
            raise Unauthorized(
                f"{problem}; send one header Authorization: Bearer <token>",
                headers={"WWW-Authenticate": 'Bearer realm="extracts"'},
            )
        await self.state.refresh()
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        # No await between the refresh and the encoding: one scrape's families, whole.
        return Response(encode(self.registry), headers={"Content-Type": content_type})


async def metrics(request: Request) -> Response:
    """``GET /metrics`` (the route table's handler)."""
    return await request.app.state.metrics.exposition(request)


class RequestMetrics:
    """Counts every HTTP response by route template and status, and the bytes downloads send."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: int | None = None
        sent, started = 0, time.perf_counter()

        async def counting_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:  # a client gone mid-download counts too, with the bytes sent until then
            # One gone before any response (CatchAll answers everything else) got none: not counted.
            if status is not None:
                elapsed = time.perf_counter() - started
                self.metrics.observe(scope["method"], scope["path"], status, elapsed, sent)
