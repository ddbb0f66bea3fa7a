"""Runs end to end: the app, real worker processes, real files read back.

The contract runs against the app served in this process; the big source (progress within
a table, a cancel mid-table) has a service of its own. Crashes, kills, signals and the
storage or source going away are in tests/test_faults*.py.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from helpers import Api, InProcessService, Service, http_client, make_big_db, start_service

# A run over these takes seconds: progress (sent every 0.2 s) is seen moving many times.
BIG_ROWS = 1_000_000


def artifacts_of(service: Api, run_id: str) -> list[dict]:
    r = service.client.get(
        "/api/data/extract_artifacts",
        params={"filter[where][run_id]": run_id, "filter[order]": "created_at asc", "filter[limit]": "1000"},
    )
    return r.json()["data"]


def read_rows(path: Path) -> list[dict]:
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    return [json.loads(line) for line in data.splitlines()]


def source_rows(db: Path, table: str) -> list[dict]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    rows = [dict(r) for r in con.execute(f'SELECT * FROM "{table}" ORDER BY rowid')]
    con.close()
    return rows


def test_run_completes_with_checksummed_files(app_service: InProcessService, shop_db: Path) -> None:
    extract = app_service.create_extract(name="Shop", schemas=["users", "orders", "order items"])
    r = app_service.client.post(f"/api/extracts/{extract['id']}/run")
    assert r.status_code == 202
    data = r.json()["data"]
    assert data["message"] == "Extract queued for execution"
    assert data["status_url"] == f"/api/data/extract_runs/{data['run_id']}"
    assert r.headers["location"] == data["status_url"]
    run = app_service.wait_run(data["run_id"])
    assert run["status"] == "completed", run
    assert run["progress"] == 100 and run["progress_detail"]["phase"] == "completed"
    assert run["records_exported"] == 4 + 50 + 20 and run["schemas_exported"] == 3
    assert run["triggered_by"] == "manual" and run["error"] is None
    assert run["duration_seconds"] >= 0 and run["completed_at"] >= run["started_at"] >= run["created_at"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", run["created_at"]), run["created_at"]
    artifacts = artifacts_of(app_service, run["id"])
    names = [a["artifact_name"] for a in artifacts]
    assert sorted(names) == sorted(
        ["describe.yaml", "users.jsonl.gz", "orders.jsonl.gz", "order%20items.jsonl.gz", "manifest.json"]
    )
    assert run["artifacts_created"] == 5
    assert run["total_size_bytes"] == sum(a["size_bytes"] for a in artifacts)
    for a in artifacts:
        path = Path(a["storage_path"])
        assert path.parent == app_service.storage / run["id"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == a["checksum"]
        assert path.stat().st_size == a["size_bytes"]
        assert a["expires_at"] > a["created_at"] and a["download_count"] == 0
        assert a["is_primary"] == (a["artifact_type"] != "manifest")
    by_name = {a["artifact_name"]: a for a in artifacts}
    assert read_rows(Path(by_name["orders.jsonl.gz"]["storage_path"])) == source_rows(shop_db, "orders")
    items = read_rows(Path(by_name["order%20items.jsonl.gz"]["storage_path"]))
    assert items == source_rows(shop_db, "order items")
    describe = yaml.safe_load(Path(by_name["describe.yaml"]["storage_path"]).read_text())
    assert list(describe) == ["users", "orders", "order items"] or set(describe) == {
        "users",
        "orders",
        "order items",
    }
    assert describe["order items"]["primary_key"] == ["order_id", "line"]
    manifest = json.loads(Path(by_name["manifest.json"]["storage_path"]).read_text())
    assert manifest["run_id"] == run["id"] and manifest["extract_id"] == extract["id"]
    assert {m["name"]: m["checksum"] for m in manifest["artifacts"]} == {
        a["artifact_name"]: a["checksum"] for a in artifacts if a["artifact_type"] != "manifest"
    }
    extract = app_service.client.get(f"/api/data/extracts/{extract['id']}").json()["data"]
    assert (extract["last_run_id"], extract["last_run_status"]) == (run["id"], "completed")
    assert (extract["total_runs"], extract["successful_runs"], extract["failed_runs"]) == (1, 1, 0)
    assert run["config_snapshot"]["schemas"] == ["users", "orders", "order items"]


def test_simultaneous_run_requests_create_exactly_one_run(app_service: InProcessService) -> None:
    extract = app_service.create_extract(name="Race", schemas=["users"])
    barrier = threading.Barrier(20)
    statuses: list[int] = []

    def fire() -> None:
        with http_client(base_url=app_service.base_url, headers=app_service.client.headers) as c:
            barrier.wait()
            statuses.append(c.post(f"/api/extracts/{extract['id']}/run").status_code)

    threads = [threading.Thread(target=fire) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [202] + [409] * 19
    runs = app_service.client.get(
        "/api/data/extract_runs", params={"filter[where][extract_id]": extract["id"]}
    ).json()["data"]
    assert len(runs) == 1
    app_service.wait_run(runs[0]["id"])


def test_a_run_takes_its_name_and_configuration_from_one_read(app_service: InProcessService) -> None:
    """A run request read the extract for the run's configuration, then inserted the run with
    the extract's name as the row had it then: a PUT renaming it and changing its schemas in
    between gave the run the new name and the old schemas, an extract that never was."""
    extract = app_service.create_extract(name="Before", schemas=["users"])
    con = sqlite3.connect(app_service.db, isolation_level=None, timeout=30)
    try:
        con.execute("BEGIN IMMEDIATE")  # the write lock: the request reads the extract, then waits
        started: list[httpx.Response] = []
        request = threading.Thread(
            target=lambda: started.append(app_service.client.post(f"/api/extracts/{extract['id']}/run"))
        )
        request.start()
        time.sleep(0.3)
        con.execute(
            "UPDATE extracts SET name = 'After', schemas = '[\"orders\"]', updated_at = ? WHERE id = ?",
            ("2099-01-01T00:00:00.000Z", extract["id"]),
        )
        con.execute("COMMIT")
        request.join(30)
    finally:
        con.close()
    assert started[0].status_code == 202, started[0].text
    run = app_service.wait_run(started[0].json()["data"]["run_id"])
    taken = (run["extract_name"], run["config_snapshot"]["schemas"])
    assert taken == ("Before", ["users"])  # as the request read it, before the PUT


def test_disabled_extract_and_cancel_without_run(app_service: InProcessService) -> None:
    extract = app_service.create_extract(name="Off", enabled=False)
    r = app_service.client.post(f"/api/extracts/{extract['id']}/run")
    assert r.status_code == 409 and "disabled" in r.json()["error"]
    r = app_service.client.post(f"/api/extracts/{extract['id']}/cancel")
    assert r.status_code == 404 and r.json()["error_code"] == "RECORD_NOT_FOUND"
    assert app_service.client.post("/api/extracts/extract_nope/run").status_code == 404
    assert app_service.client.post("/api/extracts/extract_nope/cancel").status_code == 404


@pytest.fixture(scope="module")
def big_service(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("big")
    db = make_big_db(tmp / "big.db", BIG_ROWS)
    svc = start_service(tmp, str(db))
    yield svc
    svc.stop()


@pytest.mark.slow
def test_progress_moves_within_a_big_table_and_never_goes_down(big_service: Service) -> None:
    extract = big_service.create_extract(name="Big", schemas=["big"], compress=False)
    run_id = big_service.run(extract["id"])
    samples, seen_at = [], []
    while True:
        run = big_service.client.get(f"/api/data/extract_runs/{run_id}").json()["data"]
        samples.append((run["progress"], run["progress_detail"]))
        seen_at.append(time.monotonic())
        if run["status"] in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.02)
    assert run["status"] == "completed", run
    progress = [p for p, _ in samples]
    assert progress == sorted(progress), progress
    # Values within the table: progress is sent every 0.2 s while rows are written, so as many as
    # the table's time allows (a second or two on a slow machine, half a second on a fast one),
    # give or take the first and the last, and three at most.
    data_seen = next(t for t, (p, _) in zip(seen_at, samples, strict=True) if p >= 25)
    expected = min(3, int((seen_at[-1] - data_seen) / 0.2) - 1)
    assert len({p for p in progress if 25 < p < 100}) >= max(expected, 1), (progress, expected)
    assert run["records_exported"] == BIG_ROWS
    assert run["progress_detail"]["records_total"] == BIG_ROWS
    phases = [d["phase"] for _, d in samples]
    order = [
        "queued",
        "exporting_describe",
        "exported_describe",
        "exporting_data",
        "writing_manifest",
        "completed",
    ]
    seen = [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] != p]
    assert seen == [p for p in order if p in seen]


@pytest.mark.slow
def test_cancel_stops_the_worker_within_two_seconds(big_service: Service) -> None:
    extract = big_service.create_extract(name="Cancel me", schemas=["small", "big"], compress=False)
    run_id = big_service.run(extract["id"])
    while True:
        run = big_service.client.get(f"/api/data/extract_runs/{run_id}").json()["data"]
        if (
            run["progress_detail"].get("current_schema") == "big"
            and run["progress_detail"]["records_exported"] > 1
        ):
            break
        time.sleep(0.01)
    r = big_service.client.post(f"/api/extracts/{extract['id']}/cancel")
    assert r.status_code == 200
    assert r.json()["data"] == {"message": "Extract cancelled", "run_id": run_id}
    cancelled_at = time.monotonic()
    run = big_service.client.get(f"/api/data/extract_runs/{run_id}").json()["data"]
    assert run["status"] == "cancelled" and run["completed_at"] is not None
    run_dir = big_service.storage / run_id
    # The worker stops writing: the run directory stops changing within 2 s.
    last = None
    while time.monotonic() - cancelled_at < 5:
        sizes = {p.name: p.stat().st_size for p in run_dir.iterdir()} if run_dir.exists() else {}
        if sizes == last and time.monotonic() - cancelled_at > 0.3:
            break
        last = sizes
        time.sleep(0.25)
    assert time.monotonic() - cancelled_at < 2.5
    time.sleep(0.5)
    names = sorted(a["artifact_name"] for a in artifacts_of(big_service, run_id))
    assert "describe.yaml" in names and "small.jsonl" in names and "big.jsonl" not in names
    assert sorted(p.name for p in run_dir.iterdir()) == names
    # Not a ZIP (the run is not completed), but each kept file downloads on its own.
    r = big_service.client.get(f"/api/extracts/runs/{run_id}/download")
    assert r.status_code == 409 and "cancelled" in r.json()["error"]
    small = next(a for a in artifacts_of(big_service, run_id) if a["artifact_name"] == "small.jsonl")
    r = big_service.client.get(f"/api/extracts/artifacts/{small['id']}/download")
    assert r.status_code == 200 and json.loads(r.content) == {"id": 1, "v": "one"}
    extract = big_service.client.get(f"/api/data/extracts/{extract['id']}").json()["data"]
    assert extract["cancelled_runs"] == 1
    # A new run can start at once.
    assert big_service.client.post(f"/api/extracts/{extract['id']}/run").status_code == 202
