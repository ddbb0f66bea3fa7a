"""Retries (SPEC: Retries): transient failures are retried with a doubling, jittered wait; permanent
ones are not; the chain is rows, so it survives restarts and crashes.

The backoff is checked in-process on a real state file with an injected clock (no sleeping);
each transient cause and each race against a real service and real worker processes. The
permanent causes (a dropped schema, the free-space reserve, read-only storage) are checked
where they fail the run, in tests/test_faults.py.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pymysql
import pytest
from helpers import (
    PG_ADMIN,
    TERMINAL,
    Service,
    make_big_db,
    make_shop_db,
    start_service,
    unique_name,
    worker_writing,
)

from executor.messages import RunStatus, failure, result
from extracts import state
from extracts.runs import INTERRUPTED, Runs
from extracts.storage.local import LocalStorage

# ---------------------------------------------------------------- the policy, in-process


def state_with_extract(tmp_path: Path, **extract: object) -> Path:
    path = tmp_path / "state.db"
    state.prepare_state_file(path)
    con = sqlite3.connect(path)
    values = {"id": "extract_1", "name": "Nightly", "created_at": "t", "updated_at": "t"} | extract
    con.execute(
        f"INSERT INTO extracts ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
        list(values.values()),
    )
    con.commit()
    con.close()
    return path


def chain(path: Path) -> list[dict]:
    con = sqlite3.connect(path)
    con.row_factory = sqlite3.Row
    rows = [
        dict(r)
        for r in con.execute(
            "SELECT id, status, attempt, retry_of, retry_run_id, not_before, triggered_by, error, "
            "error_detail FROM extract_runs ORDER BY attempt"
        )
    ]
    con.close()
    return rows


def test_a_four_attempt_chain_waits_twice_as_long_each_time_within_the_jitter(tmp_path: Path) -> None:
    path = state_with_extract(tmp_path, max_attempts=4, retry_delay_seconds=60)
    clock = [datetime(2026, 6, 1, 12, 0, tzinfo=UTC)]
    jitters = iter([1.0, -1.0, 0.5])  # the ±20 % ends, and between

    async def scenario() -> None:
        db = state.open_database(path)
        await db.connect()
        runs = Runs(
            db, LocalStorage(tmp_path / "storage"), "source.db", 0, lambda: clock[0], lambda: next(jitters)
        )
        try:
            extract = {"id": "extract_1", "name": "Nightly", **FULL_CONFIG}
            assert await runs.queue(extract, state.TriggeredBy.MANUAL)
            for attempt in range(1, 5):
                job = await runs.claim()
                assert job is not None, f"attempt {attempt} did not start"
                cause = failure("Lost the connection to PostgreSQL", "SourceUnavailable", retryable=True)
                await runs.finish(job["run_id"], cause, job["lease"])
                waiting = await runs.next_start()
                if attempt == 4:
                    assert waiting is None
                    break
                assert await runs.claim() is None  # the retry waits its turn
                clock[0] = waiting
        finally:
            await db.disconnect()

    asyncio.run(scenario())
    runs = chain(path)
    assert [r["attempt"] for r in runs] == [1, 2, 3, 4]
    assert [r["triggered_by"] for r in runs] == ["manual", "retry", "retry", "retry"]
    assert [r["status"] for r in runs] == ["failed"] * 4
    assert [r["retry_of"] for r in runs] == [None, *(r["id"] for r in runs[:3])]
    assert [r["retry_run_id"] for r in runs] == [*(r["id"] for r in runs[1:]), None]
    assert [r["error"] for r in runs] == [
        f"Lost the connection to PostgreSQL (attempt {n} of 4)" for n in range(1, 5)
    ]
    # not_before of attempt n+1 is when attempt n failed plus 60 s * 2^(n-1) * (1 + 0.2 * jitter).
    starts = [datetime.fromisoformat(r["not_before"].replace("Z", "+00:00")) for r in runs[1:]]
    waits = [
        starts[0] - datetime(2026, 6, 1, 12, 0, tzinfo=UTC),
        starts[1] - starts[0],
        starts[2] - starts[1],
    ]
    assert waits == [timedelta(seconds=72), timedelta(seconds=96), timedelta(seconds=264)]


FULL_CONFIG = {
    "format": "jsonl",
    "include": ["data"],
    "schemas": None,
    "filter": None,
    "compress": False,
    "split_files": False,
    "split_max_records": 1000,
    "retention_days": 7,
}


@pytest.mark.parametrize(
    "ending",
    [
        "permanent",
        "completed",
        "disabled meanwhile",
        "cancelled meanwhile",
        "attempts lowered meanwhile",
        "attempts lowered while it ran",
    ],
)
def test_only_a_transient_failure_with_attempts_left_is_retried(tmp_path: Path, ending: str) -> None:
    path = state_with_extract(tmp_path, max_attempts=3, retry_delay_seconds=5)
    clock = [datetime(2026, 6, 1, 12, 0, tzinfo=UTC)]

    async def scenario() -> None:
        db = state.open_database(path)
        await db.connect()
        runs = Runs(db, LocalStorage(tmp_path / "storage"), "source.db", 0, lambda: clock[0], lambda: 0.0)
        try:
            await runs.queue({"id": "extract_1", "name": "Nightly", **FULL_CONFIG}, state.TriggeredBy.MANUAL)
            job = await runs.claim()
            if ending == "permanent":
                gone = failure("Schema 'x' no longer exists", "UnknownSchema", retryable=False)
                await runs.finish(job["run_id"], gone, job["lease"])
                return
            if ending == "completed":
                await runs.finish(job["run_id"], result(RunStatus.COMPLETED), job["lease"])
                return
            lost = failure("Lost the connection", "SourceUnavailable", retryable=True)
            await runs.finish(job["run_id"], lost, job["lease"])
            clock[0] += timedelta(seconds=10)
            if ending == "disabled meanwhile":
                await db.execute("UPDATE extracts SET enabled = 0")
                assert await runs.claim() is None  # the retry ends instead of starting
            elif ending == "attempts lowered meanwhile":
                await db.execute("UPDATE extracts SET max_attempts = 1")
                assert await runs.claim() is None  # attempt 2 of a 1-attempt policy: not started
            elif ending == "attempts lowered while it ran":
                job = await runs.claim()
                await db.execute("UPDATE extracts SET max_attempts = 1")
                await runs.finish(job["run_id"], lost, job["lease"])
            else:
                assert await runs.cancel_active("extract_1") is not None
                assert await runs.claim() is None
        finally:
            await db.disconnect()

    asyncio.run(scenario())
    runs = chain(path)
    if ending in ("permanent", "completed"):
        assert len(runs) == 1 and runs[0]["retry_run_id"] is None
        assert runs[0]["status"] == ("failed" if ending == "permanent" else "completed")
        if ending == "permanent":
            assert runs[0]["error"] == "Schema 'x' no longer exists"  # no "(attempt …)": not retryable
        return
    assert len(runs) == 2 and runs[0]["retry_run_id"] == runs[1]["id"]
    if ending == "disabled meanwhile":
        assert runs[1]["status"] == "failed" and "disabled" in runs[1]["error"]
        assert '"retryable":false' in runs[1]["error_detail"]
    elif ending == "attempts lowered meanwhile":
        assert runs[1]["status"] == "failed" and runs[1]["error"] == (
            "The extract's max_attempts was lowered to 1 while this retry (attempt 2) waited: not retried"
        )
        assert '"retryable":false' in runs[1]["error_detail"]
    elif ending == "attempts lowered while it ran":  # its last attempt, never "2 of 1"
        assert runs[1]["status"] == "failed" and runs[1]["error"] == "Lost the connection (attempt 2 of 2)"
    else:
        assert runs[1]["status"] == "cancelled"
    assert runs[1]["retry_run_id"] is None  # the chain ends


# ---------------------------------------------------------------- each transient cause, for real


def runs_of(svc: Service, extract_id: str) -> list[dict]:
    return svc.client.get(
        "/api/data/extract_runs",
        params={"filter[where][extract_id]": extract_id, "filter[order]": "created_at asc"},
    ).json()["data"]


def wait_chain(svc: Service, extract_id: str, timeout: float = 90) -> list[dict]:
    """The extract's runs once the last is ended and no retry waits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = runs_of(svc, extract_id)
        if runs and all(r["status"] in TERMINAL for r in runs) and runs[-1]["retry_run_id"] is None:
            return runs
        time.sleep(0.02)
    raise AssertionError(f"the chain did not end: {[(r['status'], r['error']) for r in runs]}")


BIG_ROWS = 150_000  # a quarter of a second of writing (gzip'd): time enough to kill its worker or service


@pytest.fixture(scope="module")
def big_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_big_db(tmp_path_factory.mktemp("retries") / "big.db", BIG_ROWS)


@pytest.mark.slow
def test_a_killed_worker_is_retried_and_the_retry_completes(tmp_path: Path, big_db: Path) -> None:
    svc = start_service(tmp_path, str(big_db), "--workers", "1")
    try:
        extract = svc.create_extract(name="Killed", schemas=["big"], retry_delay_seconds=1)
        first = svc.run(extract["id"])
        os.kill(worker_writing(svc.storage, first), signal.SIGKILL)
        runs = wait_chain(svc, extract["id"])
        assert [(r["status"], r["attempt"], r["triggered_by"]) for r in runs] == [
            ("failed", 1, "manual"),
            ("completed", 2, "retry"),
        ]
        assert runs[0]["error_detail"]["retryable"] is True and runs[0]["error"].endswith("(attempt 1 of 3)")
        assert runs[1]["retry_of"] == first and runs[0]["retry_run_id"] == runs[1]["id"]
        assert runs[1]["records_exported"] == BIG_ROWS
        assert svc.client.get(f"/api/extracts/runs/{runs[1]['id']}/download").status_code == 200
    finally:
        svc.stop()


@pytest.mark.slow
def test_a_lost_source_connection_is_retried(tmp_path: Path) -> None:
    """pg_terminate_backend on the run's connection, mid-table: the retry reads it all."""
    name = unique_name("extracts_retry")
    admin = psycopg.connect(PG_ADMIN, autocommit=True)
    admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{name}", autocommit=True) as con:
            con.execute(
                "CREATE TABLE big AS "
                "SELECT g AS id, repeat('x', 200) AS pad FROM generate_series(1, 400000) g"
            )
        svc = start_service(tmp_path, f"postgresql://postgres@127.0.0.1:5432/{name}", "--workers", "1")
        try:
            extract = svc.create_extract(
                name="Terminated", schemas=["big"], compress=False, retry_delay_seconds=1
            )
            first = svc.run(extract["id"])
            worker_writing(svc.storage, first)
            killed = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                "AND application_name = 'extracts' AND state <> 'idle'",
                (name,),
            ).fetchall()
            assert killed, "no export connection to terminate"
            runs = wait_chain(svc, extract["id"])
            assert [r["status"] for r in runs] == ["failed", "completed"], [r["error"] for r in runs]
            assert "Lost the connection to PostgreSQL" in runs[0]["error"]
            assert runs[1]["records_exported"] == 400_000
        finally:
            svc.stop()
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.mark.slow
@pytest.mark.parametrize("server", ["postgresql", "mysql"])
def test_a_connection_refused_for_want_of_a_privilege_is_a_permission_error(
    tmp_path: Path, server: str
) -> None:
    """The database's CONNECT (PostgreSQL) or every grant on it (MariaDB) revoked between runs:
    a permission error, not retried (SPEC: Retries), unlike a server that is unreachable."""
    name, user = unique_name("extracts_denied"), unique_name("extracts_reader")
    if server == "postgresql":
        admin = psycopg.connect(PG_ADMIN, autocommit=True)
        run_sql, url = admin.execute, f"postgresql://{user}@127.0.0.1:5432/{name}"
        setup = [f'CREATE DATABASE "{name}"', f'CREATE ROLE "{user}" LOGIN IN ROLE pg_read_all_data']
        revoke = f'REVOKE CONNECT ON DATABASE "{name}" FROM PUBLIC'
        grant = f'GRANT CONNECT ON DATABASE "{name}" TO PUBLIC'
        teardown = [f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'DROP ROLE IF EXISTS "{user}"']

        def make_table() -> None:
            with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{name}", autocommit=True) as con:
                con.execute("CREATE TABLE t (id integer)")
    else:
        admin = pymysql.connect(host="127.0.0.1", user="root", password="", autocommit=True)
        run_sql, url = admin.cursor().execute, f"mysql://{user}:pw@127.0.0.1:3306/{name}"
        setup = [f"CREATE DATABASE `{name}`", f"CREATE USER '{user}'@'%' IDENTIFIED BY 'pw'"]
        revoke = f"REVOKE SELECT ON `{name}`.* FROM '{user}'@'%'"
        grant = f"GRANT SELECT ON `{name}`.* TO '{user}'@'%'"
        teardown = [f"DROP DATABASE IF EXISTS `{name}`", f"DROP USER IF EXISTS '{user}'@'%'"]

        def make_table() -> None:
            run_sql(f"CREATE TABLE `{name}`.t (id integer)")

    try:
        for statement in setup:
            run_sql(statement)
        make_table()
        run_sql(grant)
        svc = start_service(tmp_path, url, "--workers", "1")
        try:
            extract = svc.create_extract(name="Denied", schemas=["t"], retry_delay_seconds=1)
            run_sql(revoke)
            svc.run(extract["id"])
            runs = wait_chain(svc, extract["id"])
            assert [r["status"] for r in runs] == ["failed"], [r["error"] for r in runs]
            assert runs[0]["error_detail"]["retryable"] is False and runs[0]["retry_run_id"] is None
            assert "denied" in runs[0]["error"] and "(attempt" not in runs[0]["error"]
            run_sql(grant)
            assert svc.wait_run(svc.run(extract["id"]))["status"] == "completed"
        finally:
            svc.stop()
    finally:
        for statement in teardown:
            run_sql(statement)
        admin.close()


@pytest.mark.slow
def test_the_service_killed_mid_run_retries_the_interrupted_run_exactly_once(
    tmp_path: Path, big_db: Path
) -> None:
    svc = start_service(tmp_path, str(big_db), "--workers", "1")
    extract = svc.create_extract(name="Crashed", schemas=["big"], retry_delay_seconds=1)
    first = svc.run(extract["id"])
    worker_writing(svc.storage, first)
    svc.stop(signal.SIGKILL)
    for _ in range(2):  # a second restart must not retry the same run again
        svc = start_service(tmp_path, str(big_db), "--workers", "1", db=svc.db, storage=svc.storage)
        try:
            runs = wait_chain(svc, extract["id"])
        finally:
            svc.stop()
    assert [(r["status"], r["attempt"]) for r in runs] == [("failed", 1), ("completed", 2)]
    assert runs[0]["error"] == f"{INTERRUPTED} (attempt 1 of 3)"


@pytest.mark.slow
def test_a_run_request_while_a_retry_waits_starts_it_and_cancel_ends_the_chain(tmp_path: Path) -> None:
    db = make_shop_db(tmp_path / "shop.db")
    svc = start_service(tmp_path, str(db))
    try:
        extract = svc.create_extract(name="Waiting", schemas=["users"], retry_delay_seconds=3600)
        db.rename(tmp_path / "away.db")  # the source is gone: transient
        first = svc.run(extract["id"])
        deadline = time.monotonic() + 30
        while len(runs := runs_of(svc, extract["id"])) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert runs[0]["status"] == "failed" and runs[1]["status"] == "queued"
        retry = runs[1]
        assert retry["not_before"] > runs[0]["completed_at"]
        (tmp_path / "away.db").rename(db)
        r = svc.client.post(f"/api/extracts/{extract['id']}/run")  # starts the waiting retry, no new run
        status_url = f"/api/data/extract_runs/{retry['id']}"
        assert r.status_code == 202 and r.headers["location"] == status_url, r.text
        assert r.json() == {  # SPEC (Running): the body of every 202, this one too
            "success": True,
            "data": {
                "run_id": retry["id"],
                "message": "Extract queued for execution",
                "status_url": status_url,
            },
        }
        assert svc.wait_run(retry["id"])["status"] == "completed"
        assert [r["id"] for r in runs_of(svc, extract["id"])] == [first, retry["id"]]
        # Cancel during a wait ends the chain.
        db.rename(tmp_path / "away.db")
        third = svc.run(extract["id"])
        while len(runs_of(svc, extract["id"])) < 4 and time.monotonic() < deadline + 30:
            time.sleep(0.05)
        r = svc.client.post(f"/api/extracts/{extract['id']}/cancel")
        assert r.status_code == 200 and r.json()["data"]["run_id"] != third
        (tmp_path / "away.db").rename(db)
        runs = wait_chain(svc, extract["id"])
        assert [r["status"] for r in runs] == ["failed", "completed", "failed", "cancelled"]
    finally:
        svc.stop()


@pytest.mark.slow
def test_a_service_killed_around_failures_loses_and_doubles_no_retry(tmp_path: Path) -> None:
    """SIGKILL at seeded random moments while runs fail and retry: each failure with attempts left
    has exactly one retry, every retry its failure, no chain runs past max_attempts."""
    chance = random.Random(20261130)
    db = make_shop_db(tmp_path / "shop.db")
    away = tmp_path / "away.db"
    svc = start_service(tmp_path, str(db))
    extract = svc.create_extract(name="Crashing", schemas=["users"], max_attempts=10, retry_delay_seconds=1)
    db.rename(away)  # every attempt fails at once, transiently (the source is gone)
    svc.run(extract["id"])
    for _ in range(4):
        time.sleep(chance.uniform(0.5, 2.0))
        svc.stop(signal.SIGKILL)
        away.rename(db)  # start-up opens the source once
        svc = start_service(tmp_path, str(db), db=svc.db, storage=svc.storage)
        db.rename(away)
    try:
        runs = runs_of(svc, extract["id"])
    finally:
        svc.stop()
    assert 2 <= len(runs) <= 10
    by_id = {r["id"]: r for r in runs}
    for run in runs:
        if run["status"] == "failed" and run["attempt"] < 10:
            assert run["retry_run_id"] in by_id, run  # recorded with its failure
            assert by_id[run["retry_run_id"]]["retry_of"] == run["id"]
        if run["retry_of"] is not None:
            assert by_id[run["retry_of"]]["retry_run_id"] == run["id"]
    assert sorted(r["attempt"] for r in runs) == list(range(1, len(runs) + 1))
