"""ZIP and single-file downloads from a real server, read back with zipfile and unzip."""

from __future__ import annotations

import asyncio
import hashlib
import io
import shutil
import sqlite3
import subprocess
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
from conftest import Service, start_service
from databases import Database

from extracts.downloads import count_download
from extracts.state import StateConnection


@pytest.fixture(scope="module")
def completed(service: Service) -> dict:
    extract = service.create_extract(name="Down load: ZIP/é", schemas=["users", "order items"])
    run = service.wait_run(service.run(extract["id"]))
    assert run["status"] == "completed"
    artifacts = service.client.get(
        "/api/data/extract_artifacts", params={"filter[where][run_id]": run["id"]}
    ).json()["data"]
    return {"extract": extract, "run": run, "artifacts": artifacts}


def test_zip_holds_every_artifact_byte_for_byte(service: Service, completed: dict, tmp_path: Path):
    run = completed["run"]
    r = service.client.get(f"/api/extracts/runs/{run['id']}/download")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/zip"
    assert int(r.headers["content-length"]) == len(r.content)
    assert r.headers["etag"].startswith('"') and r.headers["accept-ranges"] == "bytes"
    day = run["created_at"][:10]
    assert (
        r.headers["content-disposition"] == f'attachment; filename="Down-load-ZIP-{day}-{run["id"][:8]}.zip"'
    )
    archive = zipfile.ZipFile(io.BytesIO(r.content))
    assert archive.testzip() is None
    members = {info.filename: info for info in archive.infolist()}
    assert set(members) == {a["artifact_name"] for a in completed["artifacts"]}
    for artifact in completed["artifacts"]:
        data = archive.read(artifact["artifact_name"])
        assert data == Path(artifact["storage_path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == artifact["checksum"]
        assert members[artifact["artifact_name"]].compress_type == zipfile.ZIP_STORED
    path = tmp_path / "run.zip"
    path.write_bytes(r.content)
    if shutil.which("unzip"):
        assert subprocess.run(["unzip", "-t", str(path)], capture_output=True).returncode == 0
    again = service.client.get(f"/api/extracts/runs/{run['id']}/download")
    assert again.content == r.content and again.headers["etag"] == r.headers["etag"]


def test_zip_resumes_from_any_byte(service: Service, completed: dict) -> None:
    url = f"/api/extracts/runs/{completed['run']['id']}/download"
    full = service.client.get(url)
    size, etag = len(full.content), full.headers["etag"]
    first_name_len = len(completed["artifacts"][0]["artifact_name"])
    cuts = sorted(
        {
            1,
            7,
            29,
            30 + first_name_len,
            31 + first_name_len,
            size // 3,
            size // 2,
            size - 200,
            size - 60,
            size - 22,
            size - 10,
            size - 1,
        }
    )
    for n in cuts:
        r = service.client.get(url, headers={"Range": f"bytes={n}-", "If-Range": etag})
        assert r.status_code == 206, n
        assert r.headers["content-range"] == f"bytes {n}-{size - 1}/{size}"
        assert int(r.headers["content-length"]) == size - n
        assert full.content[:n] + r.content == full.content, n
    r = service.client.get(url, headers={"Range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == full.content[10:20]
    r = service.client.get(url, headers={"Range": "bytes=-5"})
    assert r.content == full.content[-5:]
    r = service.client.get(url, headers={"Range": "bytes=5-", "If-Range": '"stale"'})
    assert r.status_code == 200 and r.content == full.content
    r = service.client.get(url, headers={"Range": f"bytes={size}-"})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{size}"
    head = service.client.head(url)
    assert head.status_code == 200 and int(head.headers["content-length"]) == size


def test_deflated_zip(service: Service, completed: dict) -> None:
    r = service.client.get(
        f"/api/extracts/runs/{completed['run']['id']}/download", params={"compression": "deflate"}
    )
    assert r.status_code == 200 and "content-range" not in r.headers
    archive = zipfile.ZipFile(io.BytesIO(r.content))
    assert archive.testzip() is None
    for artifact in completed["artifacts"]:
        assert archive.read(artifact["artifact_name"]) == Path(artifact["storage_path"]).read_bytes()
    r = service.client.get(
        f"/api/extracts/runs/{completed['run']['id']}/download", params={"compression": "bzip2"}
    )
    assert r.status_code == 400 and r.json()["details"][0]["field"] == "compression"


def test_single_artifact_download_with_range_and_counting(service: Service, completed: dict):
    artifact = next(a for a in completed["artifacts"] if a["artifact_name"] == "describe.yaml")
    url = f"/api/extracts/artifacts/{artifact['id']}/download"
    r = service.client.get(url)
    assert r.status_code == 200
    body = Path(artifact["storage_path"]).read_bytes()
    assert r.content == body
    assert r.headers["content-type"].startswith("application/yaml")
    assert r.headers["x-checksum-sha256"] == artifact["checksum"]
    assert r.headers["etag"] == f'"{artifact["checksum"]}"'
    assert int(r.headers["content-length"]) == len(body)
    assert 'filename="describe.yaml"' in r.headers["content-disposition"]
    r = service.client.get(url, headers={"Range": "bytes=4-"})
    assert r.status_code == 206 and r.content == body[4:]
    record = service.client.get(f"/api/data/extract_artifacts/{artifact['id']}").json()["data"]
    assert record["download_count"] >= 1 and record["accessed_at"] is not None


def test_zip_download_counts_each_artifact(service: Service) -> None:
    extract = service.create_extract(name="Counting", schemas=["users"])
    run = service.wait_run(service.run(extract["id"]))
    service.client.get(f"/api/extracts/runs/{run['id']}/download")
    service.client.get(f"/api/extracts/runs/{run['id']}/download", headers={"Range": "bytes=100-"})
    artifacts = service.client.get(
        "/api/data/extract_artifacts", params={"filter[where][run_id]": run["id"]}
    ).json()["data"]
    assert [a["download_count"] for a in artifacts] == [1] * len(artifacts)


def test_download_errors(service: Service, completed: dict, shop_db: Path) -> None:
    r = service.client.get("/api/extracts/runs/run_missing/download")
    assert r.status_code == 404 and r.json()["error_code"] == "RECORD_NOT_FOUND"
    r = service.client.get("/api/extracts/artifacts/artifact_missing/download")
    assert r.status_code == 404
    # A run's files removed from disk: 404 naming the file, before any byte is sent.
    extract = service.create_extract(name="Missing file", schemas=["users"])
    run = service.wait_run(service.run(extract["id"]))
    victim = service.storage / run["id"] / "users.jsonl.gz"
    victim.rename(victim.with_suffix(".away"))
    r = service.client.get(f"/api/extracts/runs/{run['id']}/download")
    assert r.status_code == 404 and "users.jsonl.gz" in r.json()["error"]
    victim.with_suffix(".away").rename(victim)
    assert service.client.get(f"/api/extracts/runs/{run['id']}/download").status_code == 200
    # A file whose size is not the recorded one: 404 naming it, for the ZIP and the file alike.
    users = service.client.get(
        "/api/data/extract_artifacts",
        params={"filter[where][run_id]": run["id"], "filter[where][artifact_name]": "users.jsonl.gz"},
    ).json()
    data = victim.read_bytes()
    victim.write_bytes(data + b"x")
    for url in (
        f"/api/extracts/runs/{run['id']}/download",
        f"/api/extracts/artifacts/{users['data'][0]['id']}/download",
    ):
        r = service.client.get(url)
        assert r.status_code == 404, url
        assert r.json()["error"].startswith(f"File users.jsonl.gz of run {run['id']} cannot be sent: ")
        assert f"{len(data) + 1} bytes on disk but was recorded as {len(data)}" in r.json()["error"]
    victim.write_bytes(data)
    # Deleting the run: 410 for its ZIP and its files, the record stays.
    r = service.client.delete(f"/api/data/extract_runs/{run['id']}")
    assert r.status_code == 200 and r.json()["data"]["id"] == run["id"]
    assert not (service.storage / run["id"]).exists()
    r = service.client.get(f"/api/extracts/runs/{run['id']}/download")
    assert r.status_code == 410 and r.json()["error_code"] == "GONE"
    artifacts = service.client.get(
        "/api/data/extract_artifacts", params={"filter[where][run_id]": run["id"]}
    ).json()["data"]
    assert all(a["deleted_at"] for a in artifacts)
    r = service.client.get(f"/api/extracts/artifacts/{artifacts[0]['id']}/download")
    assert r.status_code == 410


def test_a_deleted_extract_keeps_its_runs_downloadable(service: Service) -> None:
    extract = service.create_extract(name="Soft", schemas=["users"])
    run = service.wait_run(service.run(extract["id"]))
    assert service.client.delete(f"/api/data/extracts/{extract['id']}").status_code == 200
    assert service.client.get(f"/api/data/extract_runs/{run['id']}").status_code == 200
    r = service.client.get(f"/api/extracts/runs/{run['id']}/download")
    assert r.status_code == 200 and zipfile.ZipFile(io.BytesIO(r.content)).testzip() is None


class FewVariables(StateConnection):
    """A state connection that takes at most 50 parameters per statement (SQLite's limit is
    32,766 on common builds, 250,000 on some: lowered here so that a small run exceeds it)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 50)


def test_downloads_are_counted_by_run_not_by_artifact_id(service: Service) -> None:
    extract = service.create_extract(name="Many parts", compress=False, split_files=True, split_max_records=1)
    run = service.wait_run(service.run(extract["id"]))
    params = {"filter[where][run_id]": run["id"], "filter[limit]": 1000}

    def counts() -> list[int]:
        return [
            a["download_count"]
            for a in service.client.get("/api/data/extract_artifacts", params=params).json()["data"]
        ]

    assert len(counts()) > 50

    async def count_with_few_variables() -> None:
        db = Database(f"sqlite:///{service.db}", factory=FewVariables)
        await db.connect()
        try:
            await count_download(db, "run_id", run["id"])
        finally:
            await db.disconnect()

    asyncio.run(count_with_few_variables())
    assert set(counts()) == {1}
    assert service.client.get(f"/api/extracts/runs/{run['id']}/download").status_code == 200
    assert set(counts()) == {2}


@pytest.mark.slow
def test_a_run_of_40000_files_downloads_as_a_zip(tmp_path: Path) -> None:
    """More files than SQLite's usual parameter limit and than the process may open (most are
    held by links: tests/test_downloads_held.py). About a minute: the run writes 40,000 files."""
    source = tmp_path / "rows.db"
    con = sqlite3.connect(source)
    con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
    con.execute(
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 40000) "
        "INSERT INTO t SELECT x FROM c"
    )
    con.commit()
    con.close()
    svc = start_service(tmp_path, str(source))
    try:
        extract = svc.create_extract(
            name="Parts", schemas=["t"], compress=False, split_files=True, split_max_records=1
        )
        run = svc.wait_run(svc.run(extract["id"]), timeout=600)
        assert run["status"] == "completed" and run["artifacts_created"] == 40_002
        started = time.monotonic()
        r = svc.client.get(f"/api/extracts/runs/{run['id']}/download", timeout=300)
        assert r.status_code == 200, r.text[:300]
        took = time.monotonic() - started
        with zipfile.ZipFile(io.BytesIO(r.content)) as archive:
            assert len(archive.infolist()) == 40_002 and archive.testzip() is None
            assert archive.read("t.00001.jsonl") == b'{"id":1}\n'
        con = sqlite3.connect(svc.db)
        assert con.execute(
            "SELECT download_count, count(*) FROM extract_artifacts WHERE run_id = ? GROUP BY 1", (run["id"],)
        ).fetchall() == [(1, 40_002)]
        con.close()
        assert took < 60, took
    finally:
        svc.stop()
