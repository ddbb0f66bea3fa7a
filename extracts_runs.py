"""The parent side of run execution: the process pool and each run's lifecycle.

::

    queue_run() inserts a 'queued' row ─► dispatcher claims the oldest queued run
    (UPDATE … WHERE status = 'queued') while a worker is free ─► pool.submit(job)
    ─► worker puts started / progress / artifact messages on a Manager queue, and
    its result last ─► one consumer task applies them in order ─► the run row is
    finalised. The pool's future only reports what escaped the worker.

The consumer is the only writer of run and artifact rows during a run. A pool
broken by a dying worker is replaced; the runs it held fail with a message that
tells the culprit from the innocent. Retention sweeps and the scheduler live
here too: both start runs or delete files on a clock.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import multiprocessing
import os
import select
import shutil
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime
from multiprocessing.managers import SyncManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from croniter import croniter
from databases import Database

from extracts_state import (
    ACTIVE_STATUSES,
    SQL_NOW,
    SQL_NOW_PARAMS,
    RunStatus,
    TriggeredBy,
    dumps,
    iso,
    new_id,
    now_iso,
    plus_days,
    to_record,
    utcnow,
)

if TYPE_CHECKING:
    from extracts_app import Settings

log = logging.getLogger("extracts.runs")

INTERRUPTED = "interrupted: the service stopped while this run was running"
DRAIN_TIMEOUT_S = 20.0  # past the state file's busy timeout: one locked write is waited out
SNAPSHOT_FIELDS = (
    "format",
    "include",
    "schemas",
    "filter",
    "compress",
    "split_files",
    "split_max_records",
    "retention_days",
)


def queued_detail() -> dict[str, Any]:
    return {
        "phase": "queued",
        "schemas_total": 0,
        "schemas_completed": 0,
        "current_schema": None,
        "records_exported": 0,
        "records_total": 0,
    }


def manager_initializer(service_pid: int) -> None:
    """The Manager process outlives a signal sent to the service's whole process group.

    It holds the messages workers already put; the service drains them when it
    stops (``RunManager.stop``) and shuts the Manager down itself. It still dies
    with the service after a ``kill -9``.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    worker_initializer(service_pid)


def worker_initializer(service_pid: int | None = None, queue: Any = None, cancelled: Any = None) -> None:
    """Workers leave SIGINT to the service, which stops them itself (runs go back to queued).

    Pool workers receive the progress queue and cancel flags here, once
    (``executor.entry.keep_channel`` says why not with every job).

    They also die with the service: after a ``kill -9`` of it, a worker would
    otherwise finish its export into a run that the next start marks failed, and
    the manager (which holds the forkserver open) would idle forever.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if queue is not None:
        from executor.entry import keep_channel

        keep_channel(queue, cancelled)
    if service_pid is not None:
        threading.Thread(
            target=_exit_with, args=(service_pid,), daemon=True, name="extracts-exit-with-service"
        ).start()


def _exit_with(service_pid: int) -> None:
    try:
        pidfd = os.pidfd_open(service_pid)
    except (AttributeError, OSError):  # not Linux 5.3+: poll
        while True:
            time.sleep(0.5)
            try:
                os.kill(service_pid, 0)
            except ProcessLookupError:
                break
    else:
        select.select([pidfd], [], [])  # readable once the service has exited
    os._exit(1)


def signal_name(exitcode: int | None) -> str:
    if exitcode is None or exitcode >= 0:
        return f"exit code {exitcode}"
    with contextlib.suppress(ValueError):
        return f"killed by {signal.Signals(-exitcode).name}"
    return f"killed by signal {-exitcode}"


def next_due(schedule: str, after: datetime) -> str | None:
    """The first due time of a cron expression after ``after``; None when no date matches it.

    CPU work proportional to the expression: callers run it in a worker thread.
    """
    try:
        return iso(croniter(schedule, after).get_next(datetime))
    except ValueError:  # CroniterBadDateError ('0 0 31 2 *'), or an expression croniter refuses
        return None


class RunManager:
    """Owns the pool, the progress queue and every run state transition."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings
        self.clock: Callable[[], datetime] = utcnow
        self.retry_delay = 1.0  # seconds before writing again to a locked state file
        self._context = multiprocessing.get_context("forkserver")
        self._manager: Any = None
        self._queue: Any = None
        self._cancelled: Any = None
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._pool_processes: dict[int, Any] = {}
        self._generation = 0
        self._inflight: dict[str, int] = {}  # run id -> pool generation
        self._pids: dict[str, int] = {}  # run id -> worker pid ("started" message)
        self._jobs: dict[str, dict[str, Any]] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        self._consumer: asyncio.Task[None] | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._clocks: list[asyncio.Task[None]] = []
        self._messages: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self._reader: threading.Thread | None = None
        self._drained = asyncio.Event()

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.recover()
        await asyncio.to_thread(self._start_processes)
        loop = asyncio.get_running_loop()
        self._reader = threading.Thread(
            target=self._read_queue, args=(loop,), daemon=True, name="extracts-progress-reader"
        )
        self._reader.start()
        self._consumer = asyncio.create_task(self._consume())
        self._dispatcher = asyncio.create_task(self._dispatch())
        self._clocks = [
            asyncio.create_task(self._sweep_forever()),
            asyncio.create_task(self._schedule_forever()),
        ]
        self._wake.set()

    def _start_processes(self) -> None:
        self._manager = SyncManager(ctx=self._context)
        self._manager.start(initializer=manager_initializer, initargs=(os.getpid(),))
        self._queue = self._manager.Queue()
        self._cancelled = self._manager.dict()
        self._new_pool()

    def _new_pool(self) -> None:
        self._generation += 1
        self._pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=self.settings.workers,
            mp_context=self._context,
            initializer=worker_initializer,
            initargs=(os.getpid(), self._queue, self._cancelled),
        )
        self._pool_processes = self._pool._processes  # read after a break: who died, and how

    async def recover(self) -> None:
        """After a crash: runs left running failed as interrupted; pending ones queued (SPEC)."""
        now = now_iso()
        interrupted = await self.db.fetch_all("SELECT id FROM extract_runs WHERE status = 'running'")
        await self.db.execute(
            "UPDATE extract_runs SET status = 'failed', error = :error, completed_at = :now, "
            "updated_at = :now, progress_detail = json_set(progress_detail, '$.phase', 'failed'), "
            "duration_seconds = round((julianday(:now) - julianday(started_at)) * 86400, 3) "
            "WHERE status = 'running'",
            {"error": INTERRUPTED, "now": now},
        )
        await self.db.execute(
            "UPDATE extract_runs SET status = 'queued', updated_at = :now WHERE status = 'pending'",
            {"now": now},
        )
        for row in interrupted:  # half-written files (dot-names) of the runs cut short
            await asyncio.to_thread(self._remove_temporary_files, self.run_dir(row["id"]))

    @staticmethod
    def _remove_temporary_files(run_dir: Path) -> None:
        with contextlib.suppress(OSError):
            for temp in run_dir.glob(".*.tmp"):
                temp.unlink(missing_ok=True)

    async def stop(self) -> None:
        """Graceful stop: active runs go back to 'queued' and run again at the next start.

        Nothing a worker finished is lost: the workers are stopped first, then
        every message they had already sent (artifacts, results) is applied, and
        only the runs still 'running' after that are requeued, each one's status
        change won before its files go (SPEC: Snapshot, safety and faults).
        """
        self._stopping = True
        for task in self._clocks:
            task.cancel()
        await asyncio.gather(*self._clocks, return_exceptions=True)
        if self._dispatcher is not None:
            # Not cancelled: a claim in progress completes, so its run is in _inflight
            # (or still 'queued'); the loop ends at its next turn.
            self._wake.set()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
        in_flight = list(self._inflight)
        await asyncio.to_thread(self._kill_pool)
        await self._drain()
        requeued = await self._requeue()
        for run_id in in_flight:  # cancelled, failed or completed meanwhile: only their temp files go
            await asyncio.to_thread(self._remove_temporary_files, self.run_dir(run_id))
        if requeued:
            log.info(
                "%d active run(s) put back in the queue: they run again at the next start", len(requeued)
            )
        await asyncio.to_thread(self._stop_manager)

    async def _drain(self, timeout: float = DRAIN_TIMEOUT_S) -> None:
        """Apply every message already on the queue, then stop the consumer."""
        if self._consumer is None:
            return
        self._drained.clear()
        try:
            await asyncio.to_thread(self._queue.put, ("drained", None, None))
            await asyncio.wait_for(self._drained.wait(), timeout)
        except Exception:  # noqa: BLE001 — the Manager is gone, or the state file stayed locked
            log.warning("could not apply every message of the stopped runs; they are requeued")
        self._consumer.cancel()
        await asyncio.gather(self._consumer, return_exceptions=True)

    def _kill_pool(self) -> None:
        if self._pool is None:
            return
        processes = list(self._pool_processes.values())
        self._pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            with contextlib.suppress(Exception):
                process.terminate()
        for process in processes:
            with contextlib.suppress(Exception):
                process.join(5)

    def _stop_manager(self) -> None:
        if self._queue is not None:
            with contextlib.suppress(Exception):
                self._queue.put(("stop", None, None))
        if self._reader is not None:
            self._reader.join(5)
        if self._manager is not None:
            with contextlib.suppress(Exception):
                self._manager.shutdown()

    async def _requeue(self, run_ids: list[str] | None = None) -> list[str]:
        """Put interrupted runs back in the queue (None: every 'running' run); returns their ids.

        The status change is won first, in the transaction that removes the
        run's artifact rows; only then do its partial files go. A run that
        completed, failed or was cancelled meanwhile keeps everything.
        """
        values = {"detail": dumps(queued_detail()), "now": now_iso()}
        requeue = (
            "UPDATE extract_runs SET status = 'queued', progress = 0, progress_detail = :detail, "
            "started_at = NULL, updated_at = :now WHERE status = 'running'"
        )
        async with self.db.transaction():
            if run_ids is None:
                rows = await self.db.fetch_all(requeue + " RETURNING id", values)
            else:
                rows = [
                    row
                    for run_id in run_ids
                    if (
                        row := await self.db.fetch_one(
                            requeue + " AND id = :id RETURNING id", values | {"id": run_id}
                        )
                    )
                    is not None
                ]
            won = [row["id"] for row in rows]
            for run_id in won:
                await self.db.execute("DELETE FROM extract_artifacts WHERE run_id = :id", {"id": run_id})
        for run_id in won:
            await asyncio.to_thread(shutil.rmtree, self.run_dir(run_id), True)
        return won

    # ------------------------------------------------------------ API used by the handlers

    async def queue_run(self, extract: dict[str, Any], triggered_by: TriggeredBy) -> str | None:
        """Insert a queued run; None when the extract already has an active one (unique index)."""
        run_id = new_id("run")
        snapshot = {key: extract[key] for key in SNAPSHOT_FIELDS}
        try:
            # The time is SQLite's, read once the write lock is held: runs are stamped in
            # the order they were inserted, however long one waited for the lock.
            inserted = await self.db.fetch_one(
                "INSERT INTO extract_runs (id, extract_id, extract_name, status, progress, "
                "progress_detail, triggered_by, config_snapshot, created_at, updated_at) "
                f"SELECT :id, id, name, 'queued', 0, :detail, :by, :snapshot, {SQL_NOW}, {SQL_NOW} "
                "FROM extracts WHERE id = :extract AND deleted_at IS NULL AND enabled = 1 "
                "RETURNING id",
                {
                    "id": run_id,
                    "detail": dumps(queued_detail()),
                    "by": triggered_by.value,
                    "snapshot": dumps(snapshot),
                    "extract": extract["id"],
                    **SQL_NOW_PARAMS,
                },
            )
        except sqlite3.IntegrityError as exc:
            if "UNIQUE" not in str(exc):
                raise
            return None
        if inserted is None:  # deleted or disabled since the caller read it
            return None
        self._wake.set()
        return run_id

    async def cancel_active(self, extract_id: str) -> str | None:
        now = now_iso()
        row = await self.db.fetch_one(
            "UPDATE extract_runs SET status = 'cancelled', completed_at = :now, updated_at = :now, "
            "progress_detail = json_set(progress_detail, '$.phase', 'cancelled'), "
            "duration_seconds = round((julianday(:now) - julianday(started_at)) * 86400, 3) "
            f"WHERE extract_id = :extract AND status IN {ACTIVE_STATUSES} RETURNING id",
            {"now": now, "extract": extract_id},
        )
        if row is None:
            return None
        run_id = row["id"]
        if run_id in self._inflight:
            await asyncio.to_thread(self._cancelled.__setitem__, run_id, True)
        return run_id

    def worker_holds(self, run_id: str) -> bool:
        """Whether a worker still works on the run (a cancelled one stops within 2 seconds)."""
        return run_id in self._inflight

    async def delete_run_files(self, run_id: str) -> None:
        """Delete a run's files and mark its artifact rows deleted.

        Raises OSError when the files cannot be removed (say, read-only storage):
        the rows must not claim files gone that are still there.
        """

        def remove() -> None:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(self.run_dir(run_id))

        await asyncio.to_thread(remove)
        await self.db.execute(
            "UPDATE extract_artifacts SET deleted_at = :now WHERE run_id = :id AND deleted_at IS NULL",
            {"now": now_iso(), "id": run_id},
        )

    def run_dir(self, run_id: str) -> Path:
        return self.settings.storage / run_id

    async def next_run_at(self, config: dict[str, Any], keep: str | None = None) -> str | None:
        """The next due time of a scheduled extract (None when not scheduled)."""
        if not (config.get("schedule_enabled") and config.get("enabled", True) and config.get("schedule")):
            return None
        if keep:
            return keep
        return await asyncio.to_thread(next_due, config["schedule"], self.clock())

    # ------------------------------------------------------------ dispatch

    async def _dispatch(self) -> None:
        """Start queued runs while workers are free; ends once the service stops."""
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            try:
                while len(self._inflight) < self.settings.workers and not self._stopping:
                    if not await self._claim_and_submit():
                        break
            except Exception:  # noqa: BLE001 — e.g. the state file locked past the busy timeout
                log.exception("could not start queued runs; trying again in a moment")
                await asyncio.sleep(self.retry_delay)
                self._wake.set()

    async def _claim_and_submit(self) -> bool:
        now = now_iso()
        row = await self.db.fetch_one(
            "UPDATE extract_runs SET status = 'running', started_at = :now, updated_at = :now "
            "WHERE id = (SELECT id FROM extract_runs WHERE status = 'queued' "
            "ORDER BY created_at, rowid LIMIT 1) AND status = 'queued' "
            "RETURNING id, extract_id, extract_name, config_snapshot, created_at",
            {"now": now},
        )
        if row is None:
            return False
        run = dict(row._mapping)
        job = {
            "run_id": run["id"],
            "extract_id": run["extract_id"],
            "extract_name": run["extract_name"],
            "source": self.settings.source,
            "run_dir": str(self.run_dir(run["id"])),
            "min_free_bytes": self.settings.min_free_mb << 20,
            "created_at": run["created_at"],
            "config": orjson.loads(run["config_snapshot"]),
        }
        self._jobs[run["id"]] = job
        self._inflight[run["id"]] = self._generation
        loop = asyncio.get_running_loop()
        from executor.entry import run_in_worker

        try:
            future = self._pool.submit(run_in_worker, job)
        except (BrokenProcessPool, RuntimeError) as exc:
            log.warning("pool refused run %s (%s); replacing the pool", run["id"], exc)
            self._inflight.pop(run["id"])
            await self._requeue([run["id"]])
            await self._replace_pool(self._generation)
            return False

        def done(f: concurrent.futures.Future[Any], run_id: str = run["id"]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
                loop.call_soon_threadsafe(self._future_done, run_id, f)

        future.add_done_callback(done)
        return True

    def _future_done(self, run_id: str, future: concurrent.futures.Future[Any]) -> None:
        """The worker put its result on the queue itself; only an escaped exception is handled here."""
        if self._stopping or future.cancelled() or future.exception() is None:
            return
        exc = future.exception()
        if isinstance(exc, BrokenProcessPool):
            generation = self._inflight.get(run_id)
            if generation == self._generation:
                asyncio.create_task(self._replace_pool(generation))
            return
        result = {
            "status": "failed",
            "error": f"the worker could not run this extract: {exc}",
            "error_detail": {"type": type(exc).__name__, "message": str(exc), "traceback": ""},
        }
        # Behind everything the worker put on the queue.
        asyncio.create_task(asyncio.to_thread(self._queue.put, ("result", run_id, result)))

    async def _replace_pool(self, generation: int) -> None:
        """A worker died: build a new pool, then fail (or requeue) the runs the old one held."""
        if generation != self._generation:
            return
        old_processes = self._pool_processes
        old_pool = self._pool
        self._new_pool()

        def reap() -> dict[int, int | None]:
            old_pool.shutdown(wait=True, cancel_futures=True)
            return {pid: p.exitcode for pid, p in old_processes.items()}

        exitcodes = await asyncio.to_thread(reap)
        log.warning("worker pool broken (exit codes %s); replaced", exitcodes)
        await asyncio.to_thread(
            self._queue.put, ("broken", None, {"generation": generation, "exitcodes": exitcodes})
        )

    # ------------------------------------------------------------ the consumer: applies messages in order

    def _read_queue(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            try:
                message = self._queue.get()
            except (EOFError, OSError, BrokenPipeError):
                return
            if message[0] == "stop":
                return
            loop.call_soon_threadsafe(self._messages.put_nowait, message)

    async def _consume(self) -> None:
        handlers = {
            "started": self._on_started,
            "progress": self._on_progress,
            "artifact": self._on_artifact,
            "result": self._finish,
            "broken": self._on_broken,
        }
        while True:
            kind, run_id, payload = await self._messages.get()
            if kind == "drained":
                self._drained.set()
                continue
            await self._apply(handlers[kind], kind, run_id, payload)

    async def _apply(
        self, handler: Callable[[Any, Any], Any], kind: str, run_id: str | None, payload: Any
    ) -> None:
        """Apply one message; a state file locked by another process is waited out, not skipped.

        Skipping would lose an artifact row, or leave the run 'running' forever when
        the lost message was its result. Every handler can be applied again. While
        the service stops, ``_drain`` bounds the waiting.
        """
        while True:
            try:
                await handler(run_id, payload)
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc):
                    log.exception("could not apply %s message for %s", kind, run_id)
                    return
                log.warning("state file locked; applying the %s message for %s again", kind, run_id)
                await asyncio.sleep(self.retry_delay)
            except Exception:  # noqa: BLE001 — one bad message must not stop every run
                log.exception("could not apply %s message for %s", kind, run_id)
                return

    async def _on_started(self, run_id: str, payload: dict[str, Any]) -> None:
        self._pids[run_id] = payload["pid"]

    async def _on_progress(self, run_id: str, payload: dict[str, Any]) -> None:
        await self.db.execute(
            "UPDATE extract_runs SET progress = max(progress, min(:progress, 99)), "
            "progress_detail = :detail, updated_at = :now WHERE id = :id AND status = 'running'",
            {
                "progress": int(payload["progress"]),
                "detail": dumps(payload["progress_detail"]),
                "now": now_iso(),
                "id": run_id,
            },
        )

    async def _on_artifact(self, run_id: str, artifact: dict[str, Any]) -> None:
        job = self._jobs.get(run_id)
        if job is None:
            return
        now = now_iso()
        # One id per message, kept in it: applied again after a locked write (_apply), the
        # message inserts nothing more, while another file of the same name still conflicts.
        values = {
            "id": artifact.setdefault("id", new_id("artifact")),
            "run_id": run_id,
            "extract_id": job["extract_id"],
            "artifact_type": artifact["artifact_type"],
            "artifact_name": artifact["artifact_name"],
            "schema_name": artifact.get("schema_name"),
            "part": artifact.get("part"),
            "storage_path": str(Path(job["run_dir"], artifact["artifact_name"])),
            "format": artifact["format"],
            "content_type": artifact["content_type"],
            "size_bytes": artifact["size_bytes"],
            "records": artifact.get("records"),
            "checksum": artifact["checksum"],
            "crc32": artifact["crc32"],
            "is_primary": int(bool(artifact.get("is_primary"))),
            "created_at": now,
            "expires_at": plus_days(now, job["config"]["retention_days"]),
        }
        columns = ", ".join(values)
        try:
            await self.db.execute(
                f"INSERT INTO extract_artifacts ({columns}) VALUES "
                f"({', '.join(':' + c for c in values)}) ON CONFLICT (id) DO NOTHING",
                values,
            )
        except sqlite3.IntegrityError as exc:
            if "UNIQUE" not in str(exc):
                raise
            await self._fail_second_file(run_id, artifact["artifact_name"])

    async def _fail_second_file(self, run_id: str, name: str) -> None:
        """A second file of one name (letter case aside) in a run: the run fails and stops at once.

        The schema refuses the row (SPEC: Artifacts), so the manifest and the ZIP
        would miss a file: the run must not end completed.
        """
        error = (
            f"The run wrote a second file named {name} (letter case aside), which was not "
            "recorded; the run was stopped. Report this as a bug in the file naming"
        )
        now = now_iso()
        await self.db.execute(
            "UPDATE extract_runs SET status = 'failed', error = :error, error_detail = :detail, "
            "completed_at = :now, updated_at = :now, "
            "progress_detail = json_set(progress_detail, '$.phase', 'failed'), "
            "duration_seconds = round((julianday(:now) - julianday(started_at)) * 86400, 3) "
            "WHERE id = :id AND status = 'running'",
            {
                "error": error,
                "now": now,
                "id": run_id,
                "detail": dumps(
                    {
                        "type": "DuplicateArtifactName",
                        "message": error,
                        "traceback": "",
                        "artifact_name": name,
                    }
                ),
            },
        )
        log.error("run %s: %s", run_id, error)
        if run_id in self._inflight:  # the worker stops; its result leaves the run failed
            await asyncio.to_thread(self._cancelled.__setitem__, run_id, True)

    async def _on_broken(self, run_id: None, payload: dict[str, Any]) -> None:
        exitcodes: dict[int, int | None] = payload["exitcodes"]
        held = [r for r, g in self._inflight.items() if g == payload["generation"]]
        for run_id in held:
            pid = self._pids.get(run_id)
            if pid is None:
                await self._requeue([run_id])
                self._forget(run_id)
                continue
            code = exitcodes.get(pid)
            if code is not None and code != -signal.SIGTERM:
                error = (
                    f"the worker process running this extract died ({signal_name(code)}), "
                    "possibly out of memory; the pool was restarted: run it again"
                )
            else:
                error = (
                    "stopped because another run's worker process died and the pool was "
                    "restarted: run it again"
                )
            # The dead workers' half-written files; what they finished stays (SPEC: faults).
            await asyncio.to_thread(self._remove_temporary_files, self.run_dir(run_id))
            await self._finish(
                run_id,
                {
                    "status": "failed",
                    "error": error,
                    "error_detail": {
                        "type": "BrokenProcessPool",
                        "message": error,
                        "traceback": "",
                        "worker_pid": pid,
                        "exit_codes": {str(k): v for k, v in exitcodes.items()},
                    },
                },
            )
        self._wake.set()

    def _forget(self, run_id: str) -> None:
        self._inflight.pop(run_id, None)
        self._pids.pop(run_id, None)
        self._jobs.pop(run_id, None)
        if self._cancelled is not None:
            with contextlib.suppress(Exception):
                self._cancelled.pop(run_id, None)

    async def _finish(self, run_id: str, result: dict[str, Any]) -> None:
        """Finalise a run from the worker's result; a run cancelled meanwhile stays cancelled."""
        status = result.get("status", "failed")
        if status not in (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED):
            status = RunStatus.FAILED.value
        now = now_iso()
        counts = {
            "records": result.get("records_exported", 0),
            "schemas": result.get("schemas_exported", 0),
            "id": run_id,
        }
        await self.db.execute(
            "UPDATE extract_runs SET records_exported = :records, schemas_exported = :schemas, "
            "artifacts_created = (SELECT count(*) FROM extract_artifacts WHERE run_id = :id), "
            "total_size_bytes = (SELECT coalesce(sum(size_bytes), 0) FROM extract_artifacts "
            "WHERE run_id = :id) WHERE id = :id",
            counts,
        )
        detail_patch = {"phase": status}
        if status == RunStatus.COMPLETED:
            detail_patch.update(records_exported=counts["records"])
        await self.db.execute(
            "UPDATE extract_runs SET status = :status, completed_at = :now, updated_at = :now, "
            "progress = CASE WHEN :status = 'completed' THEN 100 ELSE progress END, "
            "progress_detail = json_patch(progress_detail, :patch), error = :error, "
            "error_detail = :error_detail, "
            "duration_seconds = round((julianday(:now) - julianday(started_at)) * 86400, 3) "
            "WHERE id = :id AND status = 'running'",
            {
                "status": status,
                "now": now,
                "patch": dumps(detail_patch),
                "error": result.get("error"),
                "error_detail": dumps(result.get("error_detail")),
                "id": run_id,
            },
        )
        self._forget(run_id)  # last: a retry after a locked write must still find the run
        self._wake.set()

    # ------------------------------------------------------------ retention

    async def _sweep_forever(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:  # noqa: BLE001 — retry at the next interval
                log.exception("retention sweep failed")
            await asyncio.sleep(self.settings.cleanup_interval)

    async def sweep(self) -> int:
        """Delete the files of expired artifacts and empty run directories (SPEC: Retention)."""
        now = iso(self.clock())
        rows = await self.db.fetch_all(
            "SELECT id, run_id, storage_path FROM extract_artifacts "
            "WHERE deleted_at IS NULL AND expires_at <= :now",
            {"now": now},
        )
        for row in rows:
            await asyncio.to_thread(self._remove_file, Path(row["storage_path"]))
            await self.db.execute(
                "UPDATE extract_artifacts SET deleted_at = :now WHERE id = :id", {"now": now, "id": row["id"]}
            )
        await asyncio.to_thread(self._remove_empty_run_dirs)
        return len(rows)

    def _remove_file(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        with contextlib.suppress(OSError):
            path.parent.rmdir()

    def _remove_empty_run_dirs(self) -> None:
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.settings.storage):
                if entry.is_dir() and entry.name.startswith("run_") and entry.name not in self._inflight:
                    with contextlib.suppress(OSError):
                        os.rmdir(entry.path)

    # ------------------------------------------------------------ scheduling

    async def _schedule_forever(self) -> None:
        while True:
            try:
                await self.schedule_tick()
            except Exception:  # noqa: BLE001 — retry at the next tick
                log.exception("scheduler tick failed")
            await asyncio.sleep(1.0)

    async def schedule_tick(self) -> list[str]:
        """Start every scheduled extract that is due; one run per tick, however many slots passed."""
        now = self.clock()
        rows = await self.db.fetch_all(
            "SELECT * FROM extracts WHERE schedule_enabled = 1 AND enabled = 1 AND "
            "deleted_at IS NULL AND next_run_at IS NOT NULL AND next_run_at <= :now",
            {"now": iso(now)},
        )
        started = []
        for row in rows:
            extract = to_record(row)
            run_id = await self.queue_run(extract, TriggeredBy.SCHEDULE)
            if run_id is None:
                log.info("extract %s due but already running: this due time is skipped", extract["id"])
            else:
                started.append(run_id)
            # None (no longer scheduled) for a schedule saved before it would have been refused.
            following = await asyncio.to_thread(next_due, extract["schedule"], now)
            await self.db.execute(
                "UPDATE extracts SET next_run_at = :next WHERE id = :id",
                {"next": following, "id": extract["id"]},
            )
        return started
