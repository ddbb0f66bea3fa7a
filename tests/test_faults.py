"""Processes dying and stopping (SPEC: Snapshot, safety and faults): nothing lost, nothing stuck.

Workers SIGKILLed mid-run, the service ``kill -9``ed and restarted, SIGTERM at any moment
(after a cancel, while a finished run waits on a locked state file). Every test checks that
every run reaches a terminal state with a clear message, that the service answers all along,
and that the next run works. Storage and source faults are in test_faults_storage.py, a
locked state file in test_faults_state.py; run them all alone with ``pytest -m faults``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import (
    TERMINAL,
    TOKEN,
    Api,
    Prober,
    Service,
    alive,
    assert_files_match,
    descendants,
    make_big_db,
    make_shop_db,
    manager_pid,
    no_temporary_files,
    start_in_process,
    start_service,
    state_locked,
    wait_for,
    worker_writing,
)

pytestmark = pytest.mark.faults

BIG_ROWS = 200_000  # a run of these (about half a second) lasts long enough to be caught writing
KILLED = "the worker process running this extract died (killed by SIGKILL)"
INNOCENT = "stopped because another run's worker process died"
INTERRUPTED = "interrupted: the service stopped while this run was running"


# ---------------------------------------------------------------- helpers


@contextlib.contextmanager
def frozen_until_the_end(svc: Service) -> Iterator[list[int]]:
    """The pids a test freezes (SIGSTOP): thawed when it ends, however it ends; then the service stops."""
    frozen: list[int] = []
    try:
        yield frozen
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        svc.stop()


def artifacts_of(service: Api, run_id: str) -> list[dict]:
    return service.client.get(
        "/api/data/extract_artifacts", params={"filter[where][run_id]": run_id, "filter[limit]": "1000"}
    ).json()["data"]


@pytest.fixture(scope="module")
def big_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_big_db(tmp_path_factory.mktemp("faults-source") / "big.db", BIG_ROWS)


# ---------------------------------------------------------------- dying workers


@pytest.mark.slow
def test_worker_sigkilled_ten_times_with_other_runs_in_flight(tmp_path: Path, big_db: Path) -> None:
    svc = start_service(tmp_path, str(big_db))  # 2 workers
    try:
        # One attempt each: what the pool does to its runs, not the retries (tests/test_retries.py).
        victim = svc.create_extract(name="Victim", schemas=["big"], compress=False, max_attempts=1)
        bystander = svc.create_extract(name="Bystander", schemas=["big"], compress=False, max_attempts=1)
        waiting = svc.create_extract(name="Waiting", schemas=["small"])
        endings: list[float] = []  # seconds from the kill until all three runs ended
        # Every 10 ms: the ten rounds take a few seconds, and the bound below wants 100 answers.
        with Prober(svc, every=0.01) as prober:
            for round_ in range(10):
                runs = {
                    "victim": svc.run(victim["id"]),
                    "bystander": svc.run(bystander["id"]),
                    "waiting": svc.run(waiting["id"]),
                }
                pid = worker_writing(svc.storage, runs["victim"])
                # A file finished just before the kill whose artifact message died with the worker.
                (svc.storage / runs["victim"] / "finished-unrecorded.jsonl").write_bytes(b"{}\n")
                os.kill(pid, signal.SIGKILL)
                killed_at = time.monotonic()
                # As long as the bound on endings below: on a busy machine a full export takes a while.
                done = {name: svc.wait_run(run_id, timeout=60) for name, run_id in runs.items()}
                endings.append(time.monotonic() - killed_at)
                assert done["victim"]["status"] == "failed", (round_, done["victim"])
                assert done["victim"]["error"].startswith(KILLED), done["victim"]["error"]
                for name in ("bystander", "waiting"):
                    run = done[name]
                    assert run["status"] == "completed" or (
                        run["status"] == "failed" and run["error"].startswith(INNOCENT)
                    ), (round_, name, run["error"])
                for run_id in runs.values():
                    assert_files_match(svc, run_id)
        assert prober.problems == [], prober.problems[:10]
        assert prober.requests > 100 and prober.slowest < 15, (prober.requests, prober.slowest)
        # Within seconds (a shared two-core machine: the bystander and the queued run may
        # complete a full export after the kill).
        assert sorted(endings)[5] < 20 and max(endings) < 60, endings
        assert no_temporary_files(svc.storage) == []
        runs = svc.client.get("/api/data/extract_runs", params={"filter[limit]": "1000"}).json()["data"]
        assert len(runs) == 30 and all(r["status"] in TERMINAL for r in runs)
        victim_counts = svc.client.get(f"/api/data/extracts/{victim['id']}").json()["data"]
        assert (victim_counts["failed_runs"], victim_counts["total_runs"]) == (10, 10)
        # After all that, the pool works.
        assert svc.wait_run(svc.run(waiting["id"]))["status"] == "completed"
    finally:
        svc.stop()


@pytest.mark.slow
def test_a_worker_sigtermed_from_outside_is_not_blamed_on_another_run(tmp_path: Path, big_db: Path) -> None:
    """The pool stops its other workers with SIGTERM, so a worker killed by SIGTERM was always
    taken for a bystander: the only run of a one-worker service failed "because another run's
    worker process died"."""
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    svc = start_service(tmp_path / "one", str(big_db), "--workers", "1")
    try:
        extract = svc.create_extract(name="Alone", schemas=["big"], compress=False, max_attempts=1)
        run_id = svc.run(extract["id"])
        os.kill(worker_writing(svc.storage, run_id), signal.SIGTERM)
        run = svc.wait_run(run_id)
        assert run["error"].startswith("the worker process running this extract died (killed by SIGTERM)")
        assert run["error_detail"]["retryable"] is True
    finally:
        svc.stop()
    svc = start_service(tmp_path / "two", str(big_db))  # 2 workers
    try:
        extracts = [
            svc.create_extract(name=name, schemas=["big"], compress=False, max_attempts=1)
            for name in ("Victim", "Bystander")
        ]
        victim, bystander = (svc.run(extract["id"]) for extract in extracts)
        held = worker_writing(svc.storage, bystander)
        os.kill(held, signal.SIGSTOP)  # still running when the pool stops it
        os.kill(worker_writing(svc.storage, victim), signal.SIGTERM)
        wait_for(lambda: signal_pending(held, signal.SIGTERM), what="the pool stopping the bystander")
        os.kill(held, signal.SIGCONT)
        for run_id in (victim, bystander):  # both ended by SIGTERM: which one was sent it, none can tell
            error = svc.wait_run(run_id)["error"]
            assert error.startswith(
                "the worker process running this extract, or another run's, was killed by SIGTERM"
            )
        assert svc.wait_run(svc.run(extracts[0]["id"]))["status"] == "completed"
    finally:
        svc.stop()


def test_a_job_its_worker_cannot_even_start_fails_with_why(tmp_path: Path, shop_db: Path) -> None:
    """An exception that escapes the worker's job (here a run whose stored configuration is not an
    object) fails that run with its message, behind the worker's own messages; the pool goes on."""
    svc = start_service(tmp_path, str(shop_db), "--workers", "1")
    try:
        broken = svc.create_extract(name="Unreadable", schemas=["users"])
        other = svc.create_extract(name="Fine", schemas=["users"])
        with contextlib.closing(sqlite3.connect(svc.db)) as con, con:
            long_ago = "'2000-01-01T00:00:00.000Z'"
            con.execute(
                "INSERT INTO extract_runs (id, extract_id, extract_name, status, progress, progress_detail, "
                "config_snapshot, created_at, updated_at) SELECT 'run_unreadable0000', id, name, 'queued', "
                f"0, '{{}}', '[]', {long_ago}, {long_ago} FROM extracts WHERE id = ?",
                (broken["id"],),
            )
        fine = svc.run(other["id"])  # wakes the dispatcher, which takes the older run first
        failed = svc.wait_run("run_unreadable0000")
        assert failed["status"] == "failed", failed
        assert failed["error"].startswith("the worker could not run this extract:"), failed["error"]
        assert svc.wait_run(fine)["status"] == "completed"
    finally:
        svc.stop()


@pytest.mark.slow
def test_a_running_run_no_worker_holds_loses_its_lease_and_is_retried(tmp_path: Path, shop_db: Path) -> None:
    """A run left 'running' by its instance with no worker holding it (a message that could not
    be applied): the heartbeat renews only the runs its workers hold, so the lease lapses and
    the reaper fails it as interrupted, and its retry completes."""
    svc = start_service(tmp_path, str(shop_db), "--lease-seconds", "2")
    try:
        extract = svc.create_extract(name="Forgotten", schemas=["users"], retry_delay_seconds=1)
        done = svc.wait_run(svc.run(extract["id"]))
        me = svc.client.get("/api/instances").json()["data"][0]["id"]
        now = "strftime('%Y-%m-%dT%H:%M:%fZ')"
        with sqlite3.connect(svc.db) as con:  # as a claim whose job never reached the pool
            con.execute(
                "INSERT INTO extract_runs (id, extract_id, extract_name, status, progress, progress_detail, "
                "config_snapshot, created_at, updated_at, started_at, instance_id, lease_token, "
                f"lease_expires_at) SELECT 'run_forgotten00000', extract_id, extract_name, 'running', 0, "
                f"progress_detail, config_snapshot, {now}, {now}, {now}, ?, 'token', "
                "strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '+2 seconds') FROM extract_runs WHERE id = ?",
                (me, done["id"]),
            )
        failed = svc.wait_run("run_forgotten00000", timeout=20)
        assert failed["status"] == "failed" and failed["error"].startswith(INTERRUPTED), failed
        assert svc.wait_run(failed["retry_run_id"], timeout=30)["status"] == "completed"
    finally:
        svc.stop()


@pytest.mark.slow
def test_a_worker_silent_for_a_lease_is_killed_and_its_run_fails(tmp_path: Path, big_db: Path) -> None:
    """A worker frozen (SIGSTOP) for less than a lease finishes its run; one frozen for longer is
    killed, and its run fails with why, instead of staying 'running' while its instance renews
    the lease."""
    svc = start_service(tmp_path, str(big_db), "--lease-seconds", "5")
    with frozen_until_the_end(svc) as frozen:
        extract = svc.create_extract(name="Frozen worker", schemas=["big"], compress=False, max_attempts=1)
        paused = svc.run(extract["id"])
        frozen.append(worker_writing(svc.storage, paused))
        os.kill(frozen[-1], signal.SIGSTOP)
        time.sleep(2)
        os.kill(frozen[-1], signal.SIGCONT)
        assert svc.wait_run(paused)["status"] == "completed"

        run_id = svc.run(extract["id"])
        frozen.append(worker_writing(svc.storage, run_id))
        os.kill(frozen[-1], signal.SIGSTOP)
        stopped = time.monotonic()
        failed = svc.wait_run(run_id, timeout=30)
        waited = time.monotonic() - stopped
        assert failed["status"] == "failed" and "stopped answering for" in failed["error"], failed
        assert failed["error_detail"]["retryable"] is True
        assert 4 <= waited < 12, waited  # silence counts from its last message, up to 1 s before
        assert not alive(frozen[-1])
        assert_files_match(svc, run_id)
        assert no_temporary_files(svc.storage) == []
        assert svc.wait_run(svc.run(extract["id"]))["status"] == "completed"


@pytest.mark.slow
def test_a_run_handed_to_a_worker_frozen_while_idle_is_run_again(tmp_path: Path, big_db: Path) -> None:
    """The watchdog judged only workers that had said they started a run: a job taken by a
    worker frozen between two runs left its run 'running' for as long as the worker stayed
    frozen, its lease renewed all along."""
    svc = start_service(tmp_path, str(big_db), "--workers", "1", "--lease-seconds", "5")
    with frozen_until_the_end(svc) as frozen:
        extract = svc.create_extract(name="Idle worker", schemas=["small"], max_attempts=1)
        assert svc.wait_run(svc.run(extract["id"]))["status"] == "completed"
        frozen += [pid for pid in descendants(svc.process.pid) if os.getpriority(os.PRIO_PROCESS, pid) >= 10]
        assert len(frozen) == 1  # the pool's one worker, idle
        os.kill(frozen[0], signal.SIGSTOP)
        run_id = svc.run(extract["id"])
        run = svc.wait_run(run_id, timeout=30)
        assert run["status"] == "completed" and run["attempt"] == 1, run  # put back in the queue, not failed
        assert not alive(frozen[0])
        assert "said nothing for" in svc.output()


@pytest.mark.slow
def test_a_worker_frozen_when_another_dies_holds_neither_run(tmp_path: Path, big_db: Path) -> None:
    """The pool's SIGTERM waits, pending, in a frozen worker: replacing the pool joined it for as
    long as it stayed frozen, and both runs stayed 'running' (the watchdog judges the new pool)."""
    svc = start_service(tmp_path, str(big_db))  # 2 workers
    with frozen_until_the_end(svc) as frozen:
        extracts = [
            svc.create_extract(name=name, schemas=["big"], compress=False, max_attempts=1)
            for name in ("Victim", "Bystander")
        ]
        victim, bystander = (svc.run(extract["id"]) for extract in extracts)
        frozen.append(worker_writing(svc.storage, bystander))
        os.kill(frozen[0], signal.SIGSTOP)
        os.kill(worker_writing(svc.storage, victim), signal.SIGKILL)
        # Generous: the frozen worker is given 5 s to heed the SIGTERM, and CI's machine is busy.
        assert svc.wait_run(victim, timeout=45)["error"].startswith(KILLED)
        assert svc.wait_run(bystander, timeout=45)["error"].startswith(INNOCENT)
        assert not alive(frozen[0])
        assert_files_match(svc, bystander)
        assert svc.wait_run(svc.run(extracts[0]["id"]))["status"] == "completed"


@pytest.mark.slow
def test_a_worker_frozen_at_the_stop_does_not_outlive_the_service(tmp_path: Path, big_db: Path) -> None:
    """The stop's SIGTERM waited, pending, in a frozen worker: it stayed after the service
    exited, and the forkserver and resource tracker with it."""
    svc = start_service(tmp_path, str(big_db), "--workers", "1")
    extract = svc.create_extract(name="Frozen at the stop", schemas=["big"], compress=False)
    run_id = svc.run(extract["id"])
    worker = worker_writing(svc.storage, run_id)
    children = descendants(svc.process.pid)
    os.kill(worker, signal.SIGSTOP)
    try:
        assert svc.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
        wait_for(lambda: not any(alive(pid) for pid in children), timeout=10, what="every child gone")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGCONT)
    assert state_rows(svc.db, "SELECT status FROM extract_runs WHERE id = ?", run_id) == [("queued",)]


@pytest.mark.slow
def test_the_managers_death_fails_its_runs_and_the_service_goes_on(tmp_path: Path, big_db: Path) -> None:
    """The Manager process (the workers' message queue) SIGKILLed while a worker writes: the run
    fails within seconds, retryable, its unrecorded files removed; a new Manager and pool take
    over, and the next run works."""
    svc = start_service(tmp_path, str(big_db))
    try:
        extract = svc.create_extract(name="Orphaned", schemas=["big"], compress=False, max_attempts=1)
        run_id = svc.run(extract["id"])
        worker_writing(svc.storage, run_id)
        os.kill(manager_pid(svc.process.pid), signal.SIGKILL)
        killed = time.monotonic()
        failed = svc.wait_run(run_id, timeout=30)
        assert time.monotonic() - killed < 15
        assert failed["status"] == "failed" and "its Manager process was killed" in failed["error"], failed
        assert failed["error_detail"]["retryable"] is True
        assert_files_match(svc, run_id)
        assert no_temporary_files(svc.storage) == []
        again = svc.wait_run(svc.run(extract["id"]))
        assert again["status"] == "completed" and again["records_exported"] == BIG_ROWS
        assert_files_match(svc, again["id"])
    finally:
        svc.stop()


# ---------------------------------------------------------------- a dying service


@pytest.mark.slow
def test_service_kill_9_five_times_loses_nothing(tmp_path: Path, big_db: Path) -> None:
    svc = start_service(tmp_path, str(big_db), "--workers", "1")
    # YAML is the slowest format: the run is surely still writing when the service dies.
    # One attempt: what a crash does to a run, not its retry (tests/test_retries.py).
    big = svc.create_extract(name="Big", schemas=["big"], compress=False, format="yaml", max_attempts=1)
    smalls = [
        svc.create_extract(name=f"Small {i}", schemas=["small"], format=fmt)
        for i, fmt in enumerate(("jsonl", "json", "yaml", "archive"))
    ]
    completed = [svc.run(smalls[0]["id"])]
    svc.wait_run(completed[0])
    try:
        for round_ in range(5):
            interrupted = svc.run(big["id"])
            worker_writing(svc.storage, interrupted)
            # A file finished just before the crash whose artifact message died in the queue.
            (svc.storage / interrupted / "finished-unrecorded.jsonl").write_bytes(b"{}\n")
            queued = [svc.run(s["id"]) for s in smalls]
            assert {
                svc.client.get(f"/api/data/extract_runs/{r}").json()["data"]["status"] for r in queued
            } == {"queued"}
            family = descendants(svc.process.pid)
            assert family, "the service has no worker processes"
            svc.stop(signal.SIGKILL)
            # Its workers, manager and forkserver die with it (they used to live on, writing).
            deadline = time.monotonic() + 10
            while any(alive(pid) for pid in family) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert [pid for pid in family if alive(pid)] == [], f"round {round_}: orphans left"
            svc = start_service(tmp_path, str(big_db), "--workers", "1", db=svc.db, storage=svc.storage)
            run = svc.client.get(f"/api/data/extract_runs/{interrupted}").json()["data"]
            assert (run["status"], run["error"]) == ("failed", f"{INTERRUPTED} (attempt 1 of 1)")
            assert_files_match(svc, interrupted)  # what it wrote before the crash, no temp file
            for run_id in queued:
                assert svc.wait_run(run_id)["status"] == "completed"
            completed += queued
        for run_id in completed:
            assert_files_match(svc, run_id)
            assert svc.client.get(f"/api/extracts/runs/{run_id}/download").status_code == 200
    finally:
        svc.stop()
    con = sqlite3.connect(svc.db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        statuses = dict(con.execute("SELECT status, count(*) FROM extract_runs GROUP BY status"))
    finally:
        con.close()
    assert statuses == {"completed": 1 + 5 * 4, "failed": 5}


# ---------------------------------------------------------------- a graceful stop


def state_rows(db: Path, sql: str, *args: object) -> list[tuple]:
    """Rows read straight from a stopped service's state file."""
    con = sqlite3.connect(db)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def files_match_rows(db: Path, storage: Path, run_id: str) -> list[str]:
    """The run's live artifact names, after checking each file's size and SHA-256 on disk."""
    rows = state_rows(
        db,
        "SELECT artifact_name, size_bytes, checksum FROM extract_artifacts "
        "WHERE run_id = ? AND deleted_at IS NULL",
        run_id,
    )
    for name, size, checksum in rows:
        data = (storage / run_id / name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (size, checksum), name
    on_disk = sorted(p.name for p in (storage / run_id).iterdir()) if (storage / run_id).exists() else []
    assert on_disk == sorted(name for name, _, _ in rows), run_id
    return sorted(name for name, _, _ in rows)


def process_state(pid: int) -> str:
    """The one-letter state of process ``pid`` (R, S, T for stopped, Z…)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def signal_pending(pid: int, sig: int) -> bool:
    """Whether ``sig`` was sent to process ``pid`` and waits, undelivered (the process is stopped)."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    masks = [int(line.split()[1], 16) for line in lines if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(mask & (1 << (sig - 1)) for mask in masks)


def wait_exporting(svc: Api, run_id: str, schema: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        detail = svc.client.get(f"/api/data/extract_runs/{run_id}").json()["data"]["progress_detail"]
        if detail["current_schema"] == schema and detail["records_exported"] > 0:
            return
        time.sleep(0.01)
    raise AssertionError(f"run {run_id} never exported {schema}")


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP])  # SIGHUP killed it as kill -9 did
def test_sigterm_requeues_active_runs_and_they_run_at_next_start(
    tmp_path: Path, big_db: Path, stop: signal.Signals
) -> None:
    svc = start_service(tmp_path, str(big_db), "--workers", "1")
    extract = svc.create_extract(name="Requeued", schemas=["big"], compress=False)
    run_id = svc.run(extract["id"])
    worker = worker_writing(svc.storage, run_id)
    assert os.getpriority(os.PRIO_PROCESS, worker) >= 10  # exports give way to the API on a busy host
    # Held still until the stop tells it to end: the run cannot finish during the stop (it did, now
    # and then, on an idle machine: a 200,000-row export lasts about as long as the stop's first steps).
    os.kill(worker, signal.SIGSTOP)
    wait_for(lambda: process_state(worker) == "T", what="the worker stopped")
    svc.process.send_signal(stop)
    wait_for(lambda: signal_pending(worker, signal.SIGTERM), what="the stop ending the worker")
    os.kill(worker, signal.SIGCONT)
    # uvicorn re-raises the signal once its graceful shutdown is complete.
    assert svc.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    assert "1 active run(s) put back in the queue" in svc.output()
    assert state_rows(svc.db, "SELECT status, progress FROM extract_runs WHERE id = ?", run_id) == [
        ("queued", 0)
    ]
    assert no_temporary_files(svc.storage) == []
    svc = start_service(tmp_path, str(big_db), db=svc.db, storage=svc.storage)
    try:
        run = svc.wait_run(run_id, timeout=120)
        assert run["status"] == "completed" and run["records_exported"] == BIG_ROWS
        assert_files_match(svc, run_id)
    finally:
        svc.stop()


@pytest.mark.slow
def test_sigterm_right_after_a_cancel_keeps_the_cancelled_runs_files(tmp_path: Path, big_db: Path) -> None:
    """The stop used to requeue every run still held in memory: files and artifact rows deleted
    before its status check, so a cancelled run ended with nothing."""
    svc = start_service(tmp_path, str(big_db), "--workers", "1")
    extract = svc.create_extract(name="Cancelled then stopped", schemas=["small", "big"], compress=False)
    run_id = svc.run(extract["id"])
    wait_exporting(svc, run_id, "big")
    assert svc.client.post(f"/api/extracts/{extract['id']}/cancel").status_code == 200
    assert svc.stop(signal.SIGTERM) in (0, -signal.SIGTERM)  # while its worker is still stopping
    assert state_rows(svc.db, "SELECT status FROM extract_runs WHERE id = ?", run_id) == [("cancelled",)]
    assert files_match_rows(svc.db, svc.storage, run_id) == ["describe.yaml", "small.jsonl"]
    assert "put back in the queue" not in svc.output()


@pytest.mark.slow
def test_sigterm_while_a_finished_run_waits_on_a_locked_state_file_loses_nothing(
    tmp_path: Path, big_db: Path
) -> None:
    """A run whose worker had finished, but whose messages were not applied yet, used to be
    requeued by the stop and its files deleted: the same window that wipes a completed run."""
    svc = start_service(tmp_path, str(big_db), "--workers", "1")
    extract = svc.create_extract(name="Finished during the stop", schemas=["big"], compress=False)
    run_id = svc.run(extract["id"])
    worker_writing(svc.storage, run_id)
    with state_locked(svc.db, 30):  # released once the stop has begun
        manifest = svc.storage / run_id / "manifest.json"
        wait_for(manifest.exists, what="the worker finishing while the state file is locked")
        svc.process.send_signal(signal.SIGTERM)  # its result is still on the queue
        wait_for(lambda: "Shutting down" in svc.output(), what="the stop beginning")
    assert svc.stop() in (0, -signal.SIGTERM)
    assert state_rows(svc.db, "SELECT status, records_exported FROM extract_runs WHERE id = ?", run_id) == [
        ("completed", BIG_ROWS)
    ]
    assert files_match_rows(svc.db, svc.storage, run_id) == ["big.jsonl", "describe.yaml", "manifest.json"]


@pytest.mark.slow
def test_sigterm_during_a_stalled_download_still_stops_and_requeues(tmp_path: Path, big_db: Path) -> None:
    """uvicorn waited for every response to be sent before the stop went on: a client that
    stopped reading a ZIP held the service up for good, its runs still 'running'."""
    svc = start_service(tmp_path, str(big_db), "--workers", "1")
    extract = svc.create_extract(name="Downloaded", schemas=["big"], compress=False)
    done = svc.run(extract["id"])
    assert svc.wait_run(done)["status"] == "completed"
    running = svc.run(extract["id"])
    worker = worker_writing(svc.storage, running)
    os.kill(worker, signal.SIGSTOP)  # still running when the stop comes
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a ZIP of 16 MB fills it at once
    client.connect(("127.0.0.1", int(svc.base_url.rsplit(":", 1)[1])))
    with contextlib.closing(client):
        client.sendall(
            f"GET /api/extracts/runs/{done}/download HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {TOKEN}\r\n\r\n".encode()
        )
        assert client.recv(12) == b"HTTP/1.1 200"  # then reads no more
        svc.process.send_signal(signal.SIGTERM)
        wait_for(
            lambda: signal_pending(worker, signal.SIGTERM), timeout=20, what="the stop ending the worker"
        )
        os.kill(worker, signal.SIGCONT)
        svc.process.wait(20)
    assert svc.stop() in (0, -signal.SIGTERM)
    output = svc.output()
    assert "a response still being sent was cut by the stop" in output and "Traceback" not in output
    assert state_rows(svc.db, "SELECT status FROM extract_runs WHERE id = ?", running) == [("queued",)]
    assert no_temporary_files(svc.storage) == []


@pytest.mark.slow
def test_a_second_ctrl_c_does_not_skip_the_graceful_stop(tmp_path: Path, big_db: Path) -> None:
    """uvicorn's "force quit" on a second SIGINT skipped the app's stop, then cancelled it on the
    way out: the pool's stop waited 20 s for messages no consumer applied, and logged a traceback."""
    svc = start_service(tmp_path, str(big_db), "--workers", "1")
    extract = svc.create_extract(name="Twice", schemas=["big"], compress=False)
    run_id = svc.run(extract["id"])
    worker = worker_writing(svc.storage, run_id)
    os.kill(worker, signal.SIGSTOP)  # still running when the stop comes
    svc.process.send_signal(signal.SIGINT)
    wait_for(lambda: "Shutting down" in svc.output(), what="the stop beginning")
    svc.process.send_signal(signal.SIGINT)
    wait_for(lambda: signal_pending(worker, signal.SIGTERM), what="the stop ending the worker")
    os.kill(worker, signal.SIGCONT)
    svc.process.wait(10)
    assert svc.stop() in (0, -signal.SIGINT)
    output = svc.output()
    assert "1 active run(s) put back in the queue" in output and "Traceback" not in output
    assert state_rows(svc.db, "SELECT status FROM extract_runs WHERE id = ?", run_id) == [("queued",)]
    assert no_temporary_files(svc.storage) == []


def test_a_cancelled_run_is_deleted_only_once_its_worker_stopped(tmp_path: Path, big_db: Path) -> None:
    """DELETE right after a cancel raced the stopping worker, which could still record a file."""
    svc = start_in_process(tmp_path, str(big_db), "--workers", "1")
    try:
        extract = svc.create_extract(name="Deleted while stopping", schemas=["small", "big"])
        run_id = svc.run(extract["id"])
        wait_exporting(svc, run_id, "big")
        assert svc.client.post(f"/api/extracts/{extract['id']}/cancel").status_code == 200
        r = svc.client.delete(f"/api/data/extract_runs/{run_id}")
        assert r.status_code == 409 and "still stopping" in r.json()["error"], r.text
        deadline = time.monotonic() + 5
        while r.status_code == 409 and time.monotonic() < deadline:
            time.sleep(0.05)
            r = svc.client.delete(f"/api/data/extract_runs/{run_id}")
        assert r.status_code == 200, r.text
        time.sleep(0.5)
        assert not (svc.storage / run_id).exists()
        assert [a["deleted_at"] is not None for a in artifacts_of(svc, run_id)] == [True, True]
    finally:
        svc.stop()


@pytest.mark.slow
def test_sigterm_at_any_moment_of_a_run_loses_nothing(tmp_path: Path) -> None:
    """SIGTERM sent at seeded random moments of runs (some cancelled): after a restart every run
    ends completed or cancelled, none failed as interrupted, every file matches its row."""
    import random

    chance = random.Random(20261130)
    # Runs that last about as long as the moments below spread over (up to 0.8 s), as when a new
    # worker spent half a second importing the service; it now starts in milliseconds.
    source = make_big_db(tmp_path / "source.db", 300_000)
    db, storage = tmp_path / "state" / "extracts.db", tmp_path / "storage"
    runs: list[str] = []
    for round_ in range(6):
        svc = start_service(tmp_path, str(source), "--workers", "2", db=db, storage=storage)
        extracts = [
            svc.create_extract(
                name=f"Round {round_} {i}", schemas=["small", "big"], format=fmt, compress=False
            )
            for i, fmt in enumerate(("jsonl", "yaml"))
        ]
        for extract in extracts:
            runs.append(svc.run(extract["id"]))
        time.sleep(chance.uniform(0, 0.8))
        if chance.random() < 0.5:
            svc.client.post(f"/api/extracts/{extracts[0]['id']}/cancel")
            time.sleep(chance.uniform(0, 0.3))
        assert svc.stop(signal.SIGTERM) in (0, -signal.SIGTERM), svc.output()[-3000:]
    svc = start_service(tmp_path, str(source), db=db, storage=storage)
    try:
        for run_id in runs:
            run = svc.wait_run(run_id, timeout=60)
            assert run["status"] in ("completed", "cancelled"), run
            names = files_match_rows(db, storage, run_id)
            if run["status"] == "completed":
                assert len(names) == 4 and run["records_exported"] == 300_001, (run, names)
    finally:
        svc.stop()
    assert no_temporary_files(storage) == []


# ---------------------------------------------------------------- the pool's channel


def test_the_forkserver_preloads_what_a_new_interpreter_finds_where_this_process_did(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pool's forkserver imports the service once, for every worker (each used to import it
    again); a package found only in the main script's directory, which a new interpreter does
    not search, is left to the workers (another checkout's copy could be found instead)."""
    from executor.entry import forkserver_preload

    script_dir, later = tmp_path / "script", tmp_path / "later"
    for folder, package in ((script_dir, "beside_the_script"), (later, "on_the_path")):
        (folder / package).mkdir(parents=True)
        (folder / package / "__init__.py").write_text("")
    monkeypatch.setattr(sys, "path", [str(script_dir), *sys.path[1:], str(later)])
    monkeypatch.chdir(tmp_path)
    modules = ["beside_the_script.sub", "on_the_path", "extracts_app", "executor.entry", "not_installed"]
    assert forkserver_preload(modules) == ["__main__", "on_the_path", "extracts_app", "executor.entry"]


def test_workers_get_the_progress_queue_once_not_with_every_job(tmp_path: Path) -> None:
    """A run used to fail now and then with "TypeError: 'NoneType' object cannot be interpreted as
    an integer" after a failed run in the same worker (executor.entry says why); jobs now carry
    no Manager proxies: the pool's initializer hands them to each worker once."""
    import concurrent.futures
    import multiprocessing
    from multiprocessing.managers import SyncManager

    from executor.entry import run_in_worker, worker_initializer

    context = multiprocessing.get_context("forkserver")
    manager = SyncManager(ctx=context)
    manager.start()
    try:
        queue, cancelled = manager.Queue(), manager.dict()
        source, missing = make_shop_db(tmp_path / "shop.db"), tmp_path / "missing.db"
        config = {
            "format": "jsonl",
            "include": ["describe", "data"],
            "schemas": ["users"],
            "filter": None,
            "compress": True,
            "split_files": False,
            "split_max_records": 1_000_000,
            "retention_days": 7,
        }
        jobs = [
            {
                "run_id": f"run_{i}",
                "extract_id": "extract_x",
                "extract_name": "X",
                "source": str(path),
                "storage": str(tmp_path / "storage"),
                "min_free_bytes": 0,
                "created_at": "2026-01-01T00:00:00.000Z",
                "config": config,
            }
            for i, path in enumerate((missing, source, missing, source, source))
        ]
        with concurrent.futures.ProcessPoolExecutor(
            1, mp_context=context, initializer=worker_initializer, initargs=(os.getpid(), queue, cancelled)
        ) as pool:
            for job in jobs:
                assert pool.submit(run_in_worker, job).result(60) is None
        messages = []
        while not queue.empty():
            messages.append(queue.get())
        results = [m[2] for m in messages if m[0] == "result"]
        assert [r["status"] for r in results] == ["failed", "completed", "failed", "completed", "completed"]
        started = [m for m in messages if m[0] == "started"]
        assert [m[1] for m in started] == [job["run_id"] for job in jobs]
        assert len({m[2]["pid"] for m in started}) == 1  # one worker, one channel, five jobs
    finally:
        manager.shutdown()
