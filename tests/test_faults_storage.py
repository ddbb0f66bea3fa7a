"""Storage and source faults (SPEC: Snapshot, safety and faults): each fails its run with a clear
message, the service answers all along, and the next run works.

A storage volume that is really full or turns read-only, a file-size limit, the free-space
reserve, a source deleted, replaced or with a schema dropped under a run, both going away.
The app is served in this process (its workers are real processes), except where the
service's own process is the point (its output, its limits).
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest
from helpers import (
    Api,
    Prober,
    assert_files_match,
    make_big_db,
    make_shop_db,
    no_temporary_files,
    start_in_process,
    start_service,
    tmpfs,
    worker_writing,
)

pytestmark = pytest.mark.faults


def artifacts_of(service: Api, run_id: str) -> list[dict]:
    return service.client.get(
        "/api/data/extract_artifacts", params={"filter[where][run_id]": run_id, "filter[limit]": "1000"}
    ).json()["data"]


def assert_not_retried(service: Api, run: dict) -> None:
    """A permanent failure: no "(attempt …)", and no retry. The retry of a transient one is made
    in the failure's own transaction (tests/test_retries.py), so none can come later."""
    assert run["error_detail"]["retryable"] is False and "(attempt" not in run["error"], run
    assert run["retry_run_id"] is None
    runs = service.client.get(
        "/api/data/extract_runs", params={"filter[where][extract_id]": run["extract_id"]}
    ).json()["data"]
    assert [r["id"] for r in runs] == [run["id"]]


def remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True)


# ---------------------------------------------------------------- storage faults


@pytest.mark.slow
def test_the_free_space_reserve_fails_runs_cleanly_and_they_are_not_retried(tmp_path: Path) -> None:
    """Under --min-free-mb a run fails before writing; a permanent cause (SPEC: Retries)."""
    db = make_shop_db(tmp_path / "shop.db")
    # Above the volume's whole size: other tests (and other processes) free space meanwhile.
    size_mb = shutil.disk_usage(tmp_path).total >> 20
    svc = start_service(tmp_path, str(db), "--min-free-mb", str(size_mb + 1024))
    try:
        assert "reserve" in svc.output()  # the start-up warning
        extract = svc.create_extract(name="Full disk", retry_delay_seconds=1)
        run = svc.wait_run(svc.run(extract["id"]))
        assert run["status"] == "failed"
        assert "free" in run["error"] and "--min-free-mb" in run["error"], run["error"]
        assert_not_retried(svc, run)
        assert svc.client.get("/health").status_code == 200
    finally:
        svc.stop()


@pytest.mark.slow
def test_a_full_volume_fails_the_run_cleanly_and_the_next_run_works(tmp_path: Path) -> None:
    source = make_big_db(tmp_path / "source.db", 400_000)  # ~35 MB of JSON lines: twice the volume
    with tmpfs(tmp_path / "volume", 16) as volume:
        svc = start_in_process(tmp_path, str(source), "--min-free-mb", "0", storage=volume / "storage")
        try:
            extract = svc.create_extract(name="Too big", schemas=["big"], compress=False)
            with Prober(svc) as prober:
                run = svc.wait_run(svc.run(extract["id"]))
            assert run["status"] == "failed", run
            assert "No space left on device" in run["error"] and "free some space" in run["error"]
            assert "\n" not in run["error"] and "Traceback" in run["error_detail"]["traceback"]
            assert prober.problems == []
            assert no_temporary_files(svc.storage) == []
            assert_files_match(svc, run["id"])
            # Room again (the failed run's files deleted): the next run works.
            assert svc.client.delete(f"/api/data/extract_runs/{run['id']}").status_code == 200
            small = svc.create_extract(name="Fits", schemas=["small"])
            done = svc.wait_run(svc.run(small["id"]))
            assert done["status"] == "completed", done
            assert_files_match(svc, done["id"])
        finally:
            svc.stop()


@pytest.mark.slow
def test_a_full_volume_without_mount_rights_fails_the_run_cleanly(tmp_path: Path) -> None:
    """The same fault where no tmpfs can be mounted: a file-size limit on the service's processes."""
    source = make_big_db(tmp_path / "source.db", 200_000)
    limit = 8 << 20

    def limited() -> None:  # in the child, before exec: writes past the limit fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    svc = start_service(tmp_path, str(source), "--min-free-mb", "0", preexec_fn=limited)
    try:
        run = svc.wait_run(svc.run(svc.create_extract(name="Limited", schemas=["big"], compress=False)["id"]))
        assert run["status"] == "failed", run
        assert "File too large" in run["error"] and "\n" not in run["error"], run["error"]
        assert no_temporary_files(svc.storage) == []
        done = svc.wait_run(svc.run(svc.create_extract(name="Fits", schemas=["small"])["id"]))
        assert done["status"] == "completed", done
    finally:
        svc.stop()


def test_storage_turning_read_only_fails_runs_and_downloads_keep_working(tmp_path: Path) -> None:
    source = make_shop_db(tmp_path / "shop.db")
    with tmpfs(tmp_path / "volume", 32) as volume:
        svc = start_in_process(tmp_path, str(source), "--min-free-mb", "0", storage=volume / "storage")
        try:
            extract = svc.create_extract(name="Shop", schemas=["users", "orders"])
            before = svc.wait_run(svc.run(extract["id"]))
            assert before["status"] == "completed"
            remount(volume, "ro")
            try:
                with Prober(svc) as prober:
                    run = svc.wait_run(svc.run(extract["id"]))
                    zipped = svc.client.get(f"/api/extracts/runs/{before['id']}/download")
                    assert zipped.status_code == 200 and zipped.content[:2] == b"PK"
                    one = artifacts_of(svc, before["id"])[0]
                    r = svc.client.get(f"/api/extracts/artifacts/{one['id']}/download")
                    assert hashlib.sha256(r.content).hexdigest() == one["checksum"]
                assert prober.problems == []
                assert run["status"] == "failed", run
                assert "Read-only file system" in run["error"] and "--storage" in run["error"], run["error"]
                # A permission error is permanent (SPEC: Retries): no retry.
                assert run["error_detail"]["retryable"] is False and run["retry_run_id"] is None
                # Deleting the earlier run's files cannot work: a 503, and the records still true
                # (they used to be marked deleted while the files stayed).
                r = svc.client.delete(f"/api/data/extract_runs/{before['id']}")
                assert r.status_code == 503 and "Read-only file system" in r.json()["error"], r.text
                assert all(a["deleted_at"] is None for a in artifacts_of(svc, before["id"]))
                assert svc.client.get(f"/api/extracts/runs/{before['id']}/download").status_code == 200
            finally:
                remount(volume, "rw")
            assert svc.client.delete(f"/api/data/extract_runs/{before['id']}").status_code == 200
            assert not (svc.storage / before["id"]).exists()
            assert svc.client.get(f"/api/extracts/runs/{before['id']}/download").status_code == 410
            after = svc.wait_run(svc.run(extract["id"]))
            assert after["status"] == "completed", after
            assert_files_match(svc, after["id"])
        finally:
            svc.stop()


# ---------------------------------------------------------------- source faults


@pytest.mark.slow
def test_a_schema_dropped_after_saving_fails_the_run_clearly_and_it_is_not_retried(tmp_path: Path) -> None:
    db = make_shop_db(tmp_path / "shop.db")
    svc = start_in_process(tmp_path, str(db))
    try:
        extract = svc.create_extract(name="Dropped", schemas=["users", "orders"], retry_delay_seconds=1)
        con = sqlite3.connect(db)
        con.execute("DROP TABLE orders")
        con.commit()
        con.close()
        run = svc.wait_run(svc.run(extract["id"]))
        assert run["status"] == "failed"
        assert "orders" in run["error"] and "\n" not in run["error"]
        assert run["error_detail"]["type"] and "Traceback" in run["error_detail"]["traceback"]
        assert_not_retried(svc, run)
        kept = [a["artifact_name"] for a in artifacts_of(svc, run["id"])]
        assert "describe.yaml" not in kept or all(Path(svc.storage, run["id"], k).exists() for k in kept)
        assert svc.client.get(f"/api/data/extracts/{extract['id']}").json()["data"]["failed_runs"] == 1
        fixed = svc.create_extract(name="Fixed", schemas=["users"])
        assert svc.wait_run(svc.run(fixed["id"]))["status"] == "completed"
    finally:
        svc.stop()


@pytest.mark.slow
def test_source_deleted_or_replaced_mid_run(tmp_path: Path) -> None:
    source = make_big_db(tmp_path / "source.db", 600_000)
    svc = start_in_process(tmp_path, str(source))
    try:
        extract = svc.create_extract(name="Source faults", schemas=["big"], compress=False)
        # Deleted mid-run: the run reads its snapshot through the open file, or fails clearly.
        run_id = svc.run(extract["id"])
        worker_writing(svc.storage, run_id)
        kept = tmp_path / "kept.db"
        os.link(source, kept)
        source.unlink()
        run = svc.wait_run(run_id)
        assert run["status"] == "completed" and run["records_exported"] == 600_000, run
        assert_files_match(svc, run_id)
        gone = svc.wait_run(svc.run(extract["id"]))
        assert gone["status"] == "failed" and "does not exist" in gone["error"], gone
        assert svc.client.get("/api/describe").status_code == 503
        assert svc.client.get("/health").status_code == 200
        os.link(kept, source)
        # Replaced mid-run: the run finishes on the snapshot it started with.
        run_id = svc.run(extract["id"])
        worker_writing(svc.storage, run_id)
        replacement = make_big_db(tmp_path / "replacement.db", 1_000)
        os.replace(replacement, source)
        run = svc.wait_run(run_id)
        assert run["status"] == "completed" and run["records_exported"] == 600_000, run
        run = svc.wait_run(svc.run(extract["id"]))
        assert run["status"] == "completed" and run["records_exported"] == 1_000, run
    finally:
        svc.stop()


def test_storage_and_source_going_away_fail_runs_then_recover(tmp_path: Path) -> None:
    db = make_shop_db(tmp_path / "shop.db")
    svc = start_in_process(tmp_path, str(db))
    try:
        extract = svc.create_extract(name="Faults", schemas=["users"])
        moved = tmp_path / "storage-away"
        svc.storage.rename(moved)
        svc.storage.write_text("not a directory")
        run = svc.wait_run(svc.run(extract["id"]))
        assert run["status"] == "failed" and str(svc.storage) in run["error"], run["error"]
        svc.storage.unlink()
        moved.rename(svc.storage)
        db.rename(tmp_path / "shop-away.db")
        r = svc.client.get("/api/describe")
        assert r.status_code == 503 and r.json()["error_code"] == "SERVICE_UNAVAILABLE"
        assert "source" in r.json()["error"]
        assert svc.client.get("/health").status_code == 200
        r = svc.client.post("/api/data/extracts", json={"name": "x", "schemas": ["users"]})
        assert r.status_code == 503
        run = svc.wait_run(svc.run(extract["id"]))
        assert run["status"] == "failed" and "source" in run["error"].lower(), run["error"]
        (tmp_path / "shop-away.db").rename(db)
        assert svc.wait_run(svc.run(extract["id"]))["status"] == "completed"
    finally:
        svc.stop()
