"""Scheduling (with an injected clock, and for real) and the retention sweep."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from helpers import InProcessService, make_shop_db, start_in_process, start_service

from extracts import state
from extracts.runs import Runs
from extracts.schedule import Failures, Scheduler, every, next_run_at
from extracts.storage.local import LocalStorage


def scheduler_at(tmp_path: Path, clock: list[datetime]) -> tuple[Scheduler, Path]:
    db_path = tmp_path / "state.db"
    state.prepare_state_file(db_path)
    db = state.open_database(db_path)
    runs = Runs(db, LocalStorage(tmp_path / "storage"), str(make_shop_db(tmp_path / "shop.db")), 0)
    return Scheduler(db, runs, lambda: clock[0]), db_path


def insert_extract(db_path: Path, extract_id: str, schedule: str, next_run_at: str | None) -> None:
    con = sqlite3.connect(db_path)
    con.execute(
        "INSERT INTO extracts (id, name, schedule, schedule_enabled, next_run_at, created_at, "
        "updated_at) VALUES (?, ?, ?, 1, ?, ?, ?)",
        (
            extract_id,
            extract_id,
            schedule,
            next_run_at,
            "2026-01-01T00:00:00.000Z",
            "2026-01-01T00:00:00.000Z",
        ),
    )
    con.commit()
    con.close()


def runs_of(db_path: Path, extract_id: str) -> list[tuple[str, str]]:
    con = sqlite3.connect(db_path)
    rows = con.execute(
        "SELECT status, triggered_by FROM extract_runs WHERE extract_id = ? ORDER BY created_at",
        (extract_id,),
    ).fetchall()
    con.close()
    return rows


def test_scheduler_with_an_injected_clock(tmp_path: Path) -> None:
    clock = [datetime(2026, 3, 1, 2, 59, 30, tzinfo=UTC)]
    manager, db_path = scheduler_at(tmp_path, clock)

    async def scenario() -> None:
        await manager.db.connect()
        try:
            extract = {"schedule": "0 3 * * *", "schedule_enabled": True, "enabled": True}
            first_due = await next_run_at(extract, clock[0])
            assert first_due == "2026-03-01T03:00:00.000Z"
            insert_extract(db_path, "extract_daily", "0 3 * * *", first_due)
            assert await manager.tick() == []  # 02:59:30: not yet due
            clock[0] = datetime(2026, 3, 1, 3, 0, 1, tzinfo=UTC)
            started = await manager.tick()
            assert len(started) == 1
            assert runs_of(db_path, "extract_daily") == [("queued", "schedule")]
            con = sqlite3.connect(db_path)
            assert con.execute("SELECT next_run_at FROM extracts").fetchone() == ("2026-03-02T03:00:00.000Z",)
            con.close()
            # The next due time comes while the first run is still active: skipped, not queued twice.
            clock[0] = datetime(2026, 3, 2, 3, 0, 0, tzinfo=UTC)
            assert await manager.tick() == []
            assert len(runs_of(db_path, "extract_daily")) == 1
            # After a week of downtime, one run is made up, not seven.
            con = sqlite3.connect(db_path)
            con.execute("UPDATE extract_runs SET status = 'completed'")
            con.commit()
            con.close()
            clock[0] = datetime(2026, 3, 10, 12, 0, 0, tzinfo=UTC)
            assert len(await manager.tick()) == 1
            assert len(await manager.tick()) == 0
            con = sqlite3.connect(db_path)
            assert con.execute("SELECT next_run_at FROM extracts").fetchone() == ("2026-03-11T03:00:00.000Z",)
            con.close()
        finally:
            await manager.db.disconnect()

    asyncio.run(scenario())


def test_a_stored_schedule_croniter_refuses_does_not_stop_the_scheduler(tmp_path: Path) -> None:
    """Saved before today's rules: the tick raised on it, every second, before reaching the others."""
    clock = [datetime(2026, 3, 1, 3, 0, 1, tzinfo=UTC)]
    manager, db_path = scheduler_at(tmp_path, clock)

    async def scenario() -> None:
        await manager.db.connect()
        try:
            insert_extract(db_path, "extract_a_never", "0 0 31 2 *", "2026-03-01T03:00:00.000Z")
            insert_extract(db_path, "extract_b_bogus", "61 * * * * *", "2026-03-01T03:00:00.000Z")
            insert_extract(db_path, "extract_c_daily", "0 3 * * *", "2026-03-01T03:00:00.000Z")
            assert len(await manager.tick()) == 3
            con = sqlite3.connect(db_path)
            assert con.execute("SELECT id, next_run_at FROM extracts ORDER BY id").fetchall() == [
                ("extract_a_never", None),
                ("extract_b_bogus", None),
                ("extract_c_daily", "2026-03-02T03:00:00.000Z"),
            ]
            con.close()
            assert await manager.tick() == []
        finally:
            await manager.db.disconnect()

    asyncio.run(scenario())


@pytest.fixture(scope="module")
def sweeping(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessService]:
    """The app in this process, its retention sweep every second."""
    tmp = tmp_path_factory.mktemp("sweeping")
    svc = start_in_process(tmp, str(make_shop_db(tmp / "shop.db")), "--cleanup-interval", "1")
    yield svc
    svc.stop()


def test_next_run_at_follows_schedule_changes(sweeping: InProcessService) -> None:
    svc = sweeping
    extract = svc.create_extract(name="Sched", schedule="*/5 * * * *", schedule_enabled=True)
    minute = int(extract["next_run_at"][14:16])
    assert minute % 5 == 0 and extract["next_run_at"].endswith(":00.000Z")
    r = svc.client.put(f"/api/data/extracts/{extract['id']}", json={"schedule": "30 4 * * *"})
    assert r.json()["data"]["next_run_at"].endswith("T04:30:00.000Z")
    r = svc.client.put(f"/api/data/extracts/{extract['id']}", json={"enabled": False})
    assert r.json()["data"]["next_run_at"] is None
    r = svc.client.put(f"/api/data/extracts/{extract['id']}", json={"enabled": True})
    assert r.json()["data"]["next_run_at"].endswith("T04:30:00.000Z")


@pytest.mark.slow
def test_a_missed_schedule_runs_once_at_start_on_a_live_server(tmp_path: Path) -> None:
    db = make_shop_db(tmp_path / "shop.db")
    svc = start_service(tmp_path, str(db))
    extract = svc.create_extract(
        name="Nightly", schemas=["users"], schedule="0 3 * * *", schedule_enabled=True
    )
    svc.stop()
    con = sqlite3.connect(svc.db)
    con.execute("UPDATE extracts SET next_run_at = '2020-01-01T03:00:00.000Z'")
    con.commit()
    con.close()
    svc = start_service(tmp_path, str(db), db=svc.db, storage=svc.storage)
    try:
        deadline = time.monotonic() + 30
        runs: list = []
        while time.monotonic() < deadline and not runs:
            runs = svc.client.get(
                "/api/data/extract_runs", params={"filter[where][extract_id]": extract["id"]}
            ).json()["data"]
            time.sleep(0.1)
        assert len(runs) == 1 and runs[0]["triggered_by"] == "schedule"
        assert svc.wait_run(runs[0]["id"])["status"] == "completed"
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")
        current = svc.client.get(f"/api/data/extracts/{extract['id']}").json()["data"]
        assert current["next_run_at"] > now and current["next_run_at"].endswith("T03:00:00.000Z")
    finally:
        svc.stop()


@pytest.mark.slow
def test_expired_artifacts_are_gone_at_once_and_swept(sweeping: InProcessService) -> None:
    svc = sweeping
    extract = svc.create_extract(name="Short-lived", schemas=["users"], retention_days=1)
    run = svc.wait_run(svc.run(extract["id"]))
    artifacts = svc.client.get(
        "/api/data/extract_artifacts", params={"filter[where][run_id]": run["id"]}
    ).json()["data"]
    created = datetime.fromisoformat(artifacts[0]["created_at"].replace("Z", "+00:00"))
    expires = datetime.fromisoformat(artifacts[0]["expires_at"].replace("Z", "+00:00"))
    assert round((expires - created).total_seconds()) == 86400
    keep = svc.wait_run(svc.run(svc.create_extract(name="Kept", schemas=["users"])["id"]))
    con = sqlite3.connect(svc.db)
    con.execute(
        "UPDATE extract_artifacts SET expires_at = '2000-01-01T00:00:00.000Z' WHERE run_id = ?",
        (run["id"],),
    )
    con.commit()
    con.close()
    r = svc.client.get(f"/api/extracts/artifacts/{artifacts[0]['id']}/download")
    assert r.status_code == 410 and r.json()["error_code"] == "GONE"
    assert svc.client.get(f"/api/extracts/runs/{run['id']}/download").status_code == 410
    deadline = time.monotonic() + 10
    swept: list = []
    while time.monotonic() < deadline:  # the sweep removes the files, then marks the rows
        swept = svc.client.get(
            "/api/data/extract_artifacts", params={"filter[where][run_id]": run["id"]}
        ).json()["data"]
        if swept and all(a["deleted_at"] for a in swept):
            break
        time.sleep(0.1)
    assert swept and all(a["deleted_at"] for a in swept)
    assert not (svc.storage / run["id"]).exists()
    assert (svc.storage / keep["id"]).is_dir()
    assert svc.client.get(f"/api/extracts/runs/{keep['id']}/download").status_code == 200


@pytest.mark.slow
def test_after_a_crash_the_start_up_sweep_runs_and_the_dead_instance_is_not_listed(tmp_path: Path) -> None:
    """A SQLite state has one instance. After a kill -9, the dead instance's row was listed by
    /api/instances as live for a lease more, and its leader rows kept the new one from leading:
    the retention sweep at start-up was skipped, the next an hour later (--cleanup-interval)."""
    db = make_shop_db(tmp_path / "shop.db")
    svc = start_service(tmp_path, str(db))
    run = svc.wait_run(svc.run(svc.create_extract(name="Swept", schemas=["users"])["id"]))
    assert run["status"] == "completed"
    svc.stop()
    con = sqlite3.connect(svc.db)
    later = "2999-01-01T00:00:00.000Z"  # as a crashed instance leaves them: not yet lapsed
    con.execute(
        "INSERT INTO extracts_instances (id, host, pid, started_at, heartbeat_at, workers) "
        "VALUES ('instance_dead', 'h', 1, ?, ?, 1)",
        (later, later),
    )
    con.executemany(
        "INSERT INTO extracts_leaders (name, instance_id, expires_at) VALUES (?, 'instance_dead', ?)",
        [("retention sweep", later), ("scheduler", later)],
    )
    con.execute("UPDATE extract_artifacts SET expires_at = '2020-01-01T00:00:00.000Z'")
    con.commit()
    con.close()
    svc = start_service(tmp_path, str(db), db=svc.db, storage=svc.storage)
    try:
        live = svc.client.get("/api/instances").json()["data"]
        assert [i["id"] for i in live] != ["instance_dead"] and len(live) == 1
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (svc.storage / run["id"]).exists():
            time.sleep(0.1)
        assert not (svc.storage / run["id"]).exists()
        artifacts = svc.client.get(
            "/api/data/extract_artifacts", params={"filter[where][run_id]": run["id"]}
        ).json()["data"]
        assert artifacts and all(a["deleted_at"] is not None for a in artifacts)
    finally:
        svc.stop()


def test_a_file_the_sweep_cannot_delete_does_not_hold_back_the_others(sweeping: InProcessService) -> None:
    """One expired file that would not go failed every sweep, and no other expired file was deleted."""
    svc = sweeping
    runs = [
        svc.wait_run(svc.run(svc.create_extract(name=f"Stuck {n}", schemas=["users"])["id"])) for n in (1, 2)
    ]
    stuck = svc.storage / runs[0]["id"] / "describe.yaml"
    stuck.unlink()
    stuck.mkdir()  # unlink() of it fails: a directory now bears its name
    (stuck / "kept").touch()
    with contextlib.closing(sqlite3.connect(svc.db)) as con:
        con.executemany(
            "UPDATE extract_artifacts SET expires_at = '2000-01-01T00:00:00.000Z' WHERE run_id = ?",
            [(run["id"],) for run in runs],
        )
        con.commit()

    def deleted() -> dict[str, bool]:
        params = [{"filter[where][run_id]": run["id"]} for run in runs]
        artifacts = [
            a for p in params for a in svc.client.get("/api/data/extract_artifacts", params=p).json()["data"]
        ]
        return {f"{a['run_id']}/{a['artifact_name']}": a["deleted_at"] is not None for a in artifacts}

    expected = {
        f"{run['id']}/{name}": (run, name) != (runs[0], "describe.yaml")
        for run in runs
        for name in ("describe.yaml", "users.jsonl.gz", "manifest.json")
    }
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and deleted() != expected:
        time.sleep(0.1)
    assert deleted() == expected
    assert not (svc.storage / runs[1]["id"]).exists()
    assert sorted(p.name for p in (svc.storage / runs[0]["id"]).iterdir()) == ["describe.yaml"]


def test_the_sweep_leaves_a_run_directory_made_in_the_last_minute(tmp_path: Path) -> None:
    """A run claimed after the sweep read the active runs lost its new, empty directory, and
    its first file failed."""
    storage = LocalStorage(tmp_path)
    fresh, old, busy = (tmp_path / name for name in ("run_fresh", "run_old", "run_busy"))
    for directory in (fresh, old, busy):
        directory.mkdir()
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    os.utime(busy, (an_hour_ago, an_hour_ago))
    storage.remove_empty_runs(active={"run_busy"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_busy", "run_fresh"]


def test_a_step_that_keeps_failing_logs_its_traceback_once_then_one_line_a_minute(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full state volume fails the scheduler's tick every second: one traceback, not one a second."""
    full = OSError(28, "No space left on device")
    # The same cause with other figures in its message (a time, a pid) is the same cause.
    timed = [RuntimeError(f"state refused in {ms}.2 ms") for ms in (3, 17, 250, 4)]
    outcomes = [full, *timed, OSError(5, "I/O error"), None, full]
    turns: list[object] = []
    stopping = asyncio.Event()

    async def step() -> None:
        turns.append(None)
        if len(turns) == len(outcomes):
            stopping.set()
        outcome = outcomes[len(turns) - 1]
        if outcome is not None:
            raise outcome

    async def main() -> None:
        await every(0.001, step, "scheduler tick", stopping)

    caplog.set_level(logging.INFO, "extracts.schedule")
    asyncio.run(main())
    said = [(r.levelname, r.getMessage(), r.exc_info is not None) for r in caplog.records]
    assert said == [
        ("ERROR", "scheduler tick failed", True),  # the disk full
        ("ERROR", "scheduler tick failed", True),  # the first of four alike
        ("ERROR", "scheduler tick failed", True),  # another cause
        ("WARNING", "scheduler tick works again after 6 failures in a row", False),
        ("ERROR", "scheduler tick failed", True),
    ]

    caplog.clear()
    monkeypatch.setattr(Failures, "REPEAT_EVERY_S", 0.0)
    failures = Failures(logging.getLogger("extracts.schedule"), "heartbeat")
    for _ in range(3):
        failures.failed(OSError(28, "No space left on device"))
    assert [r.getMessage() for r in caplog.records][1:] == [
        "heartbeat still failing (2 times in a row): OSError: [Errno 28] No space left on device",
        "heartbeat still failing (3 times in a row): OSError: [Errno 28] No space left on device",
    ]
