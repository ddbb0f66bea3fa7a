"""What happens on a clock: scheduled runs (SPEC: Scheduling) and the retention sweep (SPEC: Retention).

Both loops survive their own errors (a locked state file, a source gone): they
log and try again at their next turn. The clock is injectable for the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from functools import partial
from typing import Any

from databases import Database

from extracts.config import EXTRACT_FIELDS
from extracts.cron import next_due
from extracts.records import to_record
from extracts.runs import Runs
from extracts.state import TriggeredBy, in_transaction, iso, utcnow
from extracts.storage import Storage, StorageError, StoreUnavailable

log = logging.getLogger("extracts.schedule")

TICK_S = 1.0
_NUMBERS = re.compile(r"\d+(?:\.\d+)?")
Leads = Callable[[str], Awaitable[bool]]


async def always(job: str) -> bool:
    """The one instance of a state leads every job."""
    return True


class Failures:
    """How a step that fails at every turn is logged: the first failure with its traceback,
    the same failure again once a minute in one line, and one line when the step works again.

    A state volume that stays full, or a state server that stays down, would otherwise
    write a traceback every second for as long as it lasts.
    """

    REPEAT_EVERY_S = 60.0

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self.logger, self.what = logger, what
        self.count = 0
        self._said: tuple[str, float] | None = None  # the failure last logged, and when

    def failed(self, exc: BaseException) -> None:
        """Log ``exc`` (call from its ``except`` block)."""
        self.count += 1
        cause = f"{type(exc).__name__}: {exc}"
        alike = _NUMBERS.sub("#", cause)  # "… in 33.34µs", "… (pid 4242)": the same cause
        now = time.monotonic()
        if self._said is None or self._said[0] != alike:
            self.logger.error("%s failed", self.what, exc_info=exc)
        elif now - self._said[1] >= self.REPEAT_EVERY_S:
            self.logger.error("%s still failing (%d times in a row): %s", self.what, self.count, cause)
        else:
            return
        self._said = (alike, now)

    def succeeded(self) -> None:
        if self.count:
            self.logger.warning("%s works again after %d failures in a row", self.what, self.count)
        self.count, self._said = 0, None


async def every(
    seconds: float, step: Callable[[], Awaitable[object]], what: str, stopping: asyncio.Event
) -> None:
    """Run ``step`` every ``seconds`` until ``stopping`` is set; a failed step is logged
    (``Failures``) and tried again next time. A step is never cut short: the service waits for
    it when it stops (a statement cancelled while it waits on a busy state would hold up the
    ones after it)."""
    failures = Failures(log, what)
    while not stopping.is_set():
        try:
            await step()
        except Exception as exc:  # noqa: BLE001 — e.g. the state file locked: the next turn retries
            failures.failed(exc)
        else:
            failures.succeeded()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), seconds)


async def next_run_at(config: dict[str, Any], now: datetime, keep: str | None = None) -> str | None:
    """The next due time of an extract (None when not scheduled); ``keep`` when still valid."""
    if not (config.get("schedule_enabled") and config.get("enabled", True) and config.get("schedule")):
        return None
    if keep:
        return keep
    return await asyncio.to_thread(next_due, config["schedule"], now)


class Scheduler:
    """Starts a run of every scheduled extract that is due, one per tick however many slots passed."""

    def __init__(
        self, db: Database, runs: Runs, clock: Callable[[], datetime] = utcnow, leads: Leads = always
    ) -> None:
        self.db, self.runs, self.clock, self.leads = db, runs, clock, leads

    async def run_forever(self, stopping: asyncio.Event) -> None:
        await every(TICK_S, self.tick, "scheduler tick", stopping)

    async def tick(self) -> list[str]:
        """Queue every due extract; returns the runs started. A due time while running is skipped.

        One instance at a time ticks (``leads``), so a due time starts one run, not one per instance.
        """
        if not await self.leads("scheduler"):
            return []
        now = self.clock()
        columns = ", ".join(["id", "next_run_at", *(f.name for f in EXTRACT_FIELDS)])
        rows = await self.db.fetch_all(
            f"SELECT {columns} FROM extracts WHERE schedule_enabled = 1 AND enabled = 1 AND "
            "deleted_at IS NULL AND next_run_at IS NOT NULL AND next_run_at <= :now",
            {"now": iso(now)},
        )
        started = []
        for row in rows:
            extract = to_record(row)
            # None (no longer scheduled) for a schedule saved before it would have been refused.
            following = await asyncio.to_thread(next_due, extract["schedule"], now)
            if following is None:
                log.warning(
                    "extract %s: its schedule %r is never due as cron reads it (a range that runs "
                    "backwards?): it runs no more until the schedule is fixed (PUT)",
                    extract["id"],
                    extract["schedule"],
                )
            taken, run_id = await in_transaction(self.db, partial(self._start, extract, following))
            if run_id is not None:
                self.runs.queued.set()  # committed now: the dispatcher finds it
                started.append(run_id)
            elif taken:
                log.info("extract %s due but already running: this due time is skipped", extract["id"])
        return started

    async def _start(self, extract: dict[str, Any], following: str | None) -> tuple[bool, str | None]:
        """Take the due time read (move ``next_run_at`` on) and queue its run, in one transaction.

        Not taken (False) when ``next_run_at`` is no longer what was read: this instance stalled
        since it read it, and another one led meanwhile and started it.
        """
        taken = await self.db.fetch_one(
            "UPDATE extracts SET next_run_at = :next WHERE id = :id AND next_run_at = :due RETURNING id",
            {"next": following, "id": extract["id"], "due": extract["next_run_at"]},
        )
        if taken is None:
            return False, None
        return True, await self.runs.queue(extract, TriggeredBy.SCHEDULE)


class Sweeper:
    """Deletes the files of expired artifacts, and empty run directories; the records stay.

    A file that cannot be deleted (a directory now bears its name, the store refuses) is
    logged and left recorded, to be tried again: it never holds back the others.
    """

    def __init__(
        self,
        db: Database,
        storage: Storage,
        interval: float,
        active: Callable[[], set[str]],
        clock: Callable[[], datetime] = utcnow,
        leads: Leads = always,
    ) -> None:
        self.db, self.storage, self.interval = db, storage, interval
        self.active, self.clock, self.leads = active, clock, leads

    async def run_forever(self, stopping: asyncio.Event) -> None:
        await every(self.interval, self.sweep, "retention sweep", stopping)

    async def sweep(self) -> int:
        """One sweep; returns how many artifacts expired (one instance at a time sweeps)."""
        if not await self.leads("retention sweep"):
            return 0
        now = iso(self.clock())
        rows = await self.db.fetch_all(
            "SELECT id, storage_path FROM extract_artifacts WHERE deleted_at IS NULL AND expires_at <= :now",
            {"now": now},
        )
        for done, row in enumerate(rows):
            try:
                await asyncio.to_thread(self.storage.delete, row["storage_path"])
            except StoreUnavailable as exc:
                # The store itself failed (down, refusing): every other delete would fail as well,
                # each after its retries, a line each. All wait for the next sweep.
                log.warning(
                    "retention sweep: stopped, %d expired files left for the next sweep: %s",
                    len(rows) - done,
                    exc,
                )
                return len(rows)
            except (OSError, StorageError) as exc:  # that file stays recorded; the others still go
                log.warning(
                    "retention sweep: cannot delete %s (tried again next sweep): %s", row["storage_path"], exc
                )
                continue
            await self.db.execute(
                "UPDATE extract_artifacts SET deleted_at = :now WHERE id = :id", {"now": now, "id": row["id"]}
            )
        await asyncio.to_thread(self.storage.remove_empty_runs, self.active())
        return len(rows)
