"""The SQL that differs between the two state databases: SQLite (embedded) and PostgreSQL.

Every statement the service runs is written once; where SQLite and PostgreSQL
spell a thing differently (the time now as ISO text, a run's duration, setting
one field of a JSON column, the oldest queued run claimed by one instance only,
which errors mean "try again"), the statement asks its ``Dialect``.
"""

from __future__ import annotations

import sqlite3
from typing import Any


class Dialect:
    """SQLite's spelling; ``PostgresDialect`` overrides what PostgreSQL spells otherwise."""

    name = "sqlite"
    # now_iso() in SQL: the same text (milliseconds, Z), from the database's clock, read once
    # the write lock is held. The format is bound: `databases` reads a literal '%' as its own.
    now = "strftime(:now_format, 'now')"
    now_params: dict[str, Any] = {"now_format": "%Y-%m-%dT%H:%M:%fZ"}
    # Ties between runs queued in the same millisecond go in insertion order.
    queue_order = "created_at, rowid"
    # Claims need no row lock: SQLite has one writer at a time.
    claim_lock = ""
    # A run's artifacts in the order they were recorded (the ZIP's entries).
    artifact_order = "rowid"

    def duration(self, start: str = "started_at", end: str = ":now") -> str:
        """Seconds (to the millisecond) from ``start`` to ``end``, both ISO text."""
        return f"round((julianday({end}) - julianday({start})) * 86400, 3)"

    def json_set(self, column: str, fields: dict[str, tuple[str, str]]) -> str:
        """``column`` (JSON text) with each field set to a bound parameter: field → (name, SQL type)."""
        pairs = "".join(f", '$.{field}', :{param}" for field, (param, _) in fields.items())
        return f"json_set({column}{pairs})"

    def greatest(self, *terms: str) -> str:
        return f"max({', '.join(terms)})"

    def least(self, *terms: str) -> str:
        return f"min({', '.join(terms)})"

    def unique_violation(self, exc: BaseException) -> bool:
        """``exc`` is a UNIQUE constraint refusing a row (one active run, one artifact name)."""
        return isinstance(exc, sqlite3.IntegrityError) and "UNIQUE" in str(exc)

    def busy(self, exc: BaseException) -> bool:
        """``exc`` is the state database being busy past its timeout, or its volume full (SQLITE_FULL,
        as PostgreSQL's 53100 is): the same write can be retried, and works once there is room."""
        return isinstance(exc, sqlite3.OperationalError) and (
            "locked" in str(exc) or "database or disk is full" in str(exc)
        )


class PostgresDialect(Dialect):
    """PostgreSQL's spelling (``--db postgresql://…``)."""

    name = "postgresql"
    now = "to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"
    now_params: dict[str, Any] = {}
    queue_order = "created_at, id"
    # Several instances claim at once: each skips the rows another is claiming.
    claim_lock = " FOR UPDATE SKIP LOCKED"
    artifact_order = "created_at, id"

    def duration(self, start: str = "started_at", end: str = ":now") -> str:
        # Through text first: a parameter is text wherever else the statement uses it.
        seconds = (
            f"extract(epoch FROM CAST(CAST({end} AS text) AS timestamptz) - CAST({start} AS timestamptz))"
        )
        return f"CAST(round(CAST({seconds} AS numeric), 3) AS double precision)"

    def json_set(self, column: str, fields: dict[str, tuple[str, str]]) -> str:
        value = f"CAST({column} AS jsonb)"
        for field, (param, sql_type) in fields.items():
            value = f"jsonb_set({value}, '{{{field}}}', to_jsonb(CAST(:{param} AS {sql_type})))"
        return f"CAST({value} AS text)"

    def greatest(self, *terms: str) -> str:
        return f"greatest({', '.join(terms)})"

    def least(self, *terms: str) -> str:
        return f"least({', '.join(terms)})"

    def unique_violation(self, exc: BaseException) -> bool:
        import asyncpg

        return isinstance(exc, asyncpg.UniqueViolationError)

    def busy(self, exc: BaseException) -> bool:
        """Also a session PostgreSQL ended (``state.postgres_session_settings``, a restart): asyncpg
        says so at the next statement, or at the commit, as an InterfaceError of a closed
        connection; or, when it read the session's last words but not yet its end (the instance
        was frozen), as its protocol not being idle ("cannot switch to state 11; another
        operation (2) is in progress"). The pool drops that connection; a retry gets a live one."""
        import asyncpg

        if isinstance(exc, asyncpg.InterfaceError) and "connection is closed" in str(exc):
            return True
        if isinstance(exc, asyncpg.InternalClientError) and "cannot switch to state" in str(exc):
            return True
        return isinstance(
            exc,
            asyncpg.SerializationError
            | asyncpg.DeadlockDetectedError
            | asyncpg.LockNotAvailableError
            | asyncpg.IdleInTransactionSessionTimeoutError
            | asyncpg.ConnectionDoesNotExistError
            # No session now: the server is stopping, restarting or starting (57P01-57P03),
            # or refuses more (53xxx: a role's connection limit, max_connections, its disk or
            # memory full). The pool opens sessions again later. Not the rest of class 57: a
            # statement a DBA cancelled (57014) or a database dropped (57P04) is no wait.
            | asyncpg.AdminShutdownError
            | asyncpg.CrashShutdownError
            | asyncpg.CannotConnectNowError
            | asyncpg.InsufficientResourcesError
            | OSError,
        )


SQLITE = Dialect()
POSTGRES = PostgresDialect()


def dialect_of(url: str) -> Dialect:
    """The dialect of ``--db``: PostgreSQL for ``postgresql://``/``postgres://``, else SQLite."""
    return POSTGRES if url.split("://", 1)[0].lower() in ("postgresql", "postgres") else SQLITE
