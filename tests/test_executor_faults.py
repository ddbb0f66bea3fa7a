"""Faults, cancellation, snapshot consistency under writes, and progress on a big table."""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import json
import multiprocessing
import os
import queue
import re
import resource
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import Channel, build_big_table, make_job, make_source, run_sql

from executor import run_extract
from executor.sources import SourceUnavailable, open_source
from executor.sources import sqlite as sqlite_source
from executor.worker import Export, Monitor
from executor.writers import ArtifactFile, RunPlace
from extracts.storage import LowDiskSpace
from extracts.storage.local import LocalStorage


def leftovers(run_dir: Path) -> list[str]:
    """Temporary files left in a run directory (there must be none)."""
    return sorted(p.name for p in run_dir.glob(".*")) if run_dir.is_dir() else []


def assert_failed(result: dict[str, Any], error: str, exception: str) -> None:
    assert result["status"] == "failed"
    assert result["error"] == error
    assert result["error_detail"]["type"] == exception
    assert "Traceback" in result["error_detail"]["traceback"]


# ---------------------------------------------------------------- faults


@pytest.mark.faults
def test_a_schema_dropped_since_the_configuration_fails_the_run(tmp_path: Path, manager: Any) -> None:
    db = run_sql(make_source(tmp_path / "source.db"), 'DROP TABLE "order items"')
    channel = Channel(manager)
    job = make_job(tmp_path, db, schemas=["users", "order items"])
    assert_failed(
        channel.run(job),
        "Schema 'order items' no longer exists in the source; remove it "
        "from the extract's schemas (PUT /api/data/extracts/extract_test) or restore it",
        "UnknownSchema",
    )
    assert channel.artifacts() == [] and os.listdir(job["run_dir"]) == []


@pytest.mark.faults
def test_a_filter_on_a_dropped_column_fails_the_run(tmp_path: Path, manager: Any) -> None:
    db = run_sql(make_source(tmp_path / "source.db"), "ALTER TABLE orders DROP COLUMN note")
    result = Channel(manager).run(make_job(tmp_path, db, filter={"orders": {"where": {"note": None}}}))
    assert result["status"] == "failed"
    assert result["error"].startswith(
        "The filter filter.orders.where.note no longer fits the source "
        "(unknown column 'note'; the columns are: id, user_id, total)"
    )


@pytest.mark.faults
@pytest.mark.parametrize("change", ['DROP TABLE "order items"', 'ALTER TABLE "order items" RENAME TO x'])
def test_a_filter_on_a_table_this_run_no_longer_exports_fails_the_run(
    tmp_path: Path, manager: Any, change: str
) -> None:
    # schemas null exports every table: a filtered one dropped, or replaced by a view of the
    # same name (views only when named), would leave its filter silently unapplied.
    db = run_sql(make_source(tmp_path / "source.db"), change)
    if "RENAME" in change:
        run_sql(db, 'CREATE VIEW "order items" AS SELECT * FROM x')
    result = Channel(manager).run(make_job(tmp_path, db, filter={"order items": {"where": {"id": 1}}}))
    assert result["status"] == "failed"
    assert result["error"] == (
        "The filter filter.order items names a schema this run does not export (no such table; "
        "a view is exported only when schemas names it); update the extract's filter"
    )


@pytest.mark.faults
def test_a_run_again_under_its_id_clears_what_its_earlier_attempt_left(tmp_path: Path, manager: Any) -> None:
    # A run put back in the queue keeps its id; its files stay when the storage failed as it
    # went back. Its next attempt starts clean instead of failing on a name clash.
    job = make_job(tmp_path, make_source(tmp_path / "source.db"), schemas=["users"])
    run_dir = Path(job["run_dir"])
    run_dir.mkdir(parents=True)
    (run_dir / "users.jsonl").write_bytes(b"an earlier attempt's")
    (run_dir / ".users.jsonl.tmp").write_bytes(b"half")
    result = Channel(manager).run(job)
    assert result["status"] == "completed", result
    assert sorted(os.listdir(run_dir)) == ["describe.yaml", "manifest.json", "users.jsonl"]


@pytest.mark.faults
def test_free_space_under_the_reserve_fails_before_writing(tmp_path: Path, manager: Any) -> None:
    db = make_source(tmp_path / "source.db")
    channel = Channel(manager)
    job = make_job(tmp_path, db) | {"min_free_bytes": 1 << 60}
    result = channel.run(job)
    assert result["status"] == "failed" and result["error_detail"]["type"] == "LowDiskSpace"
    assert re.fullmatch(
        r"Free space on /\S* is \d+ MB, under the 1099511627776 MB reserve; "
        r"free some space or lower --min-free-mb",
        result["error"],
    )
    assert channel.artifacts() == [] and os.listdir(job["run_dir"]) == []


@pytest.mark.faults
def test_the_reserve_is_checked_while_a_file_is_written(tmp_path: Path) -> None:
    place = RunPlace(LocalStorage(tmp_path), "run_1", 0)
    place.storage.begin_run("run_1")
    file = ArtifactFile(place, "big.jsonl")
    place.min_free_bytes = 1 << 60  # the volume "fills up" after the file was opened
    block = b"x" * (1 << 20)
    with pytest.raises(LowDiskSpace, match="under the 1099511627776 MB reserve"), file:  # noqa: PT012
        for _ in range(200):
            file.write(block)
        file.commit()
    assert os.listdir(tmp_path / "run_1") == []


@pytest.mark.faults
def test_a_storage_directory_that_cannot_be_created_fails_the_run(tmp_path: Path, manager: Any) -> None:
    db = make_source(tmp_path / "source.db")
    (tmp_path / "a file").write_text("not a directory")
    job = make_job(tmp_path, db, run_id="run_1") | {"storage": str(tmp_path / "a file")}
    assert_failed(
        Channel(manager).run(job),
        f"Cannot create the run directory {tmp_path}/a file/run_1: "
        "Not a directory; check that the storage directory (--storage) is writable",
        "StorageError",
    )


@pytest.mark.faults
def test_a_full_disk_fails_the_run_and_names_the_file(tmp_path: Path, manager: Any) -> None:
    db = make_source(tmp_path / "source.db")
    channel = Channel(manager)
    job = make_job(tmp_path, db, schemas=["users", "orders"])
    run_dir = Path(job["run_dir"])
    run_dir.mkdir(parents=True)
    (run_dir / ".orders.jsonl.tmp").symlink_to("/dev/full")  # every write: ENOSPC
    result = channel.run(job)
    assert_failed(
        result,
        f"Cannot write {run_dir}/orders.jsonl: No space left on device; free some space "
        "on the storage volume",
        "StorageError",
    )
    assert [a["artifact_name"] for a in channel.artifacts()] == ["describe.yaml", "users.jsonl"]
    assert sorted(os.listdir(run_dir)) == ["describe.yaml", "users.jsonl"]


@pytest.mark.faults
def test_a_source_file_removed_fails_the_run(tmp_path: Path, manager: Any) -> None:
    db = make_source(tmp_path / "source.db")
    db.unlink()
    assert_failed(
        Channel(manager).run(make_job(tmp_path, db)),
        f"Source database {db} does not exist",
        "SourceUnavailable",
    )
    assert not db.exists()


def test_a_source_file_moved_away_while_it_opens_is_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file gone between the existence check and SQLite's open was a permanent error (no retry)."""
    db = make_source(tmp_path / "source.db")
    connect = sqlite3.connect

    def moved_first(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        if db.exists():  # the moment between the check and the open
            db.rename(tmp_path / "away.db")
        return connect(*args, **kwargs)

    monkeypatch.setattr(sqlite_source.sqlite3, "connect", moved_first)
    with pytest.raises(SourceUnavailable, match="does not exist"):
        open_source(str(db))


def test_a_snapshot_waits_out_a_writers_commit_on_a_rollback_journal_source(tmp_path: Path) -> None:
    """The connection that checks the snapshot's connections share one state did not wait: a
    writer's commit under way (an exclusive lock) failed the run for good ('database is locked')."""
    db = tmp_path / "source.db"
    with contextlib.closing(sqlite3.connect(db)) as con:
        con.executescript("PRAGMA journal_mode = DELETE; CREATE TABLE t (x); INSERT INTO t VALUES (1);")
    source = open_source(str(db))
    writer = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    writer.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(0.5, lambda: writer.execute("COMMIT"))
    release.start()
    try:
        with source, source.snapshot():
            assert source.count("t", None) == 1
    finally:
        release.join()
        writer.close()


def test_a_source_locked_past_the_wait_is_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer holding the source past the busy timeout: worth another attempt, not a permanent error."""
    db = tmp_path / "source.db"
    with contextlib.closing(sqlite3.connect(db)) as con:
        con.executescript("PRAGMA journal_mode = DELETE; CREATE TABLE t (x);")
    writer = sqlite3.connect(db, isolation_level=None)
    writer.execute("BEGIN EXCLUSIVE")
    try:
        connect = sqlite3.connect
        monkeypatch.setattr(
            sqlite_source.sqlite3, "connect", lambda *a, **k: connect(*a, **{**k, "timeout": 0})
        )
        with pytest.raises(SourceUnavailable, match="database is locked"):
            open_source(str(db))
    finally:
        writer.close()


@pytest.mark.faults
def test_files_written_before_a_failure_stay_and_the_half_written_one_goes(
    tmp_path: Path, manager: Any
) -> None:
    # Fails on its 30th row, in the middle of the export: malformed JSON.
    db = run_sql(
        make_source(tmp_path / "source.db"),
        "CREATE VIEW breaks AS SELECT id, json(CASE WHEN id < 30 THEN '1' ELSE '{' END) AS j FROM orders",
    )
    channel = Channel(manager)
    job = make_job(tmp_path, db, schemas=["users", "breaks", "orders"])
    result = channel.run(job)
    assert (
        result["status"] == "failed"
        and result["error"].startswith("Cannot read 'breaks' in ")
        and result["error"].endswith(": malformed JSON")
    )
    assert (result["records_exported"], result["schemas_exported"]) == (4, 1)
    names = [a["artifact_name"] for a in channel.artifacts()]
    assert names == ["describe.yaml", "users.jsonl"]
    assert sorted(os.listdir(job["run_dir"])) == sorted(names)


@pytest.mark.faults
@pytest.mark.parametrize("fault", ["disk full", "source error", "reserve"])
def test_a_failed_run_leaves_no_reference_cycle(tmp_path: Path, manager: Any, fault: str) -> None:
    """A failed run's objects go at once: a cycle would keep the service's queue proxies alive
    until some later garbage collection closes their connection under another run."""
    db = run_sql(
        make_source(tmp_path / "source.db"),
        "CREATE VIEW breaks AS SELECT json(CASE WHEN id < 30 THEN '1' ELSE '{' END) FROM orders",
    )
    job = make_job(tmp_path, db, schemas=["users", "breaks" if fault == "source error" else "orders"])
    if fault == "disk full":
        Path(job["run_dir"]).mkdir(parents=True)
        (Path(job["run_dir"]) / ".orders.jsonl.tmp").symlink_to("/dev/full")
    if fault == "reserve":
        job["min_free_bytes"] = 1 << 60
    channel = Channel(manager)
    gc.collect()
    gc.disable()
    try:
        assert channel.run(job)["status"] == "failed"
        assert [o for o in gc.get_objects() if isinstance(o, Monitor | Export)] == []
    finally:
        gc.enable()


# ---------------------------------------------------------------- cancellation


def wait_for(channel: Channel, predicate: Any, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            message = channel.queue.get(timeout=0.05)
        except queue.Empty:
            continue
        channel.messages.append(message)
        if predicate(message):
            return message
    raise AssertionError("the run never got there")


@pytest.mark.slow
@pytest.mark.faults
def test_cancel_stops_within_two_seconds_in_the_middle_of_a_table(tmp_path: Path, manager: Any) -> None:
    db = make_source(tmp_path / "source.db")
    build_big_table(db, "big", 1_000_000)
    channel = Channel(manager)
    job = make_job(tmp_path, db, schemas=["users", "big", "orders"])
    thread, outcome = channel.run_in_thread(job)

    wait_for(
        channel,
        lambda m: (
            m[0] == "progress"
            and m[2]["progress_detail"]["current_schema"] == "big"
            and m[2]["progress_detail"]["records_exported"] > 4
        ),
    )
    cancelled_at = time.monotonic()
    channel.cancelled[job["run_id"]] = True
    thread.join(10)

    assert time.monotonic() - cancelled_at < 2
    assert outcome == {
        "status": "cancelled",
        "records_exported": 4,
        "schemas_exported": 1,
        "records_total": 1_000_054,
        "error": None,
        "error_detail": None,
    }
    names = [a["artifact_name"] for a in channel.artifacts()]
    assert names == ["describe.yaml", "users.jsonl"]
    assert sorted(os.listdir(job["run_dir"])) == sorted(names) and leftovers(Path(job["run_dir"])) == []


# ---------------------------------------------------------------- one snapshot while the application writes

WRITER = textwrap.dedent("""
    import sqlite3, sys, pathlib
    con = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
    stop = pathlib.Path(sys.argv[2])
    n = 0
    while not stop.exists():
        con.execute("BEGIN IMMEDIATE")
        user = con.execute("INSERT INTO users (name, padding) VALUES ('new', hex(randomblob(50)))").lastrowid
        con.execute("INSERT INTO orders (user_id, total) VALUES (?, 9.99)", (user,))
        con.execute("COMMIT")
        n += 1
    print(n)
""")


@pytest.mark.slow
@pytest.mark.faults
def test_the_export_is_one_snapshot_while_another_process_writes(tmp_path: Path, manager: Any) -> None:
    db = run_sql(
        tmp_path / "shop.db",
        """
        PRAGMA journal_mode = WAL;
        CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT, padding TEXT);
        CREATE TABLE orders (id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL REFERENCES users (id),
                             total REAL);
        WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < 200000)
        INSERT INTO users SELECT i, 'user ' || i, hex(randomblob(50)) FROM s;
        INSERT INTO orders SELECT id, id, id / 100.0 FROM users;
    """,
    )
    stop = tmp_path / "stop"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(db), str(stop)], stdout=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while count_rows(db, "orders") < 200_100 and time.monotonic() < deadline:
            time.sleep(0.05)
        channel = Channel(manager)
        job = make_job(tmp_path, db, schemas=["users", "orders"], include=["data"])
        result = channel.run(job)
    finally:
        stop.touch()
        commits = int(writer.communicate(timeout=30)[0])
    assert result["status"] == "completed", result["error"]
    run_dir = Path(job["run_dir"])
    users = {json.loads(line)["id"] for line in (run_dir / "users.jsonl").read_bytes().splitlines()}
    orders = [json.loads(line)["user_id"] for line in (run_dir / "orders.jsonl").read_bytes().splitlines()]
    assert set(orders) <= users  # no order whose user is missing
    assert len(orders) == len(users) == result["records_total"] // 2 > 200_000
    # The writer went on committing while the run exported: the run saw none of it.
    assert count_rows(db, "orders") == 200_000 + commits > len(orders)


def count_rows(db: Path, table: str) -> int:
    con = sqlite3.connect(db)
    try:
        return con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    finally:
        con.close()


# ---------------------------------------------------------------- progress on a big table


@pytest.mark.slow
def test_progress_on_two_million_rows_climbs_often_and_memory_stays_flat(
    tmp_path: Path, manager: Any
) -> None:
    db = tmp_path / "big.db"
    build_big_table(db, "big", 2_000_000)
    channel = Channel(manager)
    job = make_job(tmp_path, db, compress=True)
    context = multiprocessing.get_context("forkserver")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        future = pool.submit(run_extract, job, channel.queue, channel.cancelled)
        samples = []  # (seconds, progress) as the service would see them
        while not future.done() or not channel.queue.empty():
            try:
                kind, _, payload = channel.queue.get(timeout=0.05)
            except queue.Empty:
                continue
            if kind == "progress":
                samples.append((time.monotonic(), payload["progress"]))
        result = future.result()
        peak_kib = pool.submit(resource.getrusage, resource.RUSAGE_SELF).result().ru_maxrss
    assert result["status"] == "completed" and result["records_exported"] == 2_000_000
    values = [progress for _, progress in samples]
    assert values == sorted(values) and values[-1] == 99
    assert len(set(values)) > 5
    gaps = [later - earlier for (earlier, _), (later, _) in zip(samples, samples[1:], strict=False)]
    assert max(gaps) < 1.5  # refreshed at least once a second
    size = (Path(job["run_dir"]) / "big.jsonl.gz").stat().st_size
    assert size > 5 << 20 and peak_kib < 250 << 10  # flat: far less than the ~120 MB of JSON
