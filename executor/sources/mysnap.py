"""Several MariaDB connections in one snapshot, for reading one table in parallel.

InnoDB cannot hand one transaction's snapshot to another connection (as
PostgreSQL's ``pg_export_snapshot`` does). Two ``START TRANSACTION WITH
CONSISTENT SNAPSHOT`` see the same state only when nothing committed between
them, so they start while a third connection holds MariaDB's
``BACKUP STAGE BLOCK_COMMIT`` (the lock ``mariabackup`` takes): commits wait
for those few milliseconds, reads and writes do not. As mydumper does, and
only where it can be done safely:

* MariaDB only; the account needs the ``RELOAD`` privilege. MySQL has no
  lock that blocks only commits (``FLUSH TABLES WITH READ LOCK`` also waits for
  every running query), so a MySQL read keeps one connection.
* A lock that is not granted within a second (another backup running), a
  privilege missing, a connection refused (the server's or the account's
  limit): the read keeps one connection. Helpers are an optimisation, never a
  reason for a run to fail.
* Only when the database has a table big enough to be worth it
  (``PARALLEL_MIN_BYTES``): a small export never makes other clients' commits
  wait.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress

import pymysql

# A table smaller than this is read by one connection (executor.sources.myread splits no further).
PARALLEL_MIN_BYTES = 16 << 20
# A table's size in information_schema.TABLES. InnoDB's DATA_LENGTH is a statistic, refreshed by
# ANALYZE TABLE or once a tenth of the rows changed (never with STATS_AUTO_RECALC=0), while
# TABLE_ROWS follows every insert: a table just loaded shows 16 KiB for millions of rows. Taken
# as at least 64 bytes a row, such a table is read in parallel and in ranges of about 1 MiB,
# not by one connection whose first range was the whole table, read again in halves.
TABLE_SIZE_SQL = "CAST(GREATEST(DATA_LENGTH, COALESCE(TABLE_ROWS, 0) * 64) AS UNSIGNED)"

_START = "START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY"
# wait_timeout: a worker frozen (or cut off) while it holds BLOCK_COMMIT would make every commit
# on the server wait for as long as it is frozen; the server closes the silent locker's
# connection after 2 s instead, which ends the stage.
_LOCK = (
    "SET SESSION lock_wait_timeout = 1",
    "SET SESSION wait_timeout = 2",
    "BACKUP STAGE START",
    "BACKUP STAGE BLOCK_COMMIT",
)


class Helpers:
    """The connections that read beside the main one, inside its snapshot, until it ends."""

    def __init__(self, connect: Callable[[], pymysql.Connection]) -> None:
        self._connect = connect
        self.connections: list[pymysql.Connection] = []

    def begin(self, main: pymysql.Connection, wanted: int) -> None:
        """Start ``main``'s snapshot; with up to ``wanted`` helpers in the same one where possible."""
        if wanted > 0 and self._worth_it(main):
            self.connections = self._start_together(main, wanted)
            if self.connections:
                return
        _run(main, _START)

    def _worth_it(self, main: pymysql.Connection) -> bool:
        with main.cursor() as cursor:
            cursor.execute(
                f"SELECT MAX({TABLE_SIZE_SQL}) FROM information_schema.TABLES"
                " WHERE TABLE_SCHEMA = DATABASE() AND ENGINE = 'InnoDB'"
            )
            (biggest,) = cursor.fetchone() or (None,)
        return (biggest or 0) >= PARALLEL_MIN_BYTES

    def _start_together(self, main: pymysql.Connection, wanted: int) -> list[pymysql.Connection]:
        """The helpers, each in a transaction on ``main``'s state; [] when they cannot be had."""
        opened: list[pymysql.Connection] = []
        try:
            for _ in range(wanted + 1):  # the helpers, and the connection that holds the lock
                opened.append(self._connect())
        except Exception:  # noqa: BLE001 — any refusal: read with one connection
            _close(opened)
            return []
        locker, helpers = opened[0], opened[1:]
        stage = CommitsBlocked(locker)
        try:
            stage.begin()
        except pymysql.err.MySQLError:  # no RELOAD privilege, another backup, not MariaDB
            _close(opened)
            return []
        try:
            for conn in (main, *helpers):
                _run(conn, _START)
        except BaseException:
            _close(helpers)
            raise
        finally:
            held = stage.end()
        if not held:  # commits may have passed between the starts: the helpers' states may differ
            _close(helpers)
            return []
        return helpers

    def thread_ids(self) -> list[int]:
        return [conn.thread_id() for conn in self.connections if conn.open]

    def close(self) -> None:
        """The main transaction ends: so do the helpers' (they only ever read)."""
        _close(self.connections)
        self.connections = []


class CommitsBlocked:
    """``BACKUP STAGE BLOCK_COMMIT``, held by a connection of its own from ``begin`` to ``end``."""

    def __init__(self, locker: pymysql.Connection) -> None:
        self.locker = locker

    def begin(self) -> None:
        for statement in _LOCK:
            _run(self.locker, statement)

    def end(self) -> bool:
        """End the stage and close the locker. Whether the stage lasted until now: False when
        the server closed the locker's connection meanwhile (``wait_timeout``: this process
        stalled in between), and commits may have passed."""
        try:
            _run(self.locker, "BACKUP STAGE END")
        except (pymysql.err.MySQLError, OSError):
            return False
        finally:
            _close([self.locker])
        return True


def _run(conn: pymysql.Connection, statement: str) -> None:
    with conn.cursor() as cursor:
        cursor.execute(statement)


def _close(connections: list[pymysql.Connection]) -> None:
    for conn in connections:
        with suppress(pymysql.err.MySQLError, OSError):
            conn.close()
