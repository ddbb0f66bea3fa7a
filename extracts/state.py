"""The service's own state, through ``databases``: a SQLite file (aiosqlite), or PostgreSQL (asyncpg).

Owns how the state is opened (per-connection PRAGMAs, WAL, ``schema.sql``,
migrations, connections kept open for the next query) and the small facts
every state row shares: ids, timestamps, JSON text, the ``triggered_by``
values. ``schema.sql`` is written once, in SQLite's dialect; PostgreSQL gets it
translated (``postgres_schema``). Run statuses and phases are named in
``executor.messages``, which the workers share too. Only the service writes
the state; worker processes never open it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import sqlite3
import string
import sys
from collections.abc import AsyncGenerator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import orjson
from databases import Database, DatabaseURL
from databases.backends.postgres import PostgresBackend
from databases.backends.sqlite import SQLiteConnection
from databases.core import Connection
from databases.interfaces import ConnectionBackend, DatabaseBackend, Record, TransactionBackend
from sqlalchemy.dialects.sqlite import pysqlite
from sqlalchemy.sql import ClauseElement

from extracts.dialects import POSTGRES, dialect_of

SCHEMA_VERSION = 4
BUSY_TIMEOUT_S = 15.0
DEFAULT_STALL_S = 5.0  # the heartbeat interval of the default 30 s lease (heartbeat_seconds)
DISCONNECT_S = 10  # a stop's wait for the state's connections to close

log = logging.getLogger(__name__)

T = TypeVar("T")


class TriggeredBy(str, Enum):
    """Mirrors the CHECK on extract_runs.triggered_by in schema.sql."""

    MANUAL = "manual"
    SCHEDULE = "schedule"
    API = "api"
    RETRY = "retry"


class FieldType(str, Enum):
    """The type of a record field: how it is stored, shown, and read from a list's filter."""

    TEXT = "text"
    INTEGER = "integer"
    NUMBER = "number"
    BOOLEAN = "boolean"  # 0/1 in the state file, true/false in a record
    TIMESTAMP = "timestamp"  # ISO 8601 text, as iso() writes it
    JSON = "json"  # JSON text in the state file, its value in a record; not filterable


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime | None) -> str | None:
    """ISO 8601 in UTC with millisecond precision and a Z suffix (sorts as text)."""
    if moment is None:
        return None
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# now_iso() in SQL: the same text (milliseconds, Z), from SQLite's clock. The
# format is bound (SQL_NOW_PARAMS): `databases` reads a literal '%' as its own.
SQL_NOW = "strftime(:now_format, 'now')"
SQL_NOW_PARAMS = {"now_format": "%Y-%m-%dT%H:%M:%fZ"}
# A run's duration, in seconds to the millisecond, once :now is its end.
SQL_DURATION = "round((julianday(:now) - julianday(started_at)) * 86400, 3)"


def now_iso() -> str:
    return iso(utcnow())


def plus_days(text: str, days: int) -> str:
    return iso(parse_iso(text) + timedelta(days=days))


def new_id(prefix: str) -> str:
    """Opaque prefixed id: ``extract_…``, ``run_…``, ``artifact_…``."""
    return f"{prefix}_{secrets.token_hex(8)}"


def sql_list(values: tuple[str, ...]) -> str:
    """``('a', 'b')``: constant names for an SQL ``IN``, quoted here (never a tuple's repr)."""
    return "(" + ", ".join("'" + value.replace("'", "''") + "'" for value in values) + ")"


def dumps(value: Any) -> str | None:
    """JSON text for a JSON column (None stays NULL)."""
    return None if value is None else orjson.dumps(value).decode()


class StateConnection(sqlite3.Connection):
    """Every connection to the state file gets the PRAGMAs the service relies on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        self.execute("PRAGMA foreign_keys = ON")
        self.execute("PRAGMA synchronous = NORMAL")


def schema_sql() -> str:
    """schema.sql of the source checkout, or of the installed data dir."""
    for candidate in (
        Path(__file__).parent.parent / "schema.sql",
        Path(sys.prefix, "share", "extracts", "schema.sql"),
    ):
        if candidate.is_file():
            return candidate.read_text()
    raise FileNotFoundError("schema.sql not found in the source checkout nor in share/extracts")


def postgres_schema(sql: str) -> str:
    """schema.sql in PostgreSQL's words: 64-bit integers (as SQLite's), doubles, no rowid, and a
    case-insensitive index spelled with lower()."""
    sql = re.sub(r"\bINTEGER\b", "BIGINT", sql)
    sql = re.sub(r"\bREAL\b", "DOUBLE PRECISION", sql)
    sql = sql.replace("artifact_name COLLATE NOCASE", "lower(artifact_name)")
    return sql.replace("r.rowid DESC", "r.id DESC")


def heartbeat_seconds(lease_seconds: float) -> float:
    """How often an instance renews its runs' leases: a third of the lease, so that two
    heartbeats may be lost before a lease lapses (0.2 to 5 s)."""
    return max(min(lease_seconds / 3, 5.0), 0.2)


def postgres_session_settings(stall_seconds: float) -> dict[str, str]:
    """What every PostgreSQL state session sets: how long it may hold its locks silent, and wait.

    An instance frozen (SIGSTOP, a paused VM, its network gone) inside a
    transaction would keep its row locks for as long as it is frozen, and every
    other instance's heartbeat would wait on them: the whole cluster would look
    dead, its runs stuck. PostgreSQL ends a session that sits idle in a
    transaction longer than ``stall_seconds`` (its transaction rolls back, its
    locks go), and no lock is waited for longer; both errors are retried as a
    busy state is (``PostgresDialect.busy``, ``in_transaction``). Our
    transactions take milliseconds unless the process stalls: the heartbeat
    interval is the bound.
    """
    ms = str(max(int(stall_seconds * 1000), 1))
    return {"idle_in_transaction_session_timeout": ms, "lock_timeout": ms}


def _postgres_url(url: str) -> str:
    return url.replace("postgres://", "postgresql://", 1)


def _postgres_options(stall_seconds: float) -> dict[str, Any]:
    """The service's pool of PostgreSQL sessions: its size, what each session sets, and how long a
    statement waits for an answer.

    A server that stops answering (frozen, its network gone) answers no statement and no
    cancel: without a bound, the task waiting on it — a heartbeat, the dispatcher, the stop's
    requeue — waited forever, and a stop with it. Past ``BUSY_TIMEOUT_S`` a statement fails as a
    busy state does (TimeoutError), its cancel is waited as long at most, and the connection
    is dropped.
    """
    return {
        "min_size": 2,
        "max_size": 10,
        "command_timeout": BUSY_TIMEOUT_S,
        "server_settings": postgres_session_settings(stall_seconds),
    }


def prepare_postgres(url: str, stall_seconds: float = DEFAULT_STALL_S) -> None:
    """Create the tables in PostgreSQL at start-up (several instances may start at once), and
    check that the service's own pool can open."""
    import psycopg

    with psycopg.connect(url, autocommit=True, connect_timeout=10) as con:
        # Only the idle limit: the others wait for the advisory lock as long as its holder works.
        idle = postgres_session_settings(stall_seconds)["idle_in_transaction_session_timeout"]
        con.execute("SELECT set_config('idle_in_transaction_session_timeout', %s, false)", (idle,))
        with con.transaction():
            con.execute("SELECT pg_advisory_xact_lock(20261130)")  # one instance at a time
            con.execute("CREATE TABLE IF NOT EXISTS extracts_schema (version INTEGER NOT NULL)")
            version = con.execute("SELECT max(version) FROM extracts_schema").fetchone()[0]
            if version is not None and version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"the state has schema version {version}, newer than this service's {SCHEMA_VERSION}"
                )
            text = "\n".join(line for line in schema_sql().splitlines() if not line.lstrip().startswith("--"))
            for statement in postgres_schema(text).split(";"):
                if statement.strip():
                    con.execute(statement)
            if version != SCHEMA_VERSION:
                con.execute("DELETE FROM extracts_schema")
                con.execute("INSERT INTO extracts_schema VALUES (%s)", (SCHEMA_VERSION,))
    asyncio.run(_open_pool(url, stall_seconds))


async def _open_pool(url: str, stall_seconds: float) -> None:
    """Open and close the service's own pool (asyncpg, its sessions' settings) at start-up: a
    state that let psycopg in may still refuse it (a role's connection limit, max_connections, a
    PgBouncer refusing the settings), and failing in the app's start-up is a traceback."""
    pool = PostgresBackend(_postgres_url(url), **_postgres_options(stall_seconds))
    await pool.connect()
    await pool.disconnect()


def prepare_state_file(path: Path) -> None:
    """Create or migrate the state file synchronously, at start-up (fails fast)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        con.execute("PRAGMA journal_mode = WAL")
        version = con.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"the state file has schema version {version}, newer than this service's {SCHEMA_VERSION}"
            )
        migrate(con, version)
        con.executescript(schema_sql())
        con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    finally:
        con.close()


def migrate(con: sqlite3.Connection, from_version: int) -> None:
    """Bring an older state file up to SCHEMA_VERSION, before schema.sql is applied to it.

    Version 1 is the first; a new file (version 0) is made whole by schema.sql.
    Each step is one transaction and can run again.
    """
    steps = {
        2: _rename_artifacts_equal_ignoring_case,
        3: lambda con: _rebuild(con, "extract_artifacts"),
        4: lambda con: [_rebuild(con, table) for table in ("extracts", "extract_runs")],
    }
    for version, step in steps.items():
        if 1 <= from_version < version:
            con.execute("BEGIN IMMEDIATE")
            try:
                step(con)
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise


def _rebuild(con: sqlite3.Connection, table: str) -> None:
    """Rebuild ``table`` as schema.sql defines it today, keeping every row.

    SQLite changes a CHECK only by rebuilding the table. Version 3 let an
    artifact's storage_backend be an object store; version 4 added the retry
    fields (extracts: max_attempts, retry_delay_seconds; runs: attempt, retry_of,
    retry_run_id, not_before, instance_id, lease_expires_at, and the 'retry'
    trigger). schema.sql's definition (the one place it is written) makes the new
    table; the columns both have are copied, new ones take their defaults;
    schema.sql then recreates the indexes and the statistics view.
    """
    statement = re.search(rf"CREATE TABLE IF NOT EXISTS {table} \(.*?\n\);", schema_sql(), re.S)
    assert statement is not None, f"schema.sql defines {table}"
    con.execute("DROP VIEW IF EXISTS extracts_with_stats")  # renaming under a view fails
    con.execute(statement[0].replace(f"IF NOT EXISTS {table}", f"{table}_rebuilt"))
    old = {row[1] for row in con.execute(f"PRAGMA table_info({table})")}
    new = [row[1] for row in con.execute(f"PRAGMA table_info({table}_rebuilt)")]
    columns = ", ".join(f'"{name}"' for name in new if name in old)
    con.execute(f"INSERT INTO {table}_rebuilt ({columns}) SELECT {columns} FROM {table}")
    con.execute(f"DROP TABLE {table}")
    con.execute(f"ALTER TABLE {table}_rebuilt RENAME TO {table}")


# SQLite's NOCASE: ASCII letters only.
_NOCASE = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def _rename_artifacts_equal_ignoring_case(con: sqlite3.Connection) -> None:
    """Version 2 refuses two artifact names of a run that differ only in letter case.

    Version 1 allowed them (``users`` and ``Users`` of a PostgreSQL or MySQL
    source). The first keeps its name; each later one gets ``~<n>`` before the
    first dot of its name (``Users.jsonl`` → ``Users~2.jsonl``), the lowest n
    that is free. Only the recorded name changes, which is the name in the
    run's ZIP; the file stays where it is (``storage_path``).
    """
    runs = con.execute(
        "SELECT DISTINCT run_id FROM extract_artifacts "
        "GROUP BY run_id, artifact_name COLLATE NOCASE HAVING count(*) > 1"
    ).fetchall()
    for (run_id,) in runs:
        rows = con.execute(
            "SELECT rowid, artifact_name FROM extract_artifacts WHERE run_id = ? ORDER BY rowid", (run_id,)
        ).fetchall()
        taken = {name.translate(_NOCASE) for _, name in rows}
        kept: set[str] = set()
        for rowid, name in rows:
            if name.translate(_NOCASE) not in kept:
                kept.add(name.translate(_NOCASE))
                continue
            stem, dot, rest = name.partition(".")
            n = 2
            while f"{stem}~{n}{dot}{rest}".translate(_NOCASE) in taken:
                n += 1
            renamed = f"{stem}~{n}{dot}{rest}"
            taken.add(renamed.translate(_NOCASE))
            con.execute("UPDATE extract_artifacts SET artifact_name = ? WHERE rowid = ?", (renamed, rowid))


class KeptConnections:
    """Opened aiosqlite connections, kept for the next query (the pool ``SQLiteConnection`` takes).

    ``databases``' own SQLite backend opens (and closes) an aiosqlite connection — a
    thread and a file open — for every query outside a transaction: about 3 ms,
    against 0.4 ms on an open connection.
    """

    def __init__(self, path: str, options: dict[str, Any], keep: int = 16) -> None:
        self._path, self._options, self._keep = path, options, keep
        self._idle: list[aiosqlite.Connection] = []

    async def acquire(self) -> aiosqlite.Connection:
        if self._idle:
            return self._idle.pop()
        return await aiosqlite.connect(self._path, isolation_level=None, **self._options)

    async def release(self, connection: aiosqlite.Connection) -> None:
        if len(self._idle) < self._keep and not connection.in_transaction:
            self._idle.append(connection)
        else:
            await connection.close()

    async def close(self) -> None:
        while self._idle:
            await self._idle.pop().close()


class TaskConnection(ConnectionBackend):
    """A task's connection (``databases`` keeps one per asyncio task) that it can always acquire again.

    ``databases`` forgets the connection it acquired only once the pool took it back. When
    that fails (asyncpg's reset met a session PostgreSQL ended: "another operation (2) is
    in progress"; the pool then drops it itself), the task kept it as its connection in
    use, and every later statement of the task failed on "Connection is already acquired"
    — for good, in the dispatcher, the message consumer or a heartbeat. Each hand-back here
    leaves a fresh one behind, whether the pool took it or not.
    """

    def __init__(self, new: Callable[[], ConnectionBackend]) -> None:
        self._new = new
        self._current = new()

    async def acquire(self) -> None:
        await self._current.acquire()

    async def release(self) -> None:
        connection, self._current = self._current, self._new()
        await connection.release()

    async def fetch_all(self, query: ClauseElement) -> list[Record]:
        return await self._current.fetch_all(query)

    async def fetch_one(self, query: ClauseElement) -> Record | None:
        return await self._current.fetch_one(query)

    async def fetch_val(self, query: ClauseElement, column: Any = 0) -> Any:
        return await self._current.fetch_val(query, column)

    async def execute(self, query: ClauseElement) -> Any:
        return await self._current.execute(query)

    async def execute_many(self, queries: list[ClauseElement]) -> None:
        await self._current.execute_many(queries)

    async def iterate(self, query: ClauseElement) -> AsyncGenerator[Any, None]:
        async for record in self._current.iterate(query):
            yield record

    def transaction(self) -> TransactionBackend:
        return self._current.transaction()

    @property
    def raw_connection(self) -> Any:
        return self._current.raw_connection


class StatePostgresBackend(PostgresBackend):
    """``databases``' asyncpg pool, each task's connection a ``TaskConnection``."""

    def connection(self) -> ConnectionBackend:
        return TaskConnection(super().connection)


class StateBackend(DatabaseBackend):
    """``databases``' SQLite connections over ``KeptConnections``: its public backend interface."""

    def __init__(self, database_url: DatabaseURL | str, **options: Any) -> None:
        self._dialect = pysqlite.dialect(paramstyle="qmark")
        self._dialect.supports_native_decimal = False  # as in databases' own SQLite backend
        self._connections = KeptConnections(DatabaseURL(database_url).database, options)

    async def connect(self) -> None:
        """Connections open on first use."""

    async def disconnect(self) -> None:
        await self._connections.close()

    def connection(self) -> ConnectionBackend:
        return TaskConnection(lambda: SQLiteConnection(self._connections, self._dialect))  # type: ignore[arg-type]


class StateDatabase(Database):
    """A ``databases.Database`` whose SQLite URLs are served by ``StateBackend``, PostgreSQL ones by
    ``StatePostgresBackend``."""

    SUPPORTED_BACKENDS = {
        **Database.SUPPORTED_BACKENDS,
        "sqlite": "extracts.state:StateBackend",
        "postgresql": "extracts.state:StatePostgresBackend",
    }


async def in_transaction(db: Database, work: Callable[[], Awaitable[T]]) -> T:
    """``work()`` in one transaction of ``db``, in an asyncio task of its own.

    ``databases`` gives each task one connection, and when a transaction's COMMIT
    or ROLLBACK fails (a session PostgreSQL ended: ``postgres_session_settings``)
    it never lets that connection go: every later statement of the task would
    fail on it, and the task is the pool's message consumer or an instance's
    heartbeat. In a task of its own the dead connection ends with the task, and a
    retry gets a live one.
    """

    async def transaction() -> T:
        connection = db.connection()  # this task's
        try:
            async with connection.transaction():
                return await work()
        finally:
            await _let_go(connection)

    return await asyncio.create_task(transaction())


async def disconnect(db: Database) -> None:
    """``db.disconnect()`` within ``DISCONNECT_S``: asyncpg's pool waits for every connection it
    handed out, and a stop must not hang on one; cancelled, the pool cuts them (asyncpg's advice)."""
    try:
        await asyncio.wait_for(db.disconnect(), DISCONNECT_S)
    except TimeoutError:
        log.warning("the state's connections did not close within %d s; they were cut", DISCONNECT_S)


async def _let_go(connection: Connection) -> None:
    """Hand back a connection a failed COMMIT or ROLLBACK left checked out.

    ``databases`` releases a transaction's connection only once its COMMIT or
    ROLLBACK succeeded. When asyncpg's protocol was cut without its connection
    being cleaned up (a session that ended while the process was frozen), the
    ROLLBACK fails on "the underlying connection is closed" and the pool's
    holder stays in use for good: ten such (the pool's size) and every
    statement waits forever, and a stop waits on it forever in ``disconnect``.
    Releasing it makes the pool end the dead connection and open a new one.
    """
    while connection._connection_counter > 0:  # noqa: SLF001 — databases has no public count
        with contextlib.suppress(Exception):  # a reset that fails ends the connection: freed too
            await connection.__aexit__()


_POOL_LOG = logging.getLogger("asyncpg.pool")


class OneLineWarnings(logging.Filter):
    """asyncpg's pool logs each failed try to reopen its sessions with a traceback ("Failed to
    restore the pool connection floor; retrying", after 1 s, 2 s, 4 s… up to a minute while
    PostgreSQL refuses): the cause in one line is what a reader needs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            record.msg = f"{record.getMessage()}: {type(exc).__name__}: {' '.join(str(exc).split())}"
            record.args, record.exc_info, record.exc_text = None, None, None
        return True


def open_database(location: Path | str, stall_seconds: float = DEFAULT_STALL_S) -> Database:
    """The state database, not connected yet (``connect()``, then ``disconnect()``).

    ``location``: a SQLite file, or a ``postgresql://`` URL, whose sessions hold
    their locks silent, or wait for one, ``stall_seconds`` at most
    (``postgres_session_settings``).
    """
    text = str(location)
    if dialect_of(text) is POSTGRES:
        if not any(isinstance(f, OneLineWarnings) for f in _POOL_LOG.filters):
            _POOL_LOG.addFilter(OneLineWarnings())
        return StateDatabase(_postgres_url(text), **_postgres_options(stall_seconds))
    return StateDatabase(f"sqlite:///{location}", factory=StateConnection, timeout=BUSY_TIMEOUT_S)
