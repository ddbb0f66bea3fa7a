"""The SQLite source: stdlib ``sqlite3``, opened read-only, JSON built inside SQLite.

The file is opened as ``file:<path>?mode=ro`` (the service can never write to
it, and a missing file is never created) with ``PRAGMA query_only`` on top.

Rows leave SQLite already encoded: one ``json_object(?, <value>, ...)`` per row,
keys bound as parameters, so Python never touches a value (1.4× the time of
``sqlite3 -json`` this way, 2.6–2.9× with ``fetchmany`` and orjson: bench/RESULTS.md).
SQLite is dynamically typed, so each value is encoded by its own storage class,
whatever the column's declared type says; a declared type only lets the SQL skip
checks for what SQLite guarantees a column cannot hold (STRICT types, TEXT
affinity, the rowid alias: ``_value_kinds``):

=========  ===============================================================
INTEGER    a JSON integer, all 64 bits exact
REAL       a JSON number that parses back to the identical double: as
           written when it has at most 6 decimals and is under 1e9 in size
           (``19.99``, proven exact in SQL, see ``_real_sql``), else 18
           significant digits (``printf('%!.18g')``: 17 are not enough with
           SQLite's own formatting, and ``json_object`` would use 15);
           ``-0.0`` keeps its sign; ``+Inf``/``-Inf`` (not JSON numbers) are the
           strings ``"Infinity"``/``"-Infinity"``. SQLite stores NaN as NULL.
TEXT       a JSON string (bytes that are not UTF-8, which SQLite does not
           check, become U+FFFD)
BLOB       a base64 string (standard alphabet, padded)
NULL       null
=========  ===============================================================

A rowid table is read in chunks along its rowid (``WHERE rowid > ? ORDER BY
rowid LIMIT n``, a B-tree seek, never ``OFFSET``), each chunk's JSON lines
joined by SQLite's ``group_concat``: one Python object per chunk instead of one
per row. A chunk aims at 1 MiB and shrinks when it would pass SQLite's string
limit (big BLOBs). Chunks are read in threads while the caller writes
(``executor.sources.parallel``; the sqlite3 module releases the GIL while a
statement runs): inside a snapshot, by ``read_connections`` connections that
share its state (``snapshot``), each reading every n-th rowid range of a big
table, the chunks put back in rowid order. Views, ``WITHOUT ROWID`` and
virtual tables stream from one cursor with ``fetchmany``. Every read runs
inside the caller's ``snapshot()``, so every chunk sees the same database state.
"""

from __future__ import annotations

import binascii
import math
import sqlite3
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from executor.credentials import redact
from executor.filters import compile_where
from executor.sources.base import Source, SourceError, SourceUnavailable, UnknownSchema, foreign_keys
from executor.sources.parallel import Feed, in_order
from executor.sources.rowjson import valid_utf8
from executor.sources.sqlitejson import AFFINITY_KINDS, affinity, ascii_upper, row_json_sql
from executor.sources.sqlitetext import read_text, shown, shown_all, spellable, utf8_bytes

# A chunk of JSON lines aims at this many bytes (flat memory, few Python objects).
_CHUNK_BYTES = 1 << 20
_FIRST_CHUNK_ROWS = 64
# A table with more JSON than this is read by every connection of the snapshot at once.
PARALLEL_MIN_BYTES = 8 << 20
_MAX_RANGES = 1 << 16  # a sparse rowid space gets wider ranges, not more
_NOT_REGULAR = "(a named pipe, a device or a socket); give an SQLite file"  # a FIFO hangs the open


def sqlite_path(location: str) -> Path:
    """The file named by a path, ``sqlite:///relative/path`` or ``sqlite:////absolute/path``."""
    if location.lower().startswith("sqlite:///"):
        location = location[len("sqlite:///") :]
    return Path(location).expanduser().absolute()


def quote(name: str) -> str:
    """An SQLite identifier, quoted (``"`` doubled)."""
    return '"' + name.replace('"', '""') + '"'


def _base64(value: bytes | None) -> str | None:
    return None if value is None else binascii.b2a_base64(value, newline=False).decode("ascii")


def _signed_zero(value: float) -> str:
    return "-0.0" if math.copysign(1.0, value) < 0 else "0.0"


def _connect(path: Path, timeout: float = 5.0) -> sqlite3.Connection:
    # Shown redacted: a libpq 'host=h password=x' string given as the source lands here.
    shown = redact(str(path))
    try:
        exists, is_dir, is_file = path.exists(), path.is_dir(), path.is_file()
    except OSError as exc:  # a name too long, a directory it may not search
        raise SourceError(f"Cannot open the source database {shown}: {exc.strerror or exc}") from None
    if not exists:
        raise SourceUnavailable(f"Source database {shown} does not exist")
    if is_dir:
        raise SourceError(f"Source database {shown} is a directory, not an SQLite file")
    if not is_file:  # opening a FIFO waits for a writer, and SQLite retries it through signals
        raise SourceError(f"Source database {shown} is not a regular file {_NOT_REGULAR}")
    uri = "file:" + urllib.parse.quote(str(path)) + "?mode=ro"
    try:
        # check_same_thread=False: a table's chunks are read in threads (executor.sources.parallel).
        conn = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise _open_error(path, shown, exc) from exc
    try:
        conn.execute("PRAGMA query_only = 1")
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # "file is not a database"
    except sqlite3.Error as exc:
        conn.close()
        raise _open_error(path, shown, exc) from exc
    conn.create_function("_extracts_base64", 1, _base64, deterministic=True)
    conn.create_function("_extracts_signed_zero", 1, _signed_zero, deterministic=True)
    conn.text_factory = read_text
    return conn


def _open_error(path: Path, shown: str, exc: sqlite3.Error) -> SourceError:
    """Gone since it was checked, or locked by a writer past the wait: transient. Else not usable."""
    if not path.exists():
        return SourceUnavailable(f"Source database {shown} does not exist")
    kind = SourceUnavailable if _busy(exc) else SourceError
    return kind(f"Cannot open the source database {shown}: {exc}")


def _busy(exc: sqlite3.Error) -> bool:  # another connection's lock refused us: it will pass
    return getattr(exc, "sqlite_errorname", "").startswith(("SQLITE_BUSY", "SQLITE_LOCKED"))


def _has_math_functions(conn: sqlite3.Connection) -> bool:
    try:
        conn.execute("SELECT pow(2, 1)").fetchone()
    except sqlite3.OperationalError:
        return False
    return True


@dataclass(frozen=True)
class _Relation:
    name: str
    kind: str  # "table" | "view" | "virtual"


class SQLiteSource(Source):
    """A read-only SQLite database file."""

    dialect = "sqlite"
    json_is_yaml_safe = True  # json_object's numbers and strings, and _real_sql's forms
    #: Connections reading one big table at once inside a snapshot (see ``snapshot``).
    read_connections = 2

    def __init__(self, location: str) -> None:
        self.path = sqlite_path(location)
        self._conn = _connect(self.path)
        self._helpers: list[sqlite3.Connection] = []  # in a snapshot: more connections seeing it
        self._counted: dict[tuple[str, str], int] = {}  # count() in this snapshot, for json_lines
        # A TEXT's bytes are its UTF-8 in a UTF-8 database (the cast costs nothing), but its
        # UTF-16 in a UTF-16 one: there the text itself, which the sqlite3 module gets as UTF-8.
        utf8 = self._conn.execute("PRAGMA encoding").fetchone()[0] == "UTF-8"
        self.as_bytes = "CAST({} AS BLOB)" if utf8 else "{}"
        # -0.0 keeps its sign through pow(x, -1) = -Inf; without math functions, a
        # Python function does it (called for zero REALs only).
        self._zero_sql = (
            "CASE WHEN pow({c}, -1) < 0 THEN '-0.0' ELSE '0.0' END"
            if _has_math_functions(self._conn)
            else "_extracts_signed_zero({c})"
        )

    def close(self) -> None:
        self._close_helpers()
        self._conn.close()

    def interrupt(self) -> None:
        for conn in [self._conn, *self._helpers]:
            with suppress(sqlite3.ProgrammingError):  # any thread, any time: closed as a snapshot ended
                conn.interrupt()

    def location(self) -> dict[str, Any]:
        return {"dialect": self.dialect, "path": redact(str(self.path)), "version": sqlite3.sqlite_version}

    # ------------------------------------------------------------ catalog

    @contextmanager
    def _reading(self, action: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            kind = SourceUnavailable if _busy(exc) else SourceError
            raise kind(f"Cannot {action} in {redact(str(self.path))}: {exc}") from exc

    def _relations(self) -> dict[str, _Relation]:
        with self._reading("list the tables"):
            try:
                rows = self._conn.execute(
                    "SELECT name, type FROM pragma_table_list WHERE schema = 'main'"
                ).fetchall()
            except sqlite3.OperationalError:  # SQLite before 3.37
                rows = self._conn.execute(
                    "SELECT name, CASE WHEN sql LIKE 'CREATE VIRTUAL%' THEN 'virtual' ELSE type END"
                    " FROM sqlite_master WHERE type IN ('table', 'view')"
                ).fetchall()
        return {
            name: _Relation(name, kind)
            for name, kind in rows
            if kind in ("table", "view", "virtual")
            and not name.lower().startswith("sqlite_")
            and spellable(name)  # else left out, as unreadable (``spellable``)
        }

    def _relation(self, name: str) -> _Relation:
        relation = self._relations().get(name)
        if relation is None:
            raise UnknownSchema(name)
        return relation

    def _column_rows(self, name: str) -> list[tuple[str, str, int, str | None, int]]:
        # hidden = 1 are a virtual table's hidden columns; generated columns (2, 3) are data.
        with self._reading(f"read the columns of '{shown(name)}'"):
            if not spellable(name):
                raise sqlite3.OperationalError("its name is not UTF-8")
            rows = self._conn.execute(
                'SELECT name, type, "notnull", dflt_value, pk FROM pragma_table_xinfo(?) '
                "WHERE hidden <> 1 ORDER BY cid",
                (name,),
            ).fetchall()
            unnamed = [shown(row[0]) for row in rows if not spellable(row[0])]
            if unnamed:
                raise sqlite3.OperationalError(f"the name of column '{unnamed[0]}' is not UTF-8")
            return rows

    def schemas(self) -> list[dict[str, Any]]:
        """Every readable table and view; one that cannot be read (a view over a dropped
        table, a virtual table whose module is not loaded) is left out, not fatal."""
        listed = []
        for name, relation in sorted(self._relations().items()):
            try:
                listed.append(
                    {
                        "name": name,
                        "type": "view" if relation.kind == "view" else "table",
                        "columns": len(self._column_rows(name)),
                        "row_count": self._row_count(name, None),
                    }
                )
            except SourceError:
                continue
        return listed

    def names(self) -> list[str]:
        names = []
        for name in sorted(self._relations()):
            try:
                self._column_rows(name)
            except SourceError:  # unreadable: left out, as schemas() does
                continue
            names.append(name)
        return names

    def tables(self) -> list[str]:
        views = {name for name, relation in self._relations().items() if relation.kind == "view"}
        return [name for name in self.names() if name not in views]

    def columns(self, name: str) -> list[str]:
        self._relation(name)
        return [row[0] for row in self._column_rows(name)]

    def describe(self, names: list[str]) -> dict[str, dict[str, Any]]:
        return {name: self._describe(self._relation(name)) for name in names}

    def _describe(self, relation: _Relation) -> dict[str, Any]:
        name = relation.name
        rows = self._column_rows(name)
        described = {
            "type": "view" if relation.kind == "view" else "table",
            "columns": {
                column: {
                    "type": declared,
                    "required": bool(notnull),
                    "default": default,
                    "primary_key": pk > 0,
                }
                for column, declared, notnull, default, pk in rows
            },
            "primary_key": [row[0] for row in sorted(rows, key=lambda row: row[4]) if row[4] > 0],
            "foreign_keys": self._foreign_keys(name),
            "indexes": self._indexes(name),
            "row_count": self._row_count(name, None),
        }
        return shown_all(described)

    def _foreign_keys(self, name: str) -> list[dict[str, Any]]:
        with self._reading(f"read the foreign keys of '{name}'"):
            rows = self._conn.execute(
                'SELECT id, "table", "from", "to", on_update, on_delete '
                "FROM pragma_foreign_key_list(?) ORDER BY id, seq",
                (name,),
            ).fetchall()
        keys = foreign_keys(rows)
        for key in keys.values():
            # "REFERENCES parent" without columns means the parent's primary key.
            if None in key["references"]["columns"] and spellable(key["references"]["table"]):
                parent_rows = self._column_rows(key["references"]["table"])
                key["references"]["columns"] = [
                    r[0] for r in sorted(parent_rows, key=lambda r: r[4]) if r[4] > 0
                ]
        return list(keys.values())

    def _indexes(self, name: str) -> list[dict[str, Any]]:
        with self._reading(f"read the indexes of '{name}'"):
            # One statement: an index's name is never sent back (it may not be UTF-8).
            rows = self._conn.execute(
                'SELECT il.name, il."unique", ii.name FROM pragma_index_list(?) AS il, '
                "pragma_index_info(il.name) AS ii WHERE il.origin <> 'pk' ORDER BY il.name, ii.seqno",
                (name,),
            ).fetchall()
        indexes: dict[str, dict[str, Any]] = {}
        for index, unique, column in rows:  # an expression's column name is NULL: shown as null
            entry = indexes.setdefault(index, {"name": index, "columns": [], "unique": bool(unique)})
            entry["columns"].append(column)
        return list(indexes.values())

    # ------------------------------------------------------------ data

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """One read transaction; with ``read_connections`` > 1, that many, all on one state.

        Several connections are one snapshot when no commit happened while they
        started their read transactions: ``PRAGMA data_version`` on a separate
        connection, read before the first starts and after the last, changes
        exactly when another connection committed in between. When it changed, they
        start again (three tries), then the run reads with one connection.
        """
        with self._reading("start a read transaction"):
            self._helpers = self._begin_all()
        self._counted = {}
        try:
            yield
        finally:
            self._close_helpers()
            self._counted = {}
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")

    def _begin_all(self) -> list[sqlite3.Connection]:
        """Start the main read transaction, and helpers' on the same state (``snapshot``)."""
        for _attempt in range(3 if self.read_connections > 1 else 0):
            probe = _connect(self.path)  # waits out a writer's commit, as the run's own connection does
            try:
                before = probe.execute("PRAGMA data_version").fetchone()[0]
                _begin(self._conn)
                helpers: list[sqlite3.Connection] = []
                try:
                    for _ in range(self.read_connections - 1):
                        # No wait: a writer queued behind our read lock (rollback journal) would
                        # make a new reader wait for it, and it waits for us.
                        helpers.append(_begin(_connect(self.path, timeout=0)))
                except (sqlite3.Error, SourceError):
                    for helper in helpers:
                        helper.close()
                    return []
                if probe.execute("PRAGMA data_version").fetchone()[0] == before:
                    return helpers
                for helper in helpers:
                    helper.close()
                self._conn.execute("ROLLBACK")
            finally:
                probe.close()
        _begin(self._conn)
        return []

    def _close_helpers(self) -> None:
        for helper in self._helpers:
            helper.close()
        self._helpers = []

    def _row_count(self, name: str, where: dict[str, Any] | None) -> int:
        clause, params = compile_where(where, quote, "?")
        with self._reading(f"count the rows of '{name}'"):
            return self._conn.execute(f"SELECT count(*) FROM {quote(name)}{clause}", params).fetchone()[0]

    def count(self, name: str, where: dict[str, Any] | None) -> int:
        self._relation(name)
        counted = self._row_count(name, where)
        if self._conn.in_transaction:  # the worker counts each table before it reads it
            self._counted[(name, repr(where))] = counted
        return counted

    def json_batches(self, name: str, where: dict[str, Any] | None, batch_size: int) -> Iterator[list[bytes]]:
        for chunk, _ in self.json_lines(name, where, batch_size):
            yield chunk.split(b"\n")

    def json_lines(
        self, name: str, where: dict[str, Any] | None, batch_size: int
    ) -> Iterator[tuple[bytes, int]]:
        relation = self._relation(name)
        rows = self._column_rows(name)
        columns = [row[0] for row in rows]
        rowid = self._rowid_name(relation, columns)
        kinds = self._value_kinds(relation, rows, has_rowid=rowid is not None)
        query = _ChunkQuery(
            quote(name),
            rowid or "",
            row_json_sql([quote(c) for c in columns], kinds, self._zero_sql),
            columns,
            self.as_bytes,
        )
        clause, params = compile_where(where, quote, "?")
        with self._reading(f"read '{name}'"):
            if rowid is None:
                yield from self._cursor_batches(name, query.row_json, columns, clause, params, batch_size)
                return
            for text, count in in_order(
                self._readers(query, clause, params, batch_size, (name, repr(where))), "sqlite-read-ahead"
            ):
                yield valid_utf8(text), count

    def _readers(
        self, query: _ChunkQuery, clause: str, params: list[Any], batch_size: int, counted: tuple[str, str]
    ) -> list[Callable[[Feed[tuple[bytes, int]]], None]]:
        """The readers of a rowid table (``executor.sources.parallel``).

        One reads the whole table on the snapshot's connection. A big table in a
        snapshot with helpers is cut into rowid ranges of about ``_CHUNK_BYTES`` of
        JSON each (the first chunk tells the bytes a row takes; ``count()`` the rows),
        and connection ``i`` of ``n`` reads ranges ``i, i + n, …``.
        """
        main = self._conn
        first, after = [], None
        if self._helpers and counted in self._counted:
            for text, count, last in query.chunks(main, clause, params, None, None, batch_size):
                first, after = [(text, count)], last
                break
        high = main.execute(f"SELECT max({query.rowid}) FROM {query.table}").fetchone()[0] if first else None
        rows = self._counted.get(counted, 0) - (first[0][1] if first else 0)
        row_bytes = len(first[0][0]) / first[0][1] if first else 0
        if after is None or high is None or after >= high or rows * row_bytes < PARALLEL_MIN_BYTES:

            def whole(feed: Feed[tuple[bytes, int]]) -> None:
                for chunk in first:
                    feed.put(chunk)
                for text, count, _last in query.chunks(main, clause, params, after, None, batch_size):
                    feed.put((text, count))

            return [whole]
        per_range = max(1, min(batch_size, int(_CHUNK_BYTES / row_bytes)))  # rows
        width = max(1, (high - after) * per_range // max(rows, 1), (high - after) // _MAX_RANGES)
        bounds = [*range(after, high, width), high]  # unit u ≥ 1: rowids in (bounds[u - 1], bounds[u]]
        connections = [main, *self._helpers]
        n = len(connections)

        def reader(index: int) -> Callable[[Feed[tuple[bytes, int]]], None]:
            def read(feed: Feed[tuple[bytes, int]]) -> None:
                if index == 0:  # unit 0: the first chunk
                    feed.put(first[0])
                    feed.end_unit()
                for unit in range(index or n, len(bounds), n):
                    lower, upper = bounds[unit - 1], bounds[unit]
                    for text, count, _last in query.chunks(
                        connections[index], clause, params, lower, upper, batch_size, per_range
                    ):
                        feed.put((text, count))
                    feed.end_unit()

            return read

        return [reader(i) for i in range(n)]

    def _rowid_name(self, relation: _Relation, columns: list[str]) -> str | None:
        """The name that reaches the rowid of an ordinary table, or None (no rowid)."""
        if relation.kind != "table":
            return None
        taken = {column.lower() for column in columns}
        for candidate in ("rowid", "_rowid_", "oid"):
            if candidate not in taken:
                try:  # a WITHOUT ROWID table has none
                    self._conn.execute(f"SELECT {candidate} FROM {quote(relation.name)} LIMIT 0")
                except sqlite3.OperationalError:
                    return None
                return candidate
        return None

    def _value_kinds(
        self, relation: _Relation, rows: list[tuple[str, str, int, str | None, int]], has_rowid: bool
    ) -> list[str]:
        """Which storage classes each column can hold: the fewer, the less each value is checked.

        A view's column can hold anything. A table's column: TEXT affinity turns
        numbers into text on the way in (only text, blobs and NULL remain); the
        rowid alias (``INTEGER PRIMARY KEY``) is always an integer. Other columns
        can hold anything, their affinity only says what to test for first; so can
        a STRICT table's (``sqlitejson.AFFINITY_KINDS`` says why).
        """
        if relation.kind != "table":
            return ["any"] * len(rows)
        keys = [row for row in rows if row[4] > 0]
        alias = None
        if has_rowid and len(keys) == 1 and ascii_upper(keys[0][1]) == "INTEGER":
            # "INTEGER PRIMARY KEY DESC" is not an alias: it gets a 'pk' index instead.
            pk_index = self._conn.execute(
                "SELECT 1 FROM pragma_index_list(?) WHERE origin = 'pk'", (relation.name,)
            ).fetchone()
            alias = None if pk_index else keys[0][0]
        return [
            "raw" if column == alias else AFFINITY_KINDS.get(affinity(declared), "any")
            for column, declared, *_ in rows
        ]

    def _cursor_batches(
        self, name: str, row_json: str, columns: list[str], clause: str, params: list[Any], batch_size: int
    ) -> Iterator[tuple[bytes, int]]:
        cursor = self._conn.execute(
            f"SELECT {self.as_bytes.format(row_json)} FROM {quote(name)}{clause}", [*columns, *params]
        )
        try:
            limit = min(batch_size, _FIRST_CHUNK_ROWS)
            while rows := cursor.fetchmany(limit):
                chunk = valid_utf8(b"\n".join([utf8_bytes(row[0]) for row in rows]))
                yield chunk, len(rows)
                limit = _next_limit(len(chunk), len(rows), batch_size)
        finally:
            cursor.close()


def _begin(conn: sqlite3.Connection) -> sqlite3.Connection:
    conn.execute("BEGIN")
    # A deferred transaction takes its snapshot at the first read: read now.
    conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    return conn


@dataclass(frozen=True)
class _ChunkQuery:
    """A rowid table's rows as chunks of JSON lines, each joined by SQLite's ``group_concat``."""

    table: str  # quoted
    rowid: str  # the name that reaches the rowid
    row_json: str  # the SQL of a row's JSON (its keys bound as parameters)
    columns: list[str]
    as_bytes: str  # SQL that gives a text's UTF-8 bytes, "{}" the text (``SQLiteSource.as_bytes``)

    def _sql(self, clause: str, after: bool, upto: bool) -> str:
        # NOT INDEXED: the scan always follows the rowid, whatever index a filter could use.
        bounds = ([f"{self.rowid} > ?"] if after else []) + ([f"{self.rowid} <= ?"] if upto else [])
        where = clause + "".join(
            (" AND " if clause or i else " WHERE ") + bound for i, bound in enumerate(bounds)
        )
        return (
            f"SELECT {self.as_bytes.format('group_concat(j, char(10))')}, max(r), count(*) FROM "
            f"(SELECT {self.rowid} AS r, {self.row_json} AS j FROM {self.table} NOT INDEXED"
            f"{where} ORDER BY {self.rowid} LIMIT ?)"
        )

    def chunks(
        self,
        conn: sqlite3.Connection,
        clause: str,
        params: list[Any],
        after: int | None,
        upto: int | None,
        batch_size: int,
        first_rows: int = _FIRST_CHUNK_ROWS,
    ) -> Iterator[tuple[bytes, int, int]]:
        """``(JSON lines, rows, last rowid)`` of the rows after ``after`` up to ``upto`` (None: no bound).

        A chunk aims at ``_CHUNK_BYTES`` (at most ``batch_size`` rows), starting from
        ``first_rows``, and shrinks when it would pass SQLite's string limit (big BLOBs).
        """
        bound = [] if upto is None else [upto]
        first = self._sql(clause, after is not None, upto is not None)
        following = self._sql(clause, True, upto is not None)
        last: list[int] = [] if after is None else [after]
        limit = cap = min(batch_size, first_rows)
        while True:
            try:
                text, end, count = conn.execute(
                    following if last else first, [*self.columns, *params, *last, *bound, limit]
                ).fetchone()
            except sqlite3.DataError:  # the chunk passed SQLite's string limit: fewer rows
                if limit == 1:
                    raise
                limit = cap = max(1, limit // 4)
                continue
            if not count:
                return
            yield utf8_bytes(text), count, end
            if count < limit:
                return  # the range (or the table) has no more rows
            last = [end]
            cap = max(cap, min(batch_size, cap * 2))
            limit = min(cap, _next_limit(len(text), count, batch_size))


def _next_limit(size: int, count: int, batch_size: int) -> int:
    """Rows for the next chunk: about ``_CHUNK_BYTES`` of JSON, at most ``batch_size``."""
    return max(1, min(batch_size, _CHUNK_BYTES * count // max(size, 1)))
