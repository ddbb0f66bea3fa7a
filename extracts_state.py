"""The service's own state: one SQLite file reached through ``databases`` + ``aiosqlite``.

Owns the facts every other module shares: run statuses, id and timestamp
formats, how a state row becomes an API record, and how the file is opened
(per-connection PRAGMAs, WAL, ``schema.sql``, migrations by ``user_version``).
The parent process is the only writer; worker processes never open this file.
"""

from __future__ import annotations

import secrets
import sqlite3
import string
import sys
from datetime import UTC, datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import Any

import orjson
from databases import Database

SCHEMA_VERSION = 2
BUSY_TIMEOUT_S = 15.0


class RunStatus(str, Enum):
    """Mirrors the CHECK on extract_runs.status in schema.sql."""

    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE_STATUSES = (RunStatus.PENDING.value, RunStatus.QUEUED.value, RunStatus.RUNNING.value)
TERMINAL_STATUSES = (RunStatus.COMPLETED.value, RunStatus.FAILED.value, RunStatus.CANCELLED.value)


class TriggeredBy(str, Enum):
    """Mirrors the CHECK on extract_runs.triggered_by in schema.sql."""

    MANUAL = "manual"
    SCHEDULE = "schedule"
    API = "api"


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


def now_iso() -> str:
    return iso(utcnow())


def plus_days(text: str, days: int) -> str:
    return iso(parse_iso(text) + timedelta(days=days))


def new_id(prefix: str) -> str:
    """Opaque prefixed id: ``extract_…``, ``run_…``, ``artifact_…``."""
    return f"{prefix}_{secrets.token_hex(8)}"


class FieldType(str, Enum):
    """The type of a record field: how a list's ``filter[where][<field>]`` value is read."""

    TEXT = "text"
    INTEGER = "integer"
    NUMBER = "number"
    BOOLEAN = "boolean"
    TIMESTAMP = "timestamp"  # ISO 8601 text, as iso() writes it
    JSON = "json"  # not filterable


_T = FieldType
# The fields of a run record and of an artifact record, in order, with their types.
RUN_FIELDS = {
    "id": _T.TEXT,
    "extract_id": _T.TEXT,
    "extract_name": _T.TEXT,
    "status": _T.TEXT,
    "progress": _T.INTEGER,
    "progress_detail": _T.JSON,
    "started_at": _T.TIMESTAMP,
    "completed_at": _T.TIMESTAMP,
    "duration_seconds": _T.NUMBER,
    "records_exported": _T.INTEGER,
    "schemas_exported": _T.INTEGER,
    "artifacts_created": _T.INTEGER,
    "total_size_bytes": _T.INTEGER,
    "error": _T.TEXT,
    "error_detail": _T.JSON,
    "triggered_by": _T.TEXT,
    "config_snapshot": _T.JSON,
    "created_at": _T.TIMESTAMP,
    "updated_at": _T.TIMESTAMP,
}
ARTIFACT_FIELDS = {
    "id": _T.TEXT,
    "run_id": _T.TEXT,
    "extract_id": _T.TEXT,
    "artifact_type": _T.TEXT,
    "artifact_name": _T.TEXT,
    "schema_name": _T.TEXT,
    "part": _T.INTEGER,
    "storage_path": _T.TEXT,
    "storage_backend": _T.TEXT,
    "format": _T.TEXT,
    "content_type": _T.TEXT,
    "size_bytes": _T.INTEGER,
    "records": _T.INTEGER,
    "checksum": _T.TEXT,
    "is_primary": _T.BOOLEAN,
    "created_at": _T.TIMESTAMP,
    "expires_at": _T.TIMESTAMP,
    "accessed_at": _T.TIMESTAMP,
    "download_count": _T.INTEGER,
    "deleted_at": _T.TIMESTAMP,
}

# Columns holding JSON text or 0/1 booleans, per table: how a row becomes a record.
JSON_COLUMNS = {"include", "schemas", "filter", "progress_detail", "error_detail", "config_snapshot"}
BOOL_COLUMNS = {"compress", "split_files", "schedule_enabled", "enabled", "is_primary"}
HIDDEN_COLUMNS = {"deleted_at_extract", "crc32"}


def to_record(row: Any, hidden: set[str] = frozenset()) -> dict[str, Any]:
    """A state row as the API shows it: JSON columns parsed, booleans as booleans."""
    record = {}
    for key, value in dict(row._mapping).items():
        if key in hidden or key in HIDDEN_COLUMNS:
            continue
        if key in JSON_COLUMNS and value is not None:
            value = orjson.loads(value)
        elif key in BOOL_COLUMNS and value is not None:
            value = bool(value)
        record[key] = value
    return record


def dumps(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


class StateConnection(sqlite3.Connection):
    """Every connection ``databases`` opens gets the PRAGMAs the service relies on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        self.execute("PRAGMA foreign_keys = ON")
        self.execute("PRAGMA synchronous = NORMAL")


def schema_sql() -> str:
    """schema.sql beside this module (source checkout) or in the installed data dir."""
    for candidate in (
        Path(__file__).with_name("schema.sql"),
        Path(sys.prefix, "share", "extracts", "schema.sql"),
    ):
        if candidate.is_file():
            return candidate.read_text()
    raise FileNotFoundError("schema.sql not found beside extracts_state.py nor in share/extracts")


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
    if 1 <= from_version < 2:
        con.execute("BEGIN IMMEDIATE")
        try:
            _rename_artifacts_equal_ignoring_case(con)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise


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


class ReusingPool:
    """Keeps a few opened connections for the next query.

    ``databases`` opens (and closes) an aiosqlite connection — a thread and a file
    open — for every query outside a transaction: about 3 ms, against 0.4 ms on an
    open connection. This wraps its SQLite pool (same acquire/release interface).
    """

    def __init__(self, pool: Any, keep: int = 16) -> None:
        self._pool, self._keep, self._idle = pool, keep, []
        self._memref = pool._memref  # read by the backend's disconnect()

    async def acquire(self) -> Any:
        if self._idle:
            return self._idle.pop()
        return await self._pool.acquire()

    async def release(self, connection: Any) -> None:
        if len(self._idle) < self._keep and not connection.in_transaction:
            self._idle.append(connection)
        else:
            await self._pool.release(connection)

    async def close(self) -> None:
        while self._idle:
            await self._pool.release(self._idle.pop())


def open_database(path: Path) -> Database:
    """The state database; ``close_database`` closes the connections kept for reuse."""
    db = Database(f"sqlite:///{path}", factory=StateConnection, timeout=BUSY_TIMEOUT_S)
    db._backend._pool = ReusingPool(db._backend._pool)  # type: ignore[attr-defined]
    return db


async def close_database(db: Database) -> None:
    await db._backend._pool.close()  # type: ignore[attr-defined]
    await db.disconnect()
