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
limit (big BLOBs), and is read one ahead in a thread (``_read_ahead``) while
the caller writes the last. Views, ``WITHOUT ROWID`` and virtual tables stream
from one cursor with ``fetchmany``. Both run inside the caller's
``snapshot()``, so every chunk sees the same database state.
"""

from __future__ import annotations

import binascii
import codecs
import math
import queue
import sqlite3
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from executor.credentials import redact
from executor.filters import compile_where
from executor.sources.base import Source, SourceError, SourceUnavailable, UnknownSchema, foreign_keys

# SQLite's default SQLITE_MAX_FUNCTION_ARG is 127: at most 63 key/value pairs per
# json_object() call, so wide tables are encoded as several objects glued together.
_PAIRS_PER_CALL = 60
# A chunk of JSON lines aims at this many bytes (flat memory, few Python objects).
_CHUNK_BYTES = 1 << 20
_FIRST_CHUNK_ROWS = 64
_UTF8_PIECE = 1 << 16


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


def _connect(path: Path) -> sqlite3.Connection:
    # Shown redacted: a libpq 'host=h password=x' string given as the source lands here.
    shown = redact(str(path))
    if not path.exists():
        raise SourceUnavailable(f"Source database {shown} does not exist")
    if path.is_dir():
        raise SourceError(f"Source database {shown} is a directory, not an SQLite file")
    uri = "file:" + urllib.parse.quote(str(path)) + "?mode=ro"
    try:
        # check_same_thread=False: a table's chunks are read in a thread (_read_ahead).
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise SourceError(f"Cannot open the source database {shown}: {exc}") from exc
    try:
        conn.execute("PRAGMA query_only = 1")
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # "file is not a database"
    except sqlite3.Error as exc:
        conn.close()
        raise SourceError(f"Cannot open the source database {shown}: {exc}") from exc
    conn.create_function("_extracts_base64", 1, _base64, deterministic=True)
    conn.create_function("_extracts_signed_zero", 1, _signed_zero, deterministic=True)
    return conn


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
    strict: bool = False


class SQLiteSource(Source):
    """A read-only SQLite database file."""

    dialect = "sqlite"
    json_is_yaml_safe = True  # json_object's numbers and strings, and _real_sql's forms

    def __init__(self, location: str) -> None:
        self.path = sqlite_path(location)
        self._conn = _connect(self.path)
        # -0.0 keeps its sign through pow(x, -1) = -Inf; without math functions, a
        # Python function does it (called for zero REALs only).
        self._zero_sql = (
            "CASE WHEN pow({c}, -1) < 0 THEN '-0.0' ELSE '0.0' END"
            if _has_math_functions(self._conn)
            else "_extracts_signed_zero({c})"
        )

    def close(self) -> None:
        self._conn.close()

    def interrupt(self) -> None:
        self._conn.interrupt()

    def location(self) -> dict[str, Any]:
        return {"dialect": self.dialect, "path": redact(str(self.path)), "version": sqlite3.sqlite_version}

    # ------------------------------------------------------------ catalog

    @contextmanager
    def _reading(self, action: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise SourceError(f"Cannot {action} in {redact(str(self.path))}: {exc}") from exc

    def _relations(self) -> dict[str, _Relation]:
        with self._reading("list the tables"):
            try:
                rows = self._conn.execute(
                    "SELECT name, type, strict FROM pragma_table_list WHERE schema = 'main'"
                ).fetchall()
            except sqlite3.OperationalError:  # SQLite before 3.37
                rows = self._conn.execute(
                    "SELECT name, CASE WHEN sql LIKE 'CREATE VIRTUAL%' THEN 'virtual' ELSE type END,"
                    " 0 FROM sqlite_master WHERE type IN ('table', 'view')"
                ).fetchall()
        return {
            name: _Relation(name, kind, bool(strict))
            for name, kind, strict in rows
            if kind in ("table", "view", "virtual") and not name.lower().startswith("sqlite_")
        }

    def _relation(self, name: str) -> _Relation:
        relation = self._relations().get(name)
        if relation is None:
            raise UnknownSchema(name)
        return relation

    def _column_rows(self, name: str) -> list[tuple[str, str, int, str | None, int]]:
        # hidden = 1 are a virtual table's hidden columns; generated columns (2, 3) are data.
        with self._reading(f"read the columns of '{name}'"):
            return self._conn.execute(
                'SELECT name, type, "notnull", dflt_value, pk FROM pragma_table_xinfo(?) '
                "WHERE hidden <> 1 ORDER BY cid",
                (name,),
            ).fetchall()

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

    def columns(self, name: str) -> list[str]:
        self._relation(name)
        return [row[0] for row in self._column_rows(name)]

    def describe(self, names: list[str]) -> dict[str, dict[str, Any]]:
        return {name: self._describe(self._relation(name)) for name in names}

    def _describe(self, relation: _Relation) -> dict[str, Any]:
        name = relation.name
        rows = self._column_rows(name)
        return {
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
            if None in key["references"]["columns"]:
                parent_rows = self._column_rows(key["references"]["table"])
                key["references"]["columns"] = [
                    r[0] for r in sorted(parent_rows, key=lambda r: r[4]) if r[4] > 0
                ]
        return list(keys.values())

    def _indexes(self, name: str) -> list[dict[str, Any]]:
        with self._reading(f"read the indexes of '{name}'"):
            listed = self._conn.execute(
                "SELECT name, \"unique\" FROM pragma_index_list(?) WHERE origin <> 'pk' ORDER BY name",
                (name,),
            ).fetchall()
            # An expression's column name is NULL: shown as null.
            return [
                {
                    "name": index,
                    "columns": [
                        r[0]
                        for r in self._conn.execute(
                            "SELECT name FROM pragma_index_info(?) ORDER BY seqno", (index,)
                        )
                    ],
                    "unique": bool(unique),
                }
                for index, unique in listed
            ]

    # ------------------------------------------------------------ data

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        with self._reading("start a read transaction"):
            self._conn.execute("BEGIN")
            # A deferred transaction takes its snapshot at the first read: read now.
            self._conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        try:
            yield
        finally:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")

    def _row_count(self, name: str, where: dict[str, Any] | None) -> int:
        clause, params = compile_where(where, quote, "?")
        with self._reading(f"count the rows of '{name}'"):
            return self._conn.execute(f"SELECT count(*) FROM {quote(name)}{clause}", params).fetchone()[0]

    def count(self, name: str, where: dict[str, Any] | None) -> int:
        self._relation(name)
        return self._row_count(name, where)

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
        row_json = _row_json_sql([quote(c) for c in columns], kinds, self._zero_sql)
        clause, params = compile_where(where, quote, "?")
        with self._reading(f"read '{name}'"):
            if rowid is None:
                yield from self._cursor_batches(name, row_json, columns, clause, params, batch_size)
            else:
                chunks = self._rowid_chunks(name, row_json, columns, clause, params, rowid, batch_size)
                for text, count in _read_ahead(chunks):
                    yield _valid_utf8(text), count

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

        A view's column can hold anything. A table's column holds what its type
        lets it: STRICT types are enforced; TEXT affinity turns numbers into text
        on the way in (only text, blobs and NULL remain); the rowid alias
        (``INTEGER PRIMARY KEY``) is always an integer. Other columns can hold
        anything, their affinity only says what to test for first.
        """
        if relation.kind != "table":
            return ["any"] * len(rows)
        keys = [row for row in rows if row[4] > 0]
        alias = None
        if has_rowid and len(keys) == 1 and keys[0][1].upper() == "INTEGER":
            # "INTEGER PRIMARY KEY DESC" is not an alias: it gets a 'pk' index instead.
            pk_index = self._conn.execute(
                "SELECT 1 FROM pragma_index_list(?) WHERE origin = 'pk'", (relation.name,)
            ).fetchone()
            alias = None if pk_index else keys[0][0]
        kinds = []
        for column, declared, *_ in rows:
            if column == alias:
                kinds.append("raw")
            elif relation.strict:
                kinds.append(_STRICT_KINDS.get(declared.upper(), "any"))
            else:
                kinds.append(_AFFINITY_KINDS.get(_affinity(declared), "any"))
        return kinds

    def _rowid_chunks(
        self,
        name: str,
        row_json: str,
        columns: list[str],
        clause: str,
        params: list[Any],
        rowid: str,
        batch_size: int,
    ) -> Iterator[tuple[bytes, int]]:
        def chunk_sql(after: str) -> str:
            return (
                f"SELECT CAST(group_concat(j, char(10)) AS BLOB), max(r), count(*) FROM "
                f"(SELECT {rowid} AS r, {row_json} AS j FROM {quote(name)} NOT INDEXED"
                f"{after} ORDER BY {rowid} LIMIT ?)"
            )

        # NOT INDEXED: the scan always follows the rowid, whatever index a filter could use.
        first = chunk_sql(clause)
        following = chunk_sql(f"{clause} AND {rowid} > ?" if clause else f" WHERE {rowid} > ?")
        after: list[int] = []  # the last rowid read, once there is one
        limit = cap = min(batch_size, _FIRST_CHUNK_ROWS)
        while True:
            try:
                text, last, count = self._conn.execute(
                    following if after else first, [*columns, *params, *after, limit]
                ).fetchone()
            except sqlite3.DataError:  # the chunk passed SQLite's string limit (big BLOBs): fewer rows
                if limit == 1:
                    raise
                limit = cap = max(1, limit // 4)
                continue
            if not count:
                return
            yield text, count
            after = [last]
            cap = max(cap, min(batch_size, cap * 2))
            limit = min(cap, _next_limit(len(text), count, batch_size))

    def _cursor_batches(
        self, name: str, row_json: str, columns: list[str], clause: str, params: list[Any], batch_size: int
    ) -> Iterator[tuple[bytes, int]]:
        cursor = self._conn.execute(
            f"SELECT CAST({row_json} AS BLOB) FROM {quote(name)}{clause}", [*columns, *params]
        )
        try:
            limit = min(batch_size, _FIRST_CHUNK_ROWS)
            while rows := cursor.fetchmany(limit):
                chunk = _valid_utf8(b"\n".join([row[0] for row in rows]))
                yield chunk, len(rows)
                limit = _next_limit(len(chunk), len(rows), batch_size)
        finally:
            cursor.close()


# ---------------------------------------------------------------- JSON built in SQL

# What each kind of column can hold: "raw" (integers, text and NULL, which json_object
# encodes exactly), "text" (text or blobs), "blob", "real", or "any" storage class.
_STRICT_KINDS = {"INT": "raw", "INTEGER": "raw", "TEXT": "raw", "BLOB": "blob", "REAL": "real"}
# Without STRICT, a column can hold any storage class, but its affinity makes one
# the likely one, worth testing first: "mostly-integer", "mostly-real".
_AFFINITY_KINDS = {"TEXT": "text", "INTEGER": "mostly-integer", "REAL": "mostly-real"}


def _affinity(declared: str) -> str:
    """SQLite's column affinity for a declared type (its documented rules, in order)."""
    upper = declared.upper()
    if "INT" in upper:
        return "INTEGER"
    if "CHAR" in upper or "CLOB" in upper or "TEXT" in upper:
        return "TEXT"
    if "BLOB" in upper or not upper:
        return "BLOB"
    if "REAL" in upper or "FLOA" in upper or "DOUB" in upper:
        return "REAL"
    return "NUMERIC"


def _real_sql(c: str, zero_sql: str) -> str:
    """A REAL as JSON that parses back to the same double (see the module docstring).

    A value with at most 6 decimals under 1e9 in size (prices, rates,
    coordinates) is written short: ``m / 1e6 = c`` with ``m`` the integer
    ``round(c * 1e6)`` is an IEEE division of two exact doubles, so it holds
    exactly when the decimal ``m`` * 10^-6 reads back as ``c``, and that decimal
    (15 digits at most) is what ``%!.15g`` prints. That is how ``json_object``
    prints a REAL, so the value goes in as it is: ``json()``, which marks text
    as JSON, costs more than the formatting. Every other finite value gets 18
    significant digits; the infinities become strings, which ``json_object``
    quotes.
    """
    return (
        f"CASE WHEN {c} = 0 THEN json({zero_sql.format(c=c)}) "
        f"WHEN {c} > -1e9 AND {c} < 1e9 AND round({c} * 1e6) / 1e6 = {c} THEN {c} "
        f"WHEN {c} < 9e999 AND {c} > -9e999 THEN json(printf('%!.18g', {c})) "
        f"WHEN {c} > 0 THEN 'Infinity' ELSE '-Infinity' END"
    )


def _value_sql(c: str, kind: str, zero_sql: str) -> str:
    """The JSON value of column ``c``, checked only for the storage classes ``kind`` allows.

    Text and blobs are told apart from numbers by comparison (numbers < text <
    blob, ``+`` dropping affinity), which costs less than ``typeof``; where a
    number is likely, one ``typeof`` tests for it first.
    """
    blob = f"_extracts_base64({c})"
    if kind == "raw":
        return c
    if kind == "blob":
        return blob
    if kind == "real":
        return f"CASE WHEN {c} IS NULL THEN NULL ELSE {_real_sql(c, zero_sql)} END"
    if kind == "text":
        return f"CASE WHEN +{c} >= x'' THEN {blob} ELSE {c} END"
    if kind == "mostly-integer":
        return (
            f"CASE typeof({c}) WHEN 'integer' THEN {c} WHEN 'real' THEN {_real_sql(c, zero_sql)} "
            f"WHEN 'blob' THEN {blob} ELSE {c} END"
        )
    if kind == "mostly-real":
        return (
            f"CASE typeof({c}) WHEN 'real' THEN {_real_sql(c, zero_sql)} WHEN 'blob' THEN {blob} ELSE {c} END"
        )
    return (
        f"CASE WHEN +{c} >= '' THEN (CASE WHEN +{c} >= x'' THEN {blob} ELSE {c} END) "
        f"WHEN typeof({c}) = 'real' THEN {_real_sql(c, zero_sql)} ELSE {c} END"
    )


def _row_json_sql(columns: list[str], kinds: list[str], zero_sql: str) -> str:
    """SQL for one row as a JSON object; one ``?`` per column (its key), in order."""
    pairs = [f"?, {_value_sql(c, kind, zero_sql)}" for c, kind in zip(columns, kinds, strict=True)]
    calls = [
        "json_object(" + ", ".join(pairs[i : i + _PAIRS_PER_CALL]) + ")"
        for i in range(0, len(pairs), _PAIRS_PER_CALL)
    ]
    if len(calls) == 1:
        return calls[0]
    # '{"a":1}' + '{"b":2}' -> '{"a":1,"b":2}': no value ends with '}' nor starts a call.
    inner = [
        f"rtrim({calls[0]}, '}}')",
        *(f"trim({c}, '{{}}')" for c in calls[1:-1]),
        f"ltrim({calls[-1]}, '{{')",
    ]
    return " || ',' || ".join(inner)


def _read_ahead(chunks: Iterator[tuple[bytes, int]]) -> Iterator[tuple[bytes, int]]:
    """``chunks``, read one chunk ahead in a thread.

    SQLite builds the next chunk without the GIL while the caller checks and
    writes this one: the two overlap on two cores (about 15% of an export).
    The thread is stopped and joined before this generator ends, however it
    ends, so the connection is the caller's alone again.
    """
    ready: queue.Queue[tuple[tuple[bytes, int] | None, BaseException | None]] = queue.Queue(1)
    stop = threading.Event()

    def hand_over(item: tuple[bytes, int] | None, error: BaseException | None = None) -> bool:
        while not stop.is_set():
            try:
                ready.put((item, error), timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for chunk in chunks:
                if not hand_over(chunk):
                    return
            hand_over(None)
        except BaseException as exc:  # re-raised by the caller's thread
            hand_over(None, exc)
        finally:
            chunks.close()

    reader = threading.Thread(target=read, name="sqlite-read-ahead", daemon=True)
    reader.start()
    try:
        while True:
            chunk, error = ready.get()
            if error is not None:
                raise error
            if chunk is None:
                return
            yield chunk
    finally:
        stop.set()
        reader.join()


def _valid_utf8(chunk: bytes) -> bytes:
    """``chunk``, with bytes that are not UTF-8 as U+FFFD (SQLite stores TEXT unchecked)."""
    if chunk.isascii():  # the common case, checked a word at a time
        return chunk
    # Decoded 64 KiB at a time: each piece's text is small and stays in the CPU's
    # cache, three times faster than one string of the whole chunk (up to 4 bytes
    # a character), and no megabyte-sized string fragments the heap run after run.
    decoder = codecs.getincrementaldecoder("utf-8")()
    view = memoryview(chunk)
    try:
        for start in range(0, len(view), _UTF8_PIECE):
            decoder.decode(view[start : start + _UTF8_PIECE])
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return chunk.decode("utf-8", "replace").encode("utf-8")
    return chunk


def _next_limit(size: int, count: int, batch_size: int) -> int:
    """Rows for the next chunk: about ``_CHUNK_BYTES`` of JSON, at most ``batch_size``."""
    return max(1, min(batch_size, _CHUNK_BYTES * count // max(size, 1)))
