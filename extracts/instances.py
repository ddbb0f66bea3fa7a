"""This instance among those serving one state (SPEC: Beyond one machine).

Every few seconds it heartbeats its row in ``extracts_instances``, renews the
leases of the runs its workers hold, and fails as interrupted (then retries)
the runs whose lease expired — their instance died, froze or lost its network.
A job only one instance may do at a time (the scheduler, the retention sweep)
is led through a lease row in ``extracts_leaders``: the leader renews it; when
it lapses another instance takes it. With a SQLite state there is one instance
(start-up refuses a second), and the same code simply always leads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from datetime import datetime
from typing import Any

from databases import Database

from extracts.pool import WorkerPool
from extracts.runs import Runs
from extracts.schedule import every
from extracts.state import heartbeat_seconds, iso

log = logging.getLogger("extracts.instances")

CANCEL_POLL_S = 0.5  # a run cancelled through another instance stops within 2 s


class Instance:
    """This process's heartbeat, leases and leadership."""

    def __init__(self, db: Database, runs: Runs, pool: WorkerPool, shared: bool) -> None:
        self.db, self.runs, self.pool, self.shared = db, runs, pool, shared
        self.id = runs.instance_id

    @property
    def clock(self) -> Callable[[], datetime]:
        return self.runs.clock

    @property
    def heartbeat_s(self) -> float:
        return heartbeat_seconds(self.runs.lease.total_seconds())

    async def start(self) -> None:
        now = iso(self.clock())
        if not self.shared:
            # A SQLite state has one instance (start-up refuses a second): any other row is one
            # that crashed or was killed. Its heartbeat listed it as live for a lease more, and
            # its leader rows held the scheduler and the retention sweep for as long, so the
            # sweep at start-up was skipped and the next came an interval (an hour) later.
            await self.db.execute("DELETE FROM extracts_leaders")
            await self.db.execute("DELETE FROM extracts_instances")
        await self.db.execute(
            "INSERT INTO extracts_instances (id, host, pid, started_at, heartbeat_at, workers, active_runs) "
            "VALUES (:id, :host, :pid, :now, :now, :workers, 0)",
            {
                "id": self.id,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "now": now,
                "workers": self.pool.workers,
            },
        )

    async def stop(self) -> None:
        """A graceful stop: this instance leaves the list, and what it led is free at once."""
        with contextlib.suppress(Exception):
            await self.db.execute("DELETE FROM extracts_leaders WHERE instance_id = :me", {"me": self.id})
            await self.db.execute("DELETE FROM extracts_instances WHERE id = :me", {"me": self.id})

    async def run_forever(self, stopping: asyncio.Event) -> None:
        """Heartbeat, renew, reap; with a shared state also watch for cancels made elsewhere."""
        loops = [every(self.heartbeat_s, self.beat, "heartbeat", stopping)]
        if self.shared:
            loops.append(every(CANCEL_POLL_S, self.pass_on_cancels, "cancel watch", stopping))
        await asyncio.gather(*loops)

    async def beat(self) -> None:
        now = iso(self.clock())
        await self.db.execute(
            "UPDATE extracts_instances SET heartbeat_at = :now, active_runs = :active WHERE id = :me",
            {"now": now, "active": len(self.pool.active()), "me": self.id},
        )
        await self.runs.renew(self.pool.active())
        for run_id in await self.runs.reap():
            log.warning("run %s lost its instance (lease expired): failed as interrupted", run_id)

    async def pass_on_cancels(self) -> None:
        """Tell this instance's workers about their runs cancelled through any instance."""
        for run_id in await self.runs.cancelled_here():
            await self.pool.cancel(run_id)

    async def leads(self, job: str) -> bool:
        """Whether this instance does ``job`` now: it holds (or just took) the job's lease row."""
        now = self.clock()
        values = {"job": job, "me": self.id, "now": iso(now), "until": iso(now + self.runs.lease)}
        row = await self.db.fetch_one(
            "UPDATE extracts_leaders SET instance_id = :me, expires_at = :until "
            "WHERE name = :job AND (instance_id = :me OR expires_at < :now) RETURNING name",
            values,
        )
        if row is not None:
            return True
        row = await self.db.fetch_one(
            "INSERT INTO extracts_leaders (name, instance_id, expires_at) VALUES (:job, :me, :until) "
            "ON CONFLICT (name) DO NOTHING RETURNING name",
            {key: values[key] for key in ("job", "me", "until")},
        )
        return row is not None

    async def live(self) -> list[dict[str, Any]]:
        """``GET /api/instances``: the instances whose heartbeat is younger than a lease."""
        since = iso(self.clock() - self.runs.lease)
        rows = await self.db.fetch_all(
            "SELECT id, host, pid, started_at, heartbeat_at, workers, active_runs FROM extracts_instances "
            "WHERE heartbeat_at >= :since ORDER BY started_at, id",
            {"since": since},
        )
        return [dict(row._mapping) for row in rows]
