"""Fault injection with real processes: nothing lost, nothing stuck (SPEC: Snapshot, safety and faults).

Workers SIGKILLed mid-run, the service ``kill -9``ed and restarted, a storage
volume that is really full or turns read-only, a source deleted or replaced
under a run, the state file locked by another process. Every test checks that
every run reaches a terminal state with a clear message, that the service
answers all along, and that the next run works. Run them alone with
``pytest -m faults``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import TOKEN, Service, make_big_db, make_shop_db, start_service, worker_writing

pytestmark = pytest.mark.faults

TERMINAL = ("completed", "failed", "cancelled")
KILLED = "the worker process running this extract died (killed by SIGKILL)"
INNOCENT = "stopped because another run's worker process died"
INTERRUPTED = "interrupted: the service stopped while this run was running"


# ---------------------------------------------------------------- helpers


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (workers, the forkserver, the manager, the resource tracker)."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def artifacts_of(service: Service, run_id: str) -> list[dict]:
    return service.client.get(
        "/api/data/extract_artifacts", params={"filter[where][run_id]": run_id, "filter[limit]": "1000"}
    ).json()["data"]


def assert_files_match(service: Service, run_id: str) -> None:
    """Every artifact of the run is on disk with its recorded size and SHA-256; no temp file left."""
    run_dir = service.storage / run_id
    artifacts = artifacts_of(service, run_id)
    for a in artifacts:
        data = Path(a["storage_path"]).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (a["size_bytes"], a["checksum"]), a
    if run_dir.exists():
        assert sorted(p.name for p in run_dir.iterdir()) == sorted(a["artifact_name"] for a in artifacts)


def no_temporary_files(storage: Path) -> list[str]:
    return [str(p) for p in storage.glob("run_*/.*")]


class Prober:
    """Hits /health and a list every 20 ms from a thread; records anything but a 200."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.problems: list[str] = []
        self.requests = 0
        self.slowest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._probe, daemon=True)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _probe(self) -> None:
        with httpx.Client(
            base_url=self.service.base_url, timeout=10, headers={"Authorization": f"Bearer {TOKEN}"}
        ) as client:
            while not self._stop.wait(0.02):
                for url in ("/health", "/api/data/extract_runs?filter[limit]=5"):
                    started = time.monotonic()
                    try:
                        status = client.get(url).status_code
                    except httpx.HTTPError as exc:
                        self.problems.append(f"{url}: {exc!r}")
                        continue
                    self.slowest = max(self.slowest, time.monotonic() - started)
                    self.requests += 1
                    if status != 200:
                        self.problems.append(f"{url}: {status}")


@contextlib.contextmanager
def tmpfs(path: Path, size_mb: int) -> Iterator[Path]:
    """A real small volume (root only); skips the test where the machine does not allow it."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True)


@pytest.fixture(scope="module")
def big_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_big_db(tmp_path_factory.mktemp("faults-source") / "big.db", 500_000)


# ---------------------------------------------------------------- dying workers


def test_worker_sigkilled_ten_times_with_other_runs_in_flight(tmp_path: Path, big_db: Path) -> None:
    svc = start_service(tmp_path, str(big_db))  # 2 workers
    try:
        # One attempt each: what the pool does to its runs, not the retries (tests/test_retries.py).
        victim = svc.create_extract(name="Victim", schemas=["big"], compress=False, max_attempts=1)
        bystander = svc.create_extract(name="Bystander", schemas=["big"], compress=False, max_attempts=1)
        waiting = svc.create_extract(name="Waiting", schemas=["small"])
        endings: list[float] = []  # seconds from the kill until all three runs ended
        with Prober(svc) as prober:
            for round_ in range(10):
                runs = {
                    "victim": svc.run(victim["id"]),
                    "bystander": svc.run(bystander["id"]),
                    "waiting": svc.run(waiting["id"]),
                }
                os.kill(worker_writing(svc.storage, runs["victim"]), signal.SIGKILL)
                killed_at = time.monotonic()
                done = {name: svc.wait_run(run_id, timeout=30) for name, run_id in runs.items()}
                endings.append(time.monotonic() - killed_at)
                assert done["victim"]["status"] == "failed", (round_, done["victim"])
                assert done["victim"]["error"].startswith(KILLED), done["victim"]["error"]
                for name in ("bystander", "waiting"):
                    run = done[name]
                    assert run["status"] == "completed" or (
                        run["status"] == "failed" and run["error"].startswith(INNOCENT)
                    ), (round_, run)
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
        # After all that, the pool works.
        assert svc.wait_run(svc.run(waiting["id"]))["status"] == "completed"
    finally:
        svc.stop()


# ---------------------------------------------------------------- a dying service


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
                time.sleep(0.05)
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


def wait_exporting(svc: Service, run_id: str, schema: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        detail = svc.client.get(f"/api/data/extract_runs/{run_id}").json()["data"]["progress_detail"]
        if detail["current_schema"] == schema and detail["records_exported"] > 0:
            return
        time.sleep(0.01)
    raise AssertionError(f"run {run_id} never exported {schema}")


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


def test_sigterm_while_a_finished_run_waits_on_a_locked_state_file_loses_nothing(
    tmp_path: Path, big_db: Path
) -> None:
    """A run whose worker had finished, but whose messages were not applied yet, used to be
    requeued by the stop and its files deleted: the same window that wipes a completed run."""
    svc = start_service(tmp_path, str(big_db), "--workers", "1")
    extract = svc.create_extract(name="Finished during the stop", schemas=["big"], compress=False)
    run_id = svc.run(extract["id"])
    worker_writing(svc.storage, run_id)
    with state_locked(svc.db, 6):
        manifest = svc.storage / run_id / "manifest.json"
        deadline = time.monotonic() + 30
        while not manifest.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert manifest.exists(), "the worker did not finish while the state file was locked"
        svc.process.send_signal(signal.SIGTERM)  # its result is still on the queue
    assert svc.stop() in (0, -signal.SIGTERM)
    assert state_rows(svc.db, "SELECT status, records_exported FROM extract_runs WHERE id = ?", run_id) == [
        ("completed", 500_000)
    ]
    assert files_match_rows(svc.db, svc.storage, run_id) == ["big.jsonl", "describe.yaml", "manifest.json"]


def test_a_cancelled_run_is_deleted_only_once_its_worker_stopped(tmp_path: Path, big_db: Path) -> None:
    """DELETE right after a cancel raced the stopping worker, which could still record a file."""
    svc = start_service(tmp_path, str(big_db), "--workers", "1")
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
    source = make_big_db(tmp_path / "source.db", 150_000)
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
                assert len(names) == 4 and run["records_exported"] == 150_001, (run, names)
    finally:
        svc.stop()
    assert no_temporary_files(storage) == []


# ---------------------------------------------------------------- storage faults


def test_a_full_volume_fails_the_run_cleanly_and_the_next_run_works(tmp_path: Path) -> None:
    source = make_big_db(tmp_path / "source.db", 400_000)  # ~35 MB of JSON lines: twice the volume
    with tmpfs(tmp_path / "volume", 16) as volume:
        svc = start_service(tmp_path, str(source), "--min-free-mb", "0", storage=volume / "storage")
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


def test_a_full_volume_without_mount_rights_fails_the_run_cleanly(tmp_path: Path) -> None:
    """The same fault where no tmpfs can be mounted: a file-size limit on the service's processes."""
    source = make_big_db(tmp_path / "source.db", 200_000)
    limit = 8 << 20

    def limited() -> None:  # in the child, before exec: writes past the limit fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    import conftest

    original = subprocess.Popen

    def popen(*args, **kwargs):  # start_service's Popen, with the limit
        return original(*args, preexec_fn=limited, **kwargs)

    conftest.subprocess.Popen = popen
    try:
        svc = start_service(tmp_path, str(source), "--min-free-mb", "0")
    finally:
        conftest.subprocess.Popen = original
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
        svc = start_service(tmp_path, str(source), "--min-free-mb", "0", storage=volume / "storage")
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


def test_source_deleted_or_replaced_mid_run(tmp_path: Path) -> None:
    source = make_big_db(tmp_path / "source.db", 600_000)
    svc = start_service(tmp_path, str(source))
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


# ---------------------------------------------------------------- a locked state file


@contextlib.contextmanager
def state_locked(db: Path, seconds: float) -> Iterator[None]:
    """Another process takes the state file's write lock (BEGIN EXCLUSIVE) for ``seconds``.

    The block starts once the lock is held; leaving it waits for the release.
    """
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1], "
            "isolation_level=None); c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); "
            "time.sleep(float(sys.argv[2])); c.rollback()",
            str(db),
            str(seconds),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.wait(seconds + 30)
        holder.stdout.close()


def mixed_requests(svc: Service, extract_id: str) -> list[tuple[str, int, dict]]:
    """One of each kind of request, from threads at once; (what, status, body) each."""
    calls = {
        "create": lambda c: c.post("/api/data/extracts", json={"name": "During the lock"}),
        "update": lambda c: c.put(f"/api/data/extracts/{extract_id}", json={"description": "x"}),
        "list": lambda c: c.get("/api/data/extracts"),
        "get": lambda c: c.get(f"/api/data/extracts/{extract_id}"),
        "runs": lambda c: c.get("/api/data/extract_runs"),
        "describe": lambda c: c.get("/api/describe"),
    }
    results: list[tuple[str, int, dict]] = []

    def call(what: str) -> None:
        with httpx.Client(
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


def test_state_file_locked_for_seconds_requests_wait_and_succeed(tmp_path: Path) -> None:
    svc = start_service(tmp_path, str(make_shop_db(tmp_path / "shop.db")))
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


def test_state_file_locked_past_the_busy_timeout_is_a_503_and_nothing_is_stuck(tmp_path: Path) -> None:
    source = make_big_db(tmp_path / "source.db", 300_000)
    svc = start_service(tmp_path, str(source))
    try:
        extract = svc.create_extract(name="Locked long", schemas=["big"], compress=False)
        small = svc.create_extract(name="Queued during the lock", schemas=["small"])
        run_id = svc.run(extract["id"])
        worker_writing(svc.storage, run_id)
        with state_locked(svc.db, 18):  # the run finishes while the lock is held
            results = mixed_requests(svc, extract["id"])
            r = svc.client.post(f"/api/extracts/{small['id']}/run")
        for what, status, body in [*results, ("run", r.status_code, r.json())]:
            assert status < 300 or (status == 503 and body["error_code"] == "SERVICE_UNAVAILABLE"), (
                what,
                status,
                body,
            )
        assert any(status == 503 for _, status, _ in results), results  # the writes gave up
        run = svc.wait_run(run_id, timeout=30)
        assert run["status"] == "completed" and run["records_exported"] == 300_000, run
        assert_files_match(svc, run_id)
        assert run["artifacts_created"] == 3
        # The dispatcher survived: new runs still start and finish.
        queued = r.json()["data"]["run_id"] if r.status_code == 202 else svc.run(small["id"])
        assert svc.wait_run(queued)["status"] == "completed"
        assert svc.wait_run(svc.run(extract["id"]))["status"] == "completed"
        assert "INTERNAL_ERROR" not in str(results)
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


def test_workers_get_the_progress_queue_once_not_with_every_job(tmp_path: Path) -> None:
    """A run used to fail now and then with "TypeError: 'NoneType' object cannot be interpreted as
    an integer" after a failed run in the same worker (executor.entry says why); jobs now carry
    no Manager proxies: the pool's initializer hands them to each worker once."""
    import concurrent.futures
    import multiprocessing
    from multiprocessing.managers import SyncManager

    from executor.entry import run_in_worker
    from extracts.pool import worker_initializer

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
