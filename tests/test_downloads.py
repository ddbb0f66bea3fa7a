"""ZIP and single-file downloads from the app (uvicorn, in this process), read back with zipfile and unzip."""

from __future__ import annotations

import asyncio
import hashlib
import io
import resource
import shutil
import sqlite3
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pytest
from databases import Database
from helpers import TOKEN, InProcessService, start_service

from extracts.downloads import count_download
from extracts.state import StateConnection


@pytest.fixture(scope="module")
def completed(app_service: InProcessService) -> dict:
    extract = app_service.create_extract(name="Down load: ZIP/é", schemas=["users", "order items"])
    run = app_service.wait_run(app_service.run(extract["id"]))
    assert run["status"] == "completed"
    artifacts = app_service.client.get(
        "/api/data/extract_artifacts", params={"filter[where][run_id]": run["id"]}
    ).json()["data"]
    return {"extract": extract, "run": run, "artifacts": artifacts}


def test_zip_holds_every_artifact_byte_for_byte(
    app_service: InProcessService, completed: dict, tmp_path: Path
):
    run = completed["run"]
    r = app_service.client.get(f"/api/extracts/runs/{run['id']}/download")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/zip"
    assert int(r.headers["content-length"]) == len(r.content)
    assert r.headers["etag"].startswith('"') and r.headers["accept-ranges"] == "bytes"
    day = run["created_at"][:10]
    assert (
        r.headers["content-disposition"] == f'attachment; filename="Down-load-ZIP--{day}-{run["id"][:8]}.zip"'
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
    again = app_service.client.get(f"/api/extracts/runs/{run['id']}/download")
    assert again.content == r.content and again.headers["etag"] == r.headers["etag"]


def test_zip_resumes_from_any_byte(app_service: InProcessService, completed: dict) -> None:
    url = f"/api/extracts/runs/{completed['run']['id']}/download"
    full = app_service.client.get(url)
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
        r = app_service.client.get(url, headers={"Range": f"bytes={n}-", "If-Range": etag})
        assert r.status_code == 206, n
        assert r.headers["content-range"] == f"bytes {n}-{size - 1}/{size}"
        assert int(r.headers["content-length"]) == size - n
        assert full.content[:n] + r.content == full.content, n
    r = app_service.client.get(url, headers={"Range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == full.content[10:20]
    r = app_service.client.get(url, headers={"Range": "bytes=-5"})
    assert r.content == full.content[-5:]
    r = app_service.client.get(url, headers={"Range": "bytes=5-", "If-Range": '"stale"'})
    assert r.status_code == 200 and r.content == full.content
    r = app_service.client.get(url, headers={"Range": f"bytes={size}-"})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{size}"
    head = app_service.client.head(url)
    assert head.status_code == 200 and int(head.headers["content-length"]) == size


def test_deflated_zip(app_service: InProcessService, completed: dict) -> None:
    r = app_service.client.get(
        f"/api/extracts/runs/{completed['run']['id']}/download", params={"compression": "deflate"}
    )
    assert r.status_code == 200 and "content-range" not in r.headers
    archive = zipfile.ZipFile(io.BytesIO(r.content))
    assert archive.testzip() is None
    for artifact in completed["artifacts"]:
        assert archive.read(artifact["artifact_name"]) == Path(artifact["storage_path"]).read_bytes()
    r = app_service.client.get(
        f"/api/extracts/runs/{completed['run']['id']}/download", params={"compression": "bzip2"}
    )
    assert r.status_code == 400 and r.json()["details"][0]["field"] == "compression"


def test_single_artifact_download_with_range_and_counting(app_service: InProcessService, completed: dict):
    artifact = next(a for a in completed["artifacts"] if a["artifact_name"] == "describe.yaml")
    url = f"/api/extracts/artifacts/{artifact['id']}/download"
    r = app_service.client.get(url)
    assert r.status_code == 200
    body = Path(artifact["storage_path"]).read_bytes()
    assert r.content == body
    assert r.headers["content-type"].startswith("application/yaml")
    assert r.headers["x-checksum-sha256"] == artifact["checksum"]
    assert r.headers["etag"] == f'"{artifact["checksum"]}"'
    assert int(r.headers["content-length"]) == len(body)
    assert 'filename="describe.yaml"' in r.headers["content-disposition"]
    r = app_service.client.get(url, headers={"Range": "bytes=4-"})
    assert r.status_code == 206 and r.content == body[4:]
    record = app_service.client.get(f"/api/data/extract_artifacts/{artifact['id']}").json()["data"]
    assert record["download_count"] >= 1 and record["accessed_at"] is not None


def test_a_file_name_with_a_percent_keeps_its_name(
    app_service: InProcessService, completed: dict, tmp_path: Path
) -> None:
    """``filename`` carries the name as it is (what curl -J reads), ``filename*`` for browsers."""
    artifact = next(a for a in completed["artifacts"] if a["schema_name"] == "order items")
    assert artifact["artifact_name"] == "order%20items.jsonl.gz"
    url = f"/api/extracts/artifacts/{artifact['id']}/download"
    r = app_service.client.head(url)
    assert r.headers["content-disposition"] == (
        "attachment; filename=\"order%20items.jsonl.gz\"; filename*=utf-8''order%2520items.jsonl.gz"
    )
    if shutil.which("curl"):  # the README's way to download one file
        subprocess.run(
            ["curl", "-sfOJ", "-H", f"Authorization: Bearer {TOKEN}", app_service.base_url + url],
            cwd=tmp_path,
            check=True,
        )
        assert [p.name for p in tmp_path.iterdir()] == ["order%20items.jsonl.gz"]


def test_zip_download_counts_each_artifact(app_service: InProcessService) -> None:
    extract = app_service.create_extract(name="Counting", schemas=["users"])
    run = app_service.wait_run(app_service.run(extract["id"]))
    app_service.client.get(f"/api/extracts/runs/{run['id']}/download")
    app_service.client.get(f"/api/extracts/runs/{run['id']}/download", headers={"Range": "bytes=100-"})
    artifacts = app_service.client.get(
        "/api/data/extract_artifacts", params={"filter[where][run_id]": run["id"]}
    ).json()["data"]
    assert [a["download_count"] for a in artifacts] == [1] * len(artifacts)


def test_download_errors(app_service: InProcessService, completed: dict, shop_db: Path) -> None:
    r = app_service.client.get("/api/extracts/runs/run_missing/download")
    assert r.status_code == 404 and r.json()["error_code"] == "RECORD_NOT_FOUND"
    r = app_service.client.get("/api/extracts/artifacts/artifact_missing/download")
    assert r.status_code == 404
    # A run's files removed from disk: 404 naming the file, before any byte is sent.
    extract = app_service.create_extract(name="Missing file", schemas=["users"])
    run = app_service.wait_run(app_service.run(extract["id"]))
    victim = app_service.storage / run["id"] / "users.jsonl.gz"
    victim.rename(victim.with_suffix(".away"))
    r = app_service.client.get(f"/api/extracts/runs/{run['id']}/download")
    assert r.status_code == 404 and "users.jsonl.gz" in r.json()["error"]
    victim.with_suffix(".away").rename(victim)
    assert app_service.client.get(f"/api/extracts/runs/{run['id']}/download").status_code == 200
    # A file whose size is not the recorded one: 404 naming it, for the ZIP and the file alike.
    users = app_service.client.get(
        "/api/data/extract_artifacts",
        params={"filter[where][run_id]": run["id"], "filter[where][artifact_name]": "users.jsonl.gz"},
    ).json()
    data = victim.read_bytes()
    victim.write_bytes(data + b"x")
    for url in (
        f"/api/extracts/runs/{run['id']}/download",
        f"/api/extracts/artifacts/{users['data'][0]['id']}/download",
    ):
        r = app_service.client.get(url)
        assert r.status_code == 404, url
        assert r.json()["error"].startswith(f"File users.jsonl.gz of run {run['id']} cannot be sent: ")
        assert f"{len(data) + 1} bytes on disk but was recorded as {len(data)}" in r.json()["error"]
    victim.write_bytes(data)
    # Deleting the run: 410 for its ZIP and its files, the record stays.
    r = app_service.client.delete(f"/api/data/extract_runs/{run['id']}")
    assert r.status_code == 200 and r.json()["data"]["id"] == run["id"]
    assert not (app_service.storage / run["id"]).exists()
    r = app_service.client.get(f"/api/extracts/runs/{run['id']}/download")
    assert r.status_code == 410 and r.json()["error_code"] == "GONE"
    artifacts = app_service.client.get(
        "/api/data/extract_artifacts", params={"filter[where][run_id]": run["id"]}
    ).json()["data"]
    assert all(a["deleted_at"] for a in artifacts)
    r = app_service.client.get(f"/api/extracts/artifacts/{artifacts[0]['id']}/download")
    assert r.status_code == 410


def test_a_download_while_its_run_is_deleted_is_gone_not_missing(app_service: InProcessService) -> None:
    """A DELETE removes the run's files, then marks its rows: a download in between passed the
    410 check, found no file, and answered 404 "missing from storage"."""
    extract = app_service.create_extract(name="Deleted meanwhile", schemas=["users"])
    run = app_service.wait_run(app_service.run(extract["id"]))
    artifact = app_service.client.get(
        "/api/data/extract_artifacts", params={"filter[where][run_id]": run["id"]}
    ).json()["data"][0]
    runs = app_service.server.config.app.state.extracts.runs
    runs.deleting.add(run["id"])  # the DELETE between its two steps: files gone, rows not yet marked
    try:
        shutil.rmtree(app_service.storage / run["id"])
        for url in (
            f"/api/extracts/runs/{run['id']}/download",
            f"/api/extracts/artifacts/{artifact['id']}/download",
        ):
            r = app_service.client.get(url)
            assert r.status_code == 410 and r.json()["error"].endswith("was deleted with its run"), r.text
    finally:
        runs.deleting.discard(run["id"])
    # Files gone behind the service's back, no DELETE: still the 404 naming the file.
    r = app_service.client.get(f"/api/extracts/runs/{run['id']}/download")
    assert r.status_code == 404 and "is missing from storage" in r.json()["error"]


def test_a_deleted_extract_keeps_its_runs_downloadable(app_service: InProcessService) -> None:
    extract = app_service.create_extract(name="Soft", schemas=["users"])
    run = app_service.wait_run(app_service.run(extract["id"]))
    assert app_service.client.delete(f"/api/data/extracts/{extract['id']}").status_code == 200
    assert app_service.client.get(f"/api/data/extract_runs/{run['id']}").status_code == 200
    r = app_service.client.get(f"/api/extracts/runs/{run['id']}/download")
    assert r.status_code == 200 and zipfile.ZipFile(io.BytesIO(r.content)).testzip() is None


class FewVariables(StateConnection):
    """A state connection that takes at most 50 parameters per statement (SQLite's limit is
    32,766 on common builds, 250,000 on some: lowered here so that a small run exceeds it)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 50)


def test_downloads_are_counted_by_run_not_by_artifact_id(app_service: InProcessService) -> None:
    extract = app_service.create_extract(
        name="Many parts", compress=False, split_files=True, split_max_records=1
    )
    run = app_service.wait_run(app_service.run(extract["id"]))
    params = {"filter[where][run_id]": run["id"], "filter[limit]": 1000}

    def counts() -> list[int]:
        return [
            a["download_count"]
            for a in app_service.client.get("/api/data/extract_artifacts", params=params).json()["data"]
        ]

    assert len(counts()) > 50

    async def count_with_few_variables() -> None:
        db = Database(f"sqlite:///{app_service.db}", factory=FewVariables)
        await db.connect()
        try:
            await count_download(db, "run_id", run["id"])
        finally:
            await db.disconnect()

    asyncio.run(count_with_few_variables())
    assert set(counts()) == {1}
    assert app_service.client.get(f"/api/extracts/runs/{run['id']}/download").status_code == 200
    assert set(counts()) == {2}


FILES = 1_000  # data files of one run: four times the open-file limit, fifteen its budget (NOFILE)
NOFILE = 256  # the service's open-file limit (its budget for held files is a quarter of it)


@pytest.mark.slow
def test_a_run_of_more_files_than_the_service_may_open_downloads_as_a_zip(tmp_path: Path) -> None:
    """Most files are held by links past the descriptor budget (tests/test_downloads_held.py);
    however many files a run has, one statement counts its download (the parameter limit:
    test_downloads_are_counted_by_run_not_by_artifact_id)."""
    source = tmp_path / "rows.db"
    con = sqlite3.connect(source)
    con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
    con.execute(
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT ?) "
        "INSERT INTO t SELECT x FROM c",
        (FILES,),
    )
    con.commit()
    con.close()

    def limited() -> None:  # the service and its workers, before exec
        resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    svc = start_service(tmp_path, str(source), preexec_fn=limited)
    try:
        extract = svc.create_extract(
            name="Parts", schemas=["t"], compress=False, split_files=True, split_max_records=1
        )
        run = svc.wait_run(svc.run(extract["id"]), timeout=300)
        assert run["status"] == "completed" and run["artifacts_created"] == FILES + 2, run
        r = svc.client.get(f"/api/extracts/runs/{run['id']}/download", timeout=300)
        assert r.status_code == 200, r.text[:300]
        with zipfile.ZipFile(io.BytesIO(r.content)) as archive:
            assert len(archive.infolist()) == FILES + 2 and archive.testzip() is None
            assert archive.read("t.00001.jsonl") == b'{"id":1}\n'
        con = sqlite3.connect(svc.db)
        assert con.execute(
            "SELECT download_count, count(*) FROM extract_artifacts WHERE run_id = ? GROUP BY 1", (run["id"],)
        ).fetchall() == [(1, FILES + 2)]
        con.close()
        assert "Too many open files" not in svc.output()
    finally:
        svc.stop()
