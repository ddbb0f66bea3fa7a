"""Runs in the state file: every status change of a run, each one statement (or one transaction).

::

    queue()  inserts a 'queued' run (the one-active-run index refuses a second)
    claim()  'queued' → 'running', the oldest first, and hands back its Job
    record_progress / record_artifact   while it runs (the worker's messages)
    finish() 'running' → completed | failed | cancelled, from the worker's result
    cancel_active()     queued/running → 'cancelled' (the worker notices and stops)
    requeue()           'running' → 'queued' after a graceful stop, files removed after
    recover()           at start-up: 'running' left by a crash → failed as interrupted

A transition that removes files wins its status change first, so a run that
ended meanwhile keeps everything (SPEC: Snapshot, safety and faults).

Several instances (SPEC: Beyond one machine) share the rows: a claim takes the
run for this instance (``instance_id``) with a lease (``lease_expires_at``, which
the instance's heartbeat renews) and a fencing token (``lease_token``, new at each
claim). Every write a worker causes — progress, artifact rows, the ending — is
made only while the run still carries that token: once a lease expired and the
run was failed as interrupted (``reap``), the late writes of its old worker change
nothing.

Retries (SPEC: Retries) are rows, not timers: a run that fails for a transient
cause (``executor.failures``) gets its retry — a new 'queued' run with
``attempt`` + 1, ``retry_of`` and a ``not_before`` — in the transaction that
fails it, so a crash between the two loses neither. The waits double from the
extract's ``retry_delay_seconds``, with ±20 % jitter.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
from collections.abc import Callable, Collection
from datetime import datetime, timedelta
from typing import Any

import orjson
from databases import Database

from executor.messages import (
    ACTIVE_STATUSES,
    SNAPSHOT_FIELDS,
    Artifact,
    Job,
    Phase,
    Progress,
    Result,
    RunStatus,
    failure,
    progress_detail,
)
from extracts.dialects import SQLITE, Dialect
from extracts.state import (
    TriggeredBy,
    dumps,
    in_transaction,
    iso,
    new_id,
    now_iso,
    parse_iso,
    plus_days,
    sql_list,
    utcnow,
)
from extracts.storage import Storage, StorageError

log = logging.getLogger("extracts.runs")

INTERRUPTED = "interrupted: the service stopped while this run was running"
# The statuses as SQL text, from the one enum (schema.sql's CHECK mirrors it).
PENDING, QUEUED, RUNNING = (sql_list((status.value,))[1:-1] for status in ACTIVE_STATUSES)
ACTIVE = sql_list(tuple(status.value for status in ACTIVE_STATUSES))


JITTER = 0.2  # a retry waits its delay ± 20 %


def retry_wait(delay_seconds: int, attempt: int, jitter: float) -> timedelta:
    """The wait before the attempt after ``attempt``: the delay doubled each time, ``jitter`` in [-1, 1]."""
    return timedelta(seconds=delay_seconds * 2 ** (attempt - 1) * (1 + JITTER * jitter))


class Runs:
    """The run and artifact rows of the state file, and the run files that go with them."""

    def __init__(
        self,
        db: Database,
        storage: Storage,
        source: str,
        min_free_bytes: int,
        clock: Callable[[], datetime] = utcnow,
        jitter: Callable[[], float] = lambda: random.uniform(-1, 1),
        dialect: Dialect = SQLITE,
    ) -> None:
        self.db, self.dialect, self.storage = db, dialect, storage
        self.source, self.min_free_bytes = source, min_free_bytes
        self.clock, self.jitter = clock, jitter
        self.queued = asyncio.Event()  # set when a run may be waiting: the dispatcher's cue
        self.instance_id = new_id("instance")
        self.lease = timedelta(seconds=30)  # --lease-seconds
        self.deleting: set[str] = set()  # runs whose files are going now (a download then gets 410)

    def ending(self, *integers: str) -> str:
        """What every ending sets: the status, when it ended, its phase, how long it ran.

        ``integers`` names more ``progress_detail`` fields to set, each bound by its name.
        """
        fields = {"phase": ("status", "text")} | {name: (name, "bigint") for name in integers}
        return (
            "status = :status, completed_at = :now, updated_at = :now, "
            f"progress_detail = {self.dialect.json_set('progress_detail', fields)}, "
            f"duration_seconds = {self.dialect.duration()}"
        )

    async def recover(self, alone: bool) -> None:
        """At start-up: runs a stopped service left running fail as interrupted, and are retried
        per their extract's policy (exactly once: the failure and its retry are one transaction);
        pending ones are queued (SPEC). ``alone``: no other instance can hold a run (a SQLite
        state), so every running run was this service's; else only expired leases are reaped."""
        await self.reap(every=alone)
        await self.db.execute(
            f"UPDATE extract_runs SET status = {QUEUED}, updated_at = :now WHERE status = {PENDING}",
            {"now": now_iso()},
        )

    async def reap(self, every: bool = False) -> list[str]:
        """Fail as interrupted (and retry) the running runs whose lease expired: their instance
        died, froze or lost its network (``every``: all running runs). Returns their ids."""
        expired = "" if every else " AND lease_expires_at < :now"
        rows = await self.db.fetch_all(
            f"SELECT id, lease_token FROM extract_runs WHERE status = {RUNNING}{expired}",
            {} if every else {"now": iso(self.clock())},
        )
        for row in rows:
            interrupted = failure(INTERRUPTED, "Interrupted", retryable=True)
            # Fenced off (requeued and claimed again meanwhile): its files are another worker's.
            if await self.finish(row["id"], interrupted, row["lease_token"]):
                await self.remove_leftovers(row["id"])
        # A cancelled run whose worker never reported back (its instance died): nothing holds it.
        await self.db.execute(
            f"UPDATE extract_runs SET lease_token = NULL, lease_expires_at = NULL WHERE status <> {RUNNING} "
            "AND lease_token IS NOT NULL AND lease_expires_at < :now",
            {"now": iso(self.clock())},
        )
        return [row["id"] for row in rows]

    async def remove_leftovers(self, run_id: str) -> None:
        """What a run's dead worker left: its half-written files, and files it finished whose
        artifact message died with it (a file is the run's only once its row is recorded).

        Tidying only: with the storage down or refusing, the files stay (logged) and the run's
        ending, already recorded, stands; a state error is raised (the caller retries).
        """
        await self._tidy(self.storage.remove_partial, run_id)
        recorded = await self.db.fetch_all(
            "SELECT artifact_name FROM extract_artifacts WHERE run_id = :id", {"id": run_id}
        )
        names = {r["artifact_name"] for r in recorded}
        await self._tidy(self.storage.remove_unrecorded, run_id, names)

    async def _tidy(self, remove: Callable[..., object], run_id: str, *args: Any) -> None:
        try:
            await asyncio.to_thread(remove, run_id, *args)
        except (StorageError, OSError) as exc:
            log.warning("could not remove what run %s left in the storage (%s): the files stay", run_id, exc)

    async def held(self, run_id: str) -> bool:
        """Whether a worker (of any instance) may still write to the run: its lease is live."""
        return bool(
            await self.db.fetch_val(
                "SELECT 1 FROM extract_runs WHERE id = :id AND lease_token IS NOT NULL "
                "AND lease_expires_at >= :now",
                {"id": run_id, "now": iso(self.clock())},
            )
        )

    async def renew(self, held: Collection[str]) -> None:
        """Extend the leases of the runs this instance's workers hold (its heartbeat).

        Only those: a run 'running' here that no worker holds any more (a message that
        could not be applied, its worker gone) lets its lease lapse, and the reaper fails
        it as interrupted and retries it, rather than it staying 'running' for good.
        """
        if not held:
            return
        ids = {f"r{i}": run_id for i, run_id in enumerate(sorted(held))}
        await self.db.execute(
            "UPDATE extract_runs SET lease_expires_at = :until WHERE instance_id = :me "
            f"AND status = {RUNNING} AND lease_token IS NOT NULL "
            f"AND id IN ({', '.join(':' + name for name in ids)})",
            {"until": iso(self.clock() + self.lease), "me": self.instance_id, **ids},
        )

    async def cancelled_here(self) -> list[str]:
        """Runs this instance's workers hold that were cancelled, maybe through another instance."""
        rows = await self.db.fetch_all(
            "SELECT id FROM extract_runs WHERE instance_id = :me AND status = 'cancelled' "
            "AND lease_token IS NOT NULL",
            {"me": self.instance_id},
        )
        return [row["id"] for row in rows]

    async def queue(self, extract: dict[str, Any], triggered_by: TriggeredBy) -> str | None:
        """Insert a queued run; None when the extract already has an active one (unique index).

        The index's refusal is no error (ON CONFLICT DO NOTHING), so a caller's transaction
        goes on: the scheduler's, which also moves the extract's due time (``Scheduler.tick``).
        """
        run_id, now = new_id("run"), self.dialect.now
        snapshot = {key: extract[key] for key in SNAPSHOT_FIELDS}
        # The time is SQLite's, read once the write lock is held: runs are stamped in
        # the order they were inserted, however long one waited for the lock. The name is the
        # one read with the configuration: the row's own, renamed by a PUT since, would give
        # the run a name and a configuration the extract never had together.
        inserted = await self.db.fetch_one(
            "INSERT INTO extract_runs (id, extract_id, extract_name, status, progress, "
            "progress_detail, triggered_by, config_snapshot, created_at, updated_at) "
            f"SELECT :id, id, :name, {QUEUED}, 0, :detail, :by, :snapshot, {now}, {now} "
            "FROM extracts WHERE id = :extract AND deleted_at IS NULL AND enabled = 1 "
            "ON CONFLICT DO NOTHING RETURNING id",
            {
                "id": run_id,
                "name": extract["name"],
                "detail": dumps(progress_detail(Phase.QUEUED)),
                "by": triggered_by.value,
                "snapshot": dumps(snapshot),
                "extract": extract["id"],
                **self.dialect.now_params,
            },
        )
        if inserted is None:  # an active run already, or deleted or disabled since the caller read it
            return None
        self.queued.set()
        return run_id

    async def active_run(self, extract_id: str) -> dict[str, Any] | None:
        """The extract's active run (id, status, not_before), if it has one."""
        row = await self.db.fetch_one(
            f"SELECT id, status, not_before FROM extract_runs WHERE extract_id = :id AND status IN {ACTIVE}",
            {"id": extract_id},
        )
        return None if row is None else dict(row._mapping)

    async def cancel_active(self, extract_id: str) -> str | None:
        """Cancel the extract's active run at once; its worker, if any, is told by the caller."""
        row = await self.db.fetch_one(
            f"UPDATE extract_runs SET {self.ending()} "
            f"WHERE extract_id = :extract AND status IN {ACTIVE} RETURNING id",
            {"status": RunStatus.CANCELLED.value, "now": now_iso(), "extract": extract_id},
        )
        return None if row is None else row["id"]

    async def claim(self) -> Job | None:
        """The oldest queued run that may start, now 'running', as the job its worker gets.

        None when none waits. A retry that may no longer start (``_retry_stopped``) ends
        instead, failed for good, and the next one is tried.
        """
        while True:
            now = iso(self.clock())
            row = await self.db.fetch_one(
                f"UPDATE extract_runs SET status = {RUNNING}, started_at = :now, updated_at = :now, "
                "instance_id = :me, lease_token = :token, lease_expires_at = :until "
                f"WHERE id = (SELECT id FROM extract_runs WHERE status = {QUEUED} "
                "AND (not_before IS NULL OR not_before <= :now) "
                f"ORDER BY {self.dialect.queue_order} LIMIT 1{self.dialect.claim_lock}) "
                f"AND status = {QUEUED} "
                "RETURNING id, extract_id, extract_name, config_snapshot, created_at, triggered_by, "
                "attempt, lease_token",
                {
                    "now": now,
                    "me": self.instance_id,
                    "token": secrets.token_hex(8),
                    "until": iso(self.clock() + self.lease),
                },
            )
            if row is None:
                return None
            stopped = row["triggered_by"] == TriggeredBy.RETRY and await self._retry_stopped(row)
            if stopped:
                await self.finish(row["id"], stopped, row["lease_token"])
                continue
            break
        return {
            "run_id": row["id"],
            "extract_id": row["extract_id"],
            "extract_name": row["extract_name"],
            "source": self.source,
            "storage": str(self.storage),
            "storage_endpoint": self.storage.endpoint,
            "min_free_bytes": self.min_free_bytes,
            "created_at": row["created_at"],
            "config": orjson.loads(row["config_snapshot"]),
            "lease": row["lease_token"],
        }

    async def record_progress(self, run_id: str, progress: Progress, lease: str) -> None:
        progress_sql = self.dialect.greatest(
            "progress", self.dialect.least("CAST(:progress AS integer)", "99")
        )
        await self.db.execute(
            f"UPDATE extract_runs SET progress = {progress_sql}, "
            "progress_detail = :detail, updated_at = :now "
            f"WHERE id = :id AND status = {RUNNING} AND lease_token = :lease",
            {
                "progress": int(progress["progress"]),
                "detail": dumps(progress["progress_detail"]),
                "now": now_iso(),
                "id": run_id,
                "lease": lease,
            },
        )

    async def record_artifact(self, job: Job, artifact: Artifact, artifact_id: str) -> bool:
        """The row of a file in place; False when the run already has a file of that name.

        ``artifact_id`` is made once per message: applied again after a locked write,
        the message inserts nothing more, while another file of the same name (letter
        case aside) still conflicts, and then the run fails at once (SPEC: Artifacts).
        """
        now = now_iso()
        values = {
            "id": artifact_id,
            "run_id": job["run_id"],
            "extract_id": job["extract_id"],
            **{key: artifact[key] for key in ("artifact_type", "artifact_name", "schema_name", "part")},
            "storage_path": self.storage.storage_path(job["run_id"], artifact["artifact_name"]),
            "storage_backend": self.storage.backend,
            **{key: artifact[key] for key in ("format", "content_type", "size_bytes", "records")},
            "checksum": artifact["checksum"],
            "crc32": artifact["crc32"],
            "is_primary": int(artifact["is_primary"]),
            "created_at": now,
            "expires_at": plus_days(now, job["config"]["retention_days"]),
        }
        # Only while the run carries this worker's lease (fenced), from a SELECT: typed
        # columns are cast, since PostgreSQL cannot type a bare parameter in a select list.
        typed = {"part", "size_bytes", "records", "crc32", "is_primary"}
        selected = ", ".join(f"CAST(:{c} AS {'bigint' if c in typed else 'text'})" for c in values)
        try:
            await self.db.execute(
                f"INSERT INTO extract_artifacts ({', '.join(values)}) SELECT {selected} FROM extract_runs "
                "WHERE id = :run_id AND lease_token = :lease ON CONFLICT (id) DO NOTHING",
                values | {"lease": job["lease"]},
            )
        except Exception as exc:
            if not self.dialect.unique_violation(exc):
                raise
            error = (
                f"The run wrote a second file named {artifact['artifact_name']} (letter case aside), "
                "which was not recorded; the run was stopped. Report this as a bug in the file naming"
            )
            await self.finish(
                job["run_id"],
                failure(
                    error, "DuplicateArtifactName", retryable=False, artifact_name=artifact["artifact_name"]
                ),
                job["lease"],
            )
            return False
        return True

    async def _retry_stopped(self, retry: Any) -> Result | None:
        """Why a waiting retry may no longer start, as its failure: its extract disabled or
        deleted, or its ``max_attempts`` lowered under this attempt meanwhile; None: it may."""
        extract = await self.db.fetch_one(
            "SELECT enabled = 1 AND deleted_at IS NULL AS runnable, max_attempts FROM extracts "
            "WHERE id = :id",
            {"id": retry["extract_id"]},
        )
        if not extract["runnable"]:
            error = "The extract was disabled or deleted while this retry waited: not retried"
            return failure(error, "ExtractDisabled", retryable=False)
        if retry["attempt"] > extract["max_attempts"]:
            error = (
                f"The extract's max_attempts was lowered to {extract['max_attempts']} while this "
                f"retry (attempt {retry['attempt']}) waited: not retried"
            )
            return failure(error, "AttemptsLowered", retryable=False)
        return None

    async def finish(self, run_id: str, result: Result, lease: str | None) -> bool:
        """End a running run as its result says; a run cancelled (or failed) meanwhile stays so.
        Returns whether this call ended it.

        One transaction: the counts, the ending and, for a transient failure with
        attempts left, the retry (SPEC: Retries). Fenced: nothing changes unless the
        run still carries ``lease`` (None: a run of a state file older than leases).
        """
        status = RunStatus(result["status"])
        if status not in (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED):
            status = RunStatus.FAILED
        values = {"records": result["records_exported"], "schemas": result["schemas_exported"], "id": run_id}
        fence = " AND lease_token IS NULL" if lease is None else " AND lease_token = :lease"
        held = {} if lease is None else {"lease": lease}

        async def end() -> bool | None:  # None: fenced off, or ended already; else retrying
            # A write first: the transaction holds the write lock before it reads anything. The
            # lease is let go here: no worker holds the run any more (a cancelled one included).
            counted = await self.db.fetch_one(
                "UPDATE extract_runs SET records_exported = :records, schemas_exported = :schemas, "
                "artifacts_created = (SELECT count(*) FROM extract_artifacts WHERE run_id = :id), "
                "total_size_bytes = (SELECT coalesce(sum(size_bytes), 0) FROM extract_artifacts "
                f"WHERE run_id = :id), lease_token = NULL, lease_expires_at = NULL WHERE id = :id{fence} "
                "RETURNING status",
                values | held,
            )
            if counted is None or counted["status"] != RunStatus.RUNNING:  # fenced off, or ended
                return None
            run = await self.db.fetch_one(
                "SELECT r.attempt, r.extract_id, r.extract_name, r.config_snapshot, e.max_attempts, "
                "e.retry_delay_seconds, e.enabled = 1 AND e.deleted_at IS NULL AS runnable "
                "FROM extract_runs r JOIN extracts e ON e.id = r.extract_id WHERE r.id = :id",
                {"id": run_id},
            )
            error, retrying = result["error"], False
            if status is RunStatus.FAILED and (result["error_detail"] or {}).get("retryable"):
                # An attempt past a max_attempts lowered while it ran is the last one too.
                error = f"{error} (attempt {run['attempt']} of {max(run['attempt'], run['max_attempts'])})"
                retrying = run["attempt"] < run["max_attempts"] and bool(run["runnable"])
            completed = status is RunStatus.COMPLETED
            await self.db.execute(
                f"UPDATE extract_runs SET {self.ending(*(['records_exported'] if completed else []))}, "
                "error = :error, error_detail = :error_detail"
                + (", progress = 100" if completed else "")
                + " WHERE id = :id",
                {
                    "status": status.value,
                    "now": now_iso(),
                    "error": error,
                    "error_detail": dumps(result["error_detail"]),
                    "id": run_id,
                    **({"records_exported": values["records"]} if completed else {}),
                },
            )
            if retrying:  # no longer active: the one-active-run index lets its retry in
                retry = await self._queue_retry(run_id, dict(run._mapping))
                await self.db.execute(
                    "UPDATE extract_runs SET retry_run_id = :retry WHERE id = :id",
                    {"retry": retry, "id": run_id},
                )
            return retrying

        ended = await in_transaction(self.db, end)
        if ended is None:
            return False
        if ended:
            self.queued.set()
        return True

    async def _queue_retry(self, failed_id: str, run: dict[str, Any]) -> str:
        """Insert the retry of a failed run (inside ``finish``'s transaction); returns its id."""
        retry_id, now = new_id("run"), self.dialect.now
        wait = retry_wait(run["retry_delay_seconds"], run["attempt"], self.jitter())
        await self.db.execute(
            "INSERT INTO extract_runs (id, extract_id, extract_name, status, progress, progress_detail, "
            "triggered_by, config_snapshot, created_at, updated_at, attempt, retry_of, not_before) "
            f"VALUES (:id, :extract, :name, {QUEUED}, 0, :detail, :by, :snapshot, {now}, {now}, "
            ":attempt, :retry_of, :not_before)",
            {
                "id": retry_id,
                "extract": run["extract_id"],
                "name": run["extract_name"],
                "detail": dumps(progress_detail(Phase.QUEUED)),
                "by": TriggeredBy.RETRY.value,
                "snapshot": run["config_snapshot"],
                "attempt": run["attempt"] + 1,
                "retry_of": failed_id,
                "not_before": iso(self.clock() + wait),
                **self.dialect.now_params,
            },
        )
        return retry_id

    async def start_now(self, run_id: str) -> bool:
        """A waiting retry starts at once (a run request while it waits); False if it is not waiting."""
        row = await self.db.fetch_one(
            "UPDATE extract_runs SET not_before = :now, updated_at = :now "
            f"WHERE id = :id AND status = {QUEUED} AND not_before IS NOT NULL RETURNING id",
            {"now": iso(self.clock()), "id": run_id},
        )
        if row is not None:
            self.queued.set()
        return row is not None

    async def next_start(self) -> datetime | None:
        """When the earliest waiting retry may start (the dispatcher sleeps until then)."""
        text = await self.db.fetch_val(
            f"SELECT min(not_before) FROM extract_runs WHERE status = {QUEUED} AND not_before > :now",
            {"now": iso(self.clock())},
        )
        return None if text is None else parse_iso(text)

    async def put_back(self, unfinished: set[str]) -> list[str] | None:
        """A stop's requeue (``requeue``), then the leftovers of ``unfinished`` runs it did not
        requeue; the runs requeued, or None when the state stayed busy.

        Another process holding the state past the busy timeout must not hold the stop: a run
        left 'running' is failed as interrupted at the next start (or by another instance once
        its lease lapses) and retried, as after a crash.
        """
        try:
            requeued = await self.requeue()
            for run_id in unfinished - set(requeued):
                await self.remove_leftovers(run_id)
        except Exception as exc:
            if not self.dialect.busy(exc):
                raise
            log.warning(
                "could not put the active runs back in the queue, the state stayed busy (%s): "
                "the next start fails them as interrupted and retries them",
                exc,
            )
            return None
        return requeued

    async def requeue(self, run_ids: list[str] | None = None) -> list[str]:
        """Put interrupted runs back in the queue (None: every 'running' run); returns their ids.

        The status change is won first, in the transaction that removes the run's
        artifact rows; only then do its partial files go. A run that completed,
        failed or was cancelled meanwhile keeps everything.
        """
        values = {"detail": dumps(progress_detail(Phase.QUEUED)), "now": now_iso(), "me": self.instance_id}
        requeue = (
            f"UPDATE extract_runs SET status = {QUEUED}, progress = 0, progress_detail = :detail, "
            "started_at = NULL, updated_at = :now, instance_id = NULL, lease_token = NULL, "
            f"lease_expires_at = NULL WHERE status = {RUNNING} AND instance_id = :me"
        )

        async def take_back() -> list[str]:
            if run_ids is None:
                # A read first: with none of its runs running (an idle stop) no write is needed,
                # and a state another process holds locked (a read still passes) holds up nothing.
                mine = await self.db.fetch_val(
                    f"SELECT count(*) FROM extract_runs WHERE status = {RUNNING} AND instance_id = :me",
                    {"me": self.instance_id},
                )
                rows = await self.db.fetch_all(requeue + " RETURNING id", values) if mine else []
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
            return won

        won = await in_transaction(self.db, take_back)
        for run_id in won:  # what stays (the storage failing) the next attempt clears (begin_run)
            await self._tidy(self.storage.delete_run, run_id)
        if won:
            self.queued.set()
        return won

    async def delete_files(self, run_id: str) -> None:
        """Delete a run's files and mark its artifact rows deleted.

        Raises OSError when the files cannot be removed (say, read-only storage):
        the rows must not claim files gone that are still there.
        """
        self.deleting.add(run_id)
        try:
            await asyncio.to_thread(self.storage.delete_run, run_id)
            await self.db.execute(
                "UPDATE extract_artifacts SET deleted_at = :now WHERE run_id = :id AND deleted_at IS NULL",
                {"now": now_iso(), "id": run_id},
            )
        finally:
            self.deleting.discard(run_id)
