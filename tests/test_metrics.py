"""``GET /metrics`` (SPEC: Web page and metrics), read with prometheus-client's own parsers.

One service for the module (two workers), on the shop plus a ``big`` table whose
runs last a few seconds, so that active and queued runs can be seen.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import TOKEN, add_big_table, http_client, http_get
from prometheus_client.core import Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from extracts import state
from extracts.instances import Instance
from extracts.metrics import StateCollector
from extracts.records import to_record
from extracts.runs import Runs
from extracts.state import TriggeredBy
from extracts.storage.local import LocalStorage

BIG_ROWS = 1_000_000
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def shop_db(shop_db: Path) -> Path:
    """The shop (conftest's, for this module only) plus a table a run takes seconds over."""
    return add_big_table(shop_db, BIG_ROWS)


def scrape(service: Any) -> Samples:
    r = service.client.get("/metrics")
    assert r.status_code == 200, r.text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(r.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def series(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for sample, labels in samples if sample == name]


def test_metrics_need_the_token(service: Any) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        r = http_get(f"{service.base_url}/metrics", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), headers
        assert r.json()["error_code"] == "UNAUTHORIZED"
        assert "extracts_" not in r.text
    r = service.client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    names = {family.name for family in text_string_to_metric_families(r.text)}
    assert {
        "extracts_runs",
        "extracts_run_duration_seconds",
        "extracts_records_exported",
        "extracts_bytes_written",
        "extracts_runs_active",
        "extracts_runs_queued",
        "extracts_downloads",
        "extracts_download_bytes",
        "extracts_http_requests",
        "extracts_http_request_duration_seconds",
        "extracts_instance_workers",
        "process_resident_memory_bytes",
    } <= names
    # A scraper asking for OpenMetrics gets it.
    r = service.client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    assert r.text.endswith("# EOF\n")
    assert "extracts_runs" in {family.name for family in openmetrics_families(r.text)}


def test_counters_move_after_a_run_and_a_download(service: Any) -> None:
    before = scrape(service)
    extract = service.create_extract(name="Counted", schemas=["users", "orders"])
    run = service.wait_run(service.run(extract["id"]))
    assert run["status"] == "completed"
    zipped = service.client.get(f"/api/extracts/runs/{run['id']}/download")
    assert zipped.status_code == 200
    artifacts = service.client.get(f"/api/data/extract_artifacts?filter[where][run_id]={run['id']}").json()
    artifact = artifacts["data"][0]
    one = service.client.get(f"/api/extracts/artifacts/{artifact['id']}/download")
    assert one.status_code == 200
    after = scrape(service)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("extracts_runs_total", status="completed", triggered_by="manual") == 1
    assert moved("extracts_runs_total", status="failed", triggered_by="manual") == 0
    assert moved("extracts_records_exported_total") == run["records_exported"] == 54
    assert moved("extracts_bytes_written_total") == run["total_size_bytes"] > 0
    assert moved("extracts_run_duration_seconds_count", status="completed") == 1
    assert moved("extracts_run_duration_seconds_sum", status="completed") == pytest.approx(
        run["duration_seconds"], abs=1e-6
    )
    buckets = [
        (float(labels["le"]), value(after, "extracts_run_duration_seconds_bucket", **labels))
        for labels in series(after, "extracts_run_duration_seconds_bucket")
        if labels["status"] == "completed"
    ]
    counts = [count for _, count in sorted(buckets)]
    assert counts == sorted(counts) and counts[-1] == value(
        after, "extracts_run_duration_seconds_count", status="completed"
    )
    assert moved("extracts_downloads_total", kind="zip") == 1
    assert moved("extracts_download_bytes_total", kind="zip") == len(zipped.content)
    assert moved("extracts_downloads_total", kind="file") == 1
    assert moved("extracts_download_bytes_total", kind="file") == artifact["size_bytes"]
    route = "/api/extracts/{id}/run"
    assert moved("extracts_http_requests_total", method="POST", route=route, status="202") == 1
    assert moved("extracts_http_requests_total", method="POST", route="/api/data/extracts", status="201") == 1


def test_active_queued_cancelled_and_failed_runs(service: Any, shop_db: Path) -> None:
    before = scrape(service)
    instance = service.client.get("/api/instances").json()["data"][0]["id"]
    assert value(before, "extracts_instance_workers", instance_id=instance) == 2
    assert value(before, "extracts_instance_info", instance_id=instance) == 1
    extracts = [service.create_extract(name=f"Big {i}", schemas=["big"]) for i in range(3)]
    runs = [service.run(e["id"]) for e in extracts]  # two workers: two run, one waits
    deadline = time.monotonic() + 30
    while True:
        now = scrape(service)
        seen = value(now, "extracts_runs_active", instance_id=instance), value(now, "extracts_runs_queued")
        if seen == (2, 1):
            break
        assert time.monotonic() < deadline, f"active, queued: {seen}"
        time.sleep(0.05)
    for e in extracts:
        assert service.client.post(f"/api/extracts/{e['id']}/cancel").status_code == 200
    assert {service.wait_run(r)["status"] for r in runs} == {"cancelled"}
    # A schema dropped since the extract was saved: a failed run.
    with sqlite3.connect(shop_db) as con:
        con.execute("CREATE TABLE doomed (id INTEGER PRIMARY KEY)")
    doomed = service.create_extract(name="Doomed", schemas=["doomed"], max_attempts=1)
    with sqlite3.connect(shop_db) as con:
        con.execute("DROP TABLE doomed")
    assert service.wait_run(service.run(doomed["id"]))["status"] == "failed"
    after = scrape(service)
    assert value(after, "extracts_runs_active", instance_id=instance) == 0
    assert value(after, "extracts_runs_queued") == 0
    for status, count in (("cancelled", 3), ("failed", 1)):
        moved = value(after, "extracts_runs_total", status=status, triggered_by="manual") - value(
            before, "extracts_runs_total", status=status, triggered_by="manual"
        )
        assert moved == count, status
    # Every status and trigger is a series, zero included (rate() and alerts need them).
    assert len(series(after, "extracts_runs_total")) == 3 * 4


@pytest.mark.slow
def test_labels_are_route_templates_never_raw_paths(service: Any) -> None:
    document = service.client.get("/openapi.json").json()
    templates = {*document["paths"], "unmatched"}

    def burst() -> list[str]:
        ids = [uuid.uuid4().hex for _ in range(25)]
        with http_client(base_url=service.base_url, timeout=30) as anonymous:
            for i in ids:
                service.client.get(f"/api/data/extracts/extract_{i}")
                service.client.post(f"/api/extracts/extract_{i}/run")
                service.client.get(f"/api/extracts/runs/run_{i}/download")
                service.client.get(f"/api/describe/{i}/{i}")
                service.client.get(f"/nowhere/{i}")
                service.client.get(f"/api/nowhere/{i}")
                service.client.request(f"BREW{i[:4].upper()}", f"/api/data/extracts/{i}")
                anonymous.get(f"/api/data/extract_runs/run_{i}")  # 401, still its template
                anonymous.get(f"/assets/{i}.js")
        return ids

    scrape(service)  # a scrape counts itself once it answered: its series is there from now on
    ids = burst()
    first = scrape(service)
    requests = series(first, "extracts_http_requests_total")
    assert {labels["route"] for labels in requests} <= templates
    assert {labels["method"] for labels in requests} <= {"GET", "HEAD", "POST", "PUT", "DELETE", "other"}
    assert {labels["status"] for labels in requests} <= {
        "200",
        "201",
        "202",
        "304",
        "400",
        "401",
        "404",
        "405",
    }
    assert value(first, "extracts_http_requests_total", method="GET", route="unmatched", status="404") >= 50
    assert value(
        first, "extracts_http_requests_total", method="GET", route="/api/data/extract_runs/{id}", status="401"
    ) >= len(ids)
    text = service.client.get("/metrics").text
    assert not [i for i in ids if i in text]
    # Another burst of new ids adds no series at all: the label sets are bounded.
    burst()
    second = scrape(service)
    assert len(series(second, "extracts_http_requests_total")) == len(requests)
    assert {
        labels["route"] for labels in series(second, "extracts_http_request_duration_seconds_bucket")
    } <= (templates)


class _WriteBetween:
    """The state database, with ``write`` made once, right after the first read: what another
    task (the dispatcher claiming a run) may do between two reads of a scrape."""

    def __init__(self, db: Any, write: Callable[[], Awaitable[object]]) -> None:
        self.db, self.write = db, write

    async def fetch_all(self, *args: Any, **kwargs: Any) -> list[Any]:
        rows = await self.db.fetch_all(*args, **kwargs)
        write, self.write = self.write, None
        if write is not None:
            await write()
        return rows


def test_a_scrape_counts_each_run_once_while_runs_start(tmp_path: Path) -> None:
    """Queued runs and active runs were two queries: a run claimed between them was counted
    both as queued and as active (and one ending between them in neither), seen in 22 of 546
    scrapes of a service starting short runs. One query now counts them all."""
    db_path = tmp_path / "state.db"
    state.prepare_state_file(db_path)
    db = state.open_database(db_path)
    runs = Runs(db, LocalStorage(tmp_path / "storage"), str(tmp_path / "source.db"), 0)  # not opened
    instance = Instance(db, runs, pool=None, shared=False)  # live() reads the state only

    async def scenario() -> list[Metric]:
        await db.connect()
        try:
            now = state.now_iso()
            await db.execute(
                "INSERT INTO extracts (id, name, created_at, updated_at) VALUES ('extract_1', 'one', :n, :n)",
                {"n": now},
            )
            extract = await db.fetch_one("SELECT * FROM extracts WHERE id = 'extract_1'")
            assert await runs.queue(to_record(extract), TriggeredBy.MANUAL) is not None
            collector = StateCollector(_WriteBetween(db, runs.claim), instance)
            await collector.refresh()
            return list(collector.collect())
        finally:
            await db.disconnect()

    samples = {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in asyncio.run(scenario())
        for sample in family.samples
    }
    queued = value(samples, "extracts_runs_queued")
    active = sum(v for (name, _), v in samples.items() if name == "extracts_runs_active")
    assert (queued, active) == (1, 0)  # as the state stood when the scrape read it
