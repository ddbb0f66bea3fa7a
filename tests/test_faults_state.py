"""A state file locked by another process (SPEC: Snapshot, safety and faults): requests wait out
the busy timeout and then get a 503, runs and the dispatcher carry on, no message is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    TOKEN,
    Api,
    assert_files_match,
    http_client,
    make_big_db,
    make_shop_db,
    start_in_process,
    start_service,
    state_locked,
    tmpfs,
    wait_for,
    worker_writing,
)

from extracts import state

pytestmark = pytest.mark.faults


# ---------------------------------------------------------------- a locked state file


def mixed_requests(svc: Api, extract_id: str, **also: Callable) -> list[tuple[str, int, dict]]:
    """One of each kind of request (and ``also``'s), from threads at once; (what, status, body) each."""
    calls = also | {
        "create": lambda c: c.post("/api/data/extracts", json={"name": "During the lock"}),
        "update": lambda c: c.put(f"/api/data/extracts/{extract_id}", json={"description": "x"}),
        "list": lambda c: c.get("/api/data/extracts"),
        "get": lambda c: c.get(f"/api/data/extracts/{extract_id}"),
        "runs": lambda c: c.get("/api/data/extract_runs"),
        "describe": lambda c: c.get("/api/describe"),
    }
    results: list[tuple[str, int, dict]] = []

    def call(what: str) -> None:
        with http_client(
            base_url=svc.base_url, timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}
        ) as client:
            r = calls[what](client)
            results.append((what, r.status_code, r.json()))

    threads = [threading.Thread(target=call, args=(what,)) for what in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.slow
def test_state_file_locked_for_seconds_requests_wait_and_succeed(tmp_path: Path) -> None:
    svc = start_in_process(tmp_path, str(make_shop_db(tmp_path / "shop.db")))
    try:
        extract = svc.create_extract(name="Locked", schemas=["users"])
        with state_locked(svc.db, 3):
            started = time.monotonic()
            results = mixed_requests(svc, extract["id"])
            r = svc.client.post(f"/api/extracts/{extract['id']}/run")
            run_id = r.json()["data"]["run_id"] if r.status_code == 202 else None
            assert time.monotonic() - started > 2  # the writes did wait for the lock
        for what, status, body in results:
            assert status < 300, (what, status, body)
        assert run_id is not None, r.text
        assert svc.wait_run(run_id)["status"] == "completed"
        assert "database is locked" not in svc.output()
    finally:
        svc.stop()


@pytest.mark.slow
def test_state_file_locked_past_the_busy_timeout_is_a_503_and_nothing_is_stuck(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The service's 15 s, shortened: the same waits, then the same 503s, in seconds.
    monkeypatch.setattr(state, "BUSY_TIMEOUT_S", 2.0)
    source = make_big_db(tmp_path / "source.db", 300_000)
    svc = start_in_process(tmp_path, str(source))
    try:
        extract = svc.create_extract(name="Locked long", schemas=["big"], compress=False)
        small = svc.create_extract(name="Queued during the lock", schemas=["small"])
        run_id = svc.run(extract["id"])
        worker_writing(svc.storage, run_id)
        with state_locked(svc.db, 30):  # released once the requests have given up
            manifest = svc.storage / run_id / "manifest.json"
            wait_for(manifest.exists, what="the run finishing while the lock is held")
            results = mixed_requests(
                svc, extract["id"], run=lambda c: c.post(f"/api/extracts/{small['id']}/run")
            )
        for what, status, body in results:
            assert status < 300 or (status == 503 and body["error_code"] == "SERVICE_UNAVAILABLE"), (
                what,
                status,
                body,
            )
        assert any(status == 503 for _, status, _ in results), results  # the writes gave up
        ran = next(body for what, _, body in results if what == "run")
        run = svc.wait_run(run_id, timeout=30)
        assert run["status"] == "completed" and run["records_exported"] == 300_000, run
        assert_files_match(svc, run_id)
        assert run["artifacts_created"] == 3
        # The dispatcher survived: new runs still start and finish.
        queued = ran["data"]["run_id"] if ran["success"] else svc.run(small["id"])
        assert svc.wait_run(queued)["status"] == "completed"
        assert svc.wait_run(svc.run(extract["id"]))["status"] == "completed"
        assert "INTERNAL_ERROR" not in str(results)
    finally:
        svc.stop()


@pytest.mark.slow
def test_a_stop_while_another_process_holds_the_state_ends_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM while another process held the state file past the busy timeout: the stop's
    requeue failed, the app's stop ended on a traceback ("Application shutdown failed") and
    skipped closing the state. It now says in one line that the run stays for the next start,
    writes nothing more, and ends; the next start fails the run as interrupted and retries it."""
    from extracts import pool

    monkeypatch.setattr(state, "BUSY_TIMEOUT_S", 1.0)
    monkeypatch.setattr(pool, "DRAIN_TIMEOUT_S", 2.0)  # the stop's wait for the last messages
    source = make_big_db(tmp_path / "source.db", 300_000)
    # Idle, it has nothing to write: the stop reads that no run is its own, and ends at once.
    idle = start_in_process(tmp_path / "idle", str(source))
    with state_locked(idle.db, 30):
        started = time.monotonic()
        idle.stop()
        assert time.monotonic() - started < 2 and "Traceback" not in idle.output(), idle.output()
    svc = start_in_process(tmp_path / "one", str(source))
    extract = svc.create_extract(
        name="Stopped while locked", schemas=["big"], compress=False, retry_delay_seconds=1
    )
    run_id = svc.run(extract["id"])
    worker_writing(svc.storage, run_id)
    with state_locked(svc.db, 30):
        started = time.monotonic()
        svc.stop()
        took = time.monotonic() - started
    log = svc.output()
    assert took < 8, took
    assert "could not put the active runs back in the queue, the state stayed busy" in log, log
    assert "Application shutdown failed" not in log and "Traceback" not in log, log
    again = start_in_process(tmp_path / "two", str(source), db=svc.db, storage=svc.storage)
    try:
        run = again.client.get(f"/api/data/extract_runs/{run_id}").json()["data"]
        assert run["status"] == "failed" and "interrupted" in run["error"], run
        assert again.wait_run(run["retry_run_id"], timeout=60)["status"] == "completed"
    finally:
        again.stop()


def fill(path: Path) -> None:
    """Write ``path`` until its volume has no byte left."""
    with path.open("wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)


@pytest.mark.slow
def test_a_full_state_volume_is_a_busy_state(tmp_path: Path) -> None:
    """The SQLite state's volume full ("database or disk is full") was no busy state, where
    PostgreSQL's full disk is one: every write request got a 500, and the run's messages were
    dropped (files without their artifact rows, the run let go to the reaper). Now a request
    gets a 503 to retry, and the messages are applied again once there is room."""
    source = make_big_db(tmp_path / "source.db", 300_000)
    with tmpfs(tmp_path / "volume", 1) as volume:
        svc = start_in_process(tmp_path, str(source), db=volume / "extracts.db")
        try:
            extract = svc.create_extract(name="Full", schemas=["big", "small"], compress=False)
            run_id = svc.run(extract["id"])
            worker_writing(svc.storage, run_id)
            fill(volume / "filler")
            for i in range(200):  # the WAL file's free frames go first
                answer = svc.client.post(
                    "/api/data/extracts", json={"name": f"n{i}", "description": "x" * 4000}
                )
                if answer.status_code != 201:
                    break
            assert answer.status_code == 503 and "retry" in answer.json()["error"], answer.text
            time.sleep(1)  # the run's messages meet the full volume too
            (volume / "filler").unlink()
            run = svc.wait_run(run_id)
            assert run["status"] == "completed" and run["records_exported"] == 300_001, run
            assert_files_match(svc, run_id)
            assert run["artifacts_created"] == 4 == len(svc.artifacts(run_id))  # describe, 2 tables, manifest
            assert "unhandled" not in svc.output() and "could not" not in svc.output(), svc.output()
        finally:
            svc.stop()


# ---------------------------------------------------------------- a locked state file, in-process


class LockedTwice:
    """A real state database whose first two statements find the file locked."""

    def __init__(self, db: Any) -> None:
        self.db, self.failures = db, 2
        self.statements: list[str] = []

    async def _locked_twice(self, sql: str) -> None:
        if self.failures:
            self.failures -= 1
            raise sqlite3.OperationalError("database is locked")
        self.statements.append(sql)

    async def execute(self, sql: str, values: dict | None = None) -> Any:
        await self._locked_twice(sql)
        return await self.db.execute(sql, values)

    async def fetch_one(self, sql: str, values: dict | None = None) -> Any:
        await self._locked_twice(sql)
        return await self.db.fetch_one(sql, values)

    def __getattr__(self, name: str) -> Any:  # fetch_all, fetch_val, transaction: as they are
        return getattr(self.db, name)


def state_with_running_run(tmp_path: Path) -> Path:
    from extracts import state

    path = tmp_path / "state.db"
    state.prepare_state_file(path)
    con = sqlite3.connect(path)
    con.execute("INSERT INTO extracts (id, name, created_at, updated_at) VALUES ('extract_x', 'X', 't', 't')")
    con.execute(
        "INSERT INTO extract_runs (id, extract_id, extract_name, status, progress_detail, config_snapshot, "
        "created_at, updated_at, started_at) VALUES ('run_x', 'extract_x', 'X', 'running', '{}', '{}', "
        "'2026-01-01T00:00:00.000Z', 't', '2026-01-01T00:00:00.000Z')"
    )
    con.commit()
    con.close()
    return path


def test_a_run_message_that_meets_a_locked_state_file_is_applied_later(tmp_path: Path) -> None:
    """Past the busy timeout the message was dropped: a lost result left its run 'running' forever."""

    from executor.messages import RunStatus, result
    from extracts import state
    from extracts.pool import WorkerPool
    from extracts.runs import Runs
    from extracts.storage.local import LocalStorage

    path = state_with_running_run(tmp_path)

    async def scenario() -> WorkerPool:
        db = state.open_database(path)
        await db.connect()
        try:
            storage = LocalStorage(tmp_path)
            pool = WorkerPool(Runs(LockedTwice(db), storage, "source.db", 0), storage, 1)
            pool.retry_delay = 0.01
            pool._inflight["run_x"] = 1
            pool._jobs["run_x"] = {"run_id": "run_x", "lease": None}  # type: ignore[typeddict-item]
            await pool._apply(pool._on_result, "result", "run_x", result(RunStatus.COMPLETED))
            return pool
        finally:
            await db.disconnect()

    pool = asyncio.run(scenario())
    assert pool.runs.db.failures == 0 and "run_x" not in pool._inflight
    con = sqlite3.connect(path)
    assert con.execute("SELECT status, progress FROM extract_runs").fetchall() == [("completed", 100)]
    con.close()


def test_the_dispatcher_survives_a_locked_state_file(tmp_path: Path) -> None:
    """It used to die on the first locked claim: no run was ever started again."""

    from extracts import state
    from extracts.pool import WorkerPool
    from extracts.runs import Runs
    from extracts.storage.local import LocalStorage

    path = state_with_running_run(tmp_path)

    async def scenario() -> tuple[LockedTwice, bool]:
        real = state.open_database(path)
        await real.connect()
        db = LockedTwice(real)
        storage = LocalStorage(tmp_path)
        pool = WorkerPool(Runs(db, storage, "source.db", 0), storage, 1)
        pool.retry_delay = 0.01
        task = asyncio.create_task(pool._dispatch())
        pool.runs.queued.set()
        for _ in range(200):
            if db.statements:
                break
            await asyncio.sleep(0.01)
        alive = not task.done()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await real.disconnect()
        return db, alive

    db, alive = asyncio.run(scenario())
    assert alive and len(db.statements) == 1 and "status = 'running'" in db.statements[0]


# ---------------------------------------------------------------- a run's ending that cannot be applied


@pytest.mark.slow
def test_a_run_whose_ending_the_state_refuses_is_let_go_and_reaped(tmp_path: Path) -> None:
    """The state refuses a run's ending with an error that is not a busy one (here a trigger):
    the pool lets go of the run, its lease lapses, and the reaper fails it as interrupted; the
    worker slot is free again (one worker) and the next run completes."""
    svc = start_service(
        tmp_path, str(make_shop_db(tmp_path / "shop.db")), "--lease-seconds", "2", "--workers", "1"
    )
    try:
        extract = svc.create_extract(name="Refused", schemas=["users"], max_attempts=1)
        with contextlib.closing(sqlite3.connect(svc.db)) as con, con:
            con.execute(
                "CREATE TRIGGER refuse_completion BEFORE UPDATE OF status ON extract_runs "
                "WHEN NEW.status = 'completed' BEGIN SELECT RAISE(ABORT, 'refused by a test trigger'); END"
            )
        failed = svc.wait_run(svc.run(extract["id"]), timeout=30)
        assert failed["status"] == "failed" and failed["error"].startswith("interrupted"), failed
        assert "refused by a test trigger" in svc.output()
        with contextlib.closing(sqlite3.connect(svc.db)) as con, con:
            con.execute("DROP TRIGGER refuse_completion")
        assert svc.wait_run(svc.run(extract["id"]), timeout=30)["status"] == "completed"
    finally:
        svc.stop()
