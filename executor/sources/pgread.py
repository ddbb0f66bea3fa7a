"""Reading a PostgreSQL table fast: JSON built by the server, block ranges, several connections.

The row-by-row path (a named cursor, psycopg loaders, orjson) costs about 5 µs
of Python per row. Here the server builds each row's JSON
(``executor.sources.pgjson``) and joins a whole chunk of rows with
``string_agg``, so Python handles one object per chunk of about 1 MiB:

    COPY (SELECT s.n, s.j
            FROM generate_series(first, last, stride) b,
         LATERAL (SELECT count(*), string_agg(<row JSON>, E'\\n')
                    FROM t WHERE ctid >= (b,0) AND ctid < (b + step,0) [AND filter]) s(n, j))
      TO STDOUT (FORMAT binary)

One row of that COPY is one chunk: a range of ``step`` heap blocks read by a
TID range scan (PostgreSQL 14+), so in the order a plain sequential scan
gives them. The last range is open-ended: blocks added after the snapshot
was taken hold no row it can see, but nothing is left to chance. Index scans
and parallel plans are turned off for the statement (an index scan would
change the order of a filtered chunk).

A big table is read by several connections at once (``executor.sources.parallel``):
the first is the snapshot's own, the others import its snapshot
(``pg_export_snapshot()`` / ``SET TRANSACTION SNAPSHOT``, as ``pg_dump -j``
does), so every connection sees the very same rows. Reader ``i`` takes the
ranges ``i, i + n, …``: its ``generate_series`` strides over the others'.

Each statement runs inside a savepoint: a read stopped early (a cancelled
run, an error while writing) is cancelled on the server and rolled back to
it, and the snapshot goes on.

Views, partitioned tables and materialized views that are not populated have
no heap of their own: their rows' JSON comes through a named cursor instead,
still built by the server. Tables with a column the server cannot write
exactly (arrays) keep the row-by-row path.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.adapt import Buffer, Loader

from executor.sources.parallel import Feed
from executor.sources.pgjson import Column, finish, row_json_sql

# Set for the reading statements only (then reset): each chunk in scan order, one process.
READ_SETTINGS = (
    "SET enable_indexscan = off; SET enable_indexonlyscan = off; SET enable_bitmapscan = off;"
    " SET max_parallel_workers_per_gather = 0"
)
RESET_SETTINGS = (
    "RESET enable_indexscan; RESET enable_indexonlyscan; RESET enable_bitmapscan;"
    " RESET max_parallel_workers_per_gather"
)
CHUNK_BYTES = 1 << 20  # JSON a chunk aims at
MAX_STEP = 4096  # blocks in a range, whatever the estimate
_BEYOND = 4294967295  # no block has this number: the last range's end
_JSON_PER_HEAP_BYTE = 1.7  # about what rows of common types take as JSON, per byte on disk

_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
_HEADER = struct.Struct(">11sii")
_FIELD = struct.Struct(">hiqi")  # field count, 8, the count, the text's length (-1: NULL)


@dataclass(frozen=True)
class Plan:
    """How one relation is read."""

    columns: list[Column]
    row_sql: str | None  # None: the row-by-row path
    blocks: int | None  # heap blocks; None: no heap of its own (read through a cursor)
    step: int  # blocks a range


def plan(conn: psycopg.Connection[Any], listed_sql: str, oid: int, kind: str) -> Plan:
    """The columns (as the row-by-row path sees them), the row's SQL, and the ranges."""
    with conn.cursor() as cursor:
        # With parameters (none): ``listed_sql`` has its '%' doubled, as every statement's name.
        cursor.execute(f"SELECT * FROM {listed_sql} LIMIT 0", ())
        described = [(column.name, column.type_code) for column in cursor.description or ()]
    # NOT NULL is trusted (no null test in the row's SQL) but on a table with inheritance children:
    # its rows include theirs, and a child's column may hold NULL (ALTER TABLE ONLY parent … SET
    # NOT NULL, or DROP NOT NULL on the child), which made the whole row's JSON NULL: row lost.
    rows = conn.execute(
        "SELECT a.attname, a.atttypid, a.attnotnull AND NOT (c.relkind = 'r' AND c.relhassubclass),"
        " c.relkind, c.relkind IN ('r', 'm') AND"
        " (c.relkind <> 'm' OR c.relispopulated), pg_relation_size(c.oid),"
        " coalesce(pg_relation_size(c.reltoastrelid), 0), current_setting('block_size')::int"
        "  FROM pg_class c LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0"
        "   AND NOT a.attisdropped WHERE c.oid = %s ORDER BY a.attnum",
        (oid,),
    ).fetchall()
    attributes = {row[0]: row for row in rows if row[0] is not None}
    _name, _type, _notnull, relkind, has_heap, heap, toast, block_size = rows[0]
    oids = sorted({type_oid for _, type_oid in described} | {row[1] for row in attributes.values()})
    types = {
        type_oid: (typtype, is_array, shown)
        for type_oid, typtype, is_array, shown in conn.execute(
            # format_type(oid, -1): a name the parser gives no length (NULL would give 'character',
            # which is char(1), and 'bit', bit(1): a domain over char(5) cast to it lost all but one).
            "SELECT oid, typtype::text, typoutput = 'array_out'::regproc, format_type(oid, -1) FROM pg_type"
            " WHERE oid = ANY(%s)",
            (oids,),
        )
    }
    columns = []
    for name, type_oid in described:
        attribute = attributes.get(name) if kind == "table" else None
        declared = attribute[1] if attribute else type_oid
        typtype, is_array, shown = types.get(type_oid, ("b", False, ""))
        columns.append(
            Column(
                name=name,
                type_oid=type_oid,
                cast=f"::{shown}" if declared != type_oid else None,  # a domain: its base type
                nullable=not (attribute and attribute[2]),
                kind=typtype,
                is_array=is_array,
            )
        )
    blocks = heap // block_size if has_heap else None
    per_block = _JSON_PER_HEAP_BYTE * block_size * (1 + toast / heap) if heap else CHUNK_BYTES
    step = max(1, min(MAX_STEP, int(CHUNK_BYTES / per_block)))
    return Plan(columns, row_json_sql(columns, "t"), blocks, step)


def chunk_statement(relation: str, row_sql: str, condition: str) -> str:
    """The COPY of one reader's ranges; parameters: first, last, stride, last, step, the filter's."""
    tid = "('(' || g.b || ',0)')::tid"
    end = f"('(' || CASE WHEN g.b >= %s THEN {_BEYOND} ELSE g.b + %s END || ',0)')::tid"
    extra = f" AND ({condition})" if condition else ""
    return (
        "COPY (SELECT s.n, s.j FROM generate_series(%s::bigint, %s::bigint, %s::bigint) AS g(b),"
        f" LATERAL (SELECT count(*), string_agg({row_sql.replace('%', '%%')}, E'\\n')"
        f" FROM {relation} t WHERE t.ctid >= {tid} AND t.ctid < {end}{extra}) AS s(n, j))"
        " TO STDOUT (FORMAT binary)"
    )


@contextmanager
def savepoint(conn: psycopg.Connection[Any], settings: str = "") -> Iterator[None]:
    """A savepoint around a read (and its settings): a read stopped early leaves the snapshot usable."""
    conn.execute("SAVEPOINT extracts_read" + (f"; {settings}" if settings else ""))
    try:
        yield
    except BaseException:
        if not (conn.broken or conn.closed):
            with suppress(psycopg.Error):
                conn.execute("ROLLBACK TO SAVEPOINT extracts_read; RELEASE SAVEPOINT extracts_read")
        raise
    conn.execute((f"{RESET_SETTINGS}; " if settings else "") + "RELEASE SAVEPOINT extracts_read")


def copy_ranges(
    conn: psycopg.Connection[Any], statement: str, params: list[Any], feed: Feed[tuple[bytes, int]]
) -> None:
    """Run one reader's COPY; each of its rows is one range: a chunk (when it has rows), then its end."""
    with savepoint(conn, READ_SETTINGS), conn.cursor() as cursor, cursor.copy(statement, params) as copy:
        first = True
        while data := copy.read():
            offset = 0
            if first:
                signature, _flags, extension = _HEADER.unpack_from(data)
                if signature != _SIGNATURE:
                    raise psycopg.DataError("not a binary COPY stream")
                offset, first = _HEADER.size + extension, False
            if len(data) - offset == 2:  # the trailer: -1
                continue
            _fields, _size, count, length = _FIELD.unpack_from(data, offset)
            if count:
                start = offset + _FIELD.size
                feed.put((finish(bytes(data[start : start + length])), count))
            feed.end_unit()


def reader(
    conn: psycopg.Connection[Any],
    relation: str,
    row_sql: str,
    condition: str,
    params: list[Any],
    blocks: int,
    step: int,
    index: int,
    readers: int,
) -> Callable[[Feed[tuple[bytes, int]]], None]:
    """Reader ``index`` of ``readers``: the ranges ``index, index + readers, …`` of the table."""
    last = max(0, blocks - 1) // step * step  # where the last range starts

    def read(feed: Feed[tuple[bytes, int]]) -> None:
        first = index * step
        if first > last:
            return
        statement = chunk_statement(relation, row_sql, condition)
        copy_ranges(conn, statement, [first, last, readers * step, last, step, *params], feed)

    return read


class _BytesLoader(Loader):
    def load(self, data: Buffer) -> bytes:
        return bytes(data)


def cursor_chunks(
    conn: psycopg.Connection[Any], name: str, query: str, params: list[Any], rows: int
) -> Iterator[tuple[bytes, int]]:
    """Rows of one JSON text each (a view, a partitioned table), joined ``rows`` at a time."""
    with savepoint(conn), conn.cursor(name=name) as cursor:
        cursor.adapters.register_loader("text", _BytesLoader)
        cursor.execute(query, params)
        while batch := cursor.fetchmany(rows):
            yield finish(b"\n".join([row[0] for row in batch])), len(batch)


class Helpers:
    """Connections that read inside another connection's snapshot; closed when it ends.

    Opened on the first read that wants them (``get``), each in a
    ``REPEATABLE READ, READ ONLY`` transaction that imports the snapshot
    exported by the main connection. When the server refuses one (its
    connection limit, a standby), the read goes on with fewer: helpers are an
    optimisation, never a reason for a run to fail.
    """

    def __init__(self, connect: Callable[[], psycopg.Connection[Any]]) -> None:
        self._connect = connect
        self.connections: list[psycopg.Connection[Any]] = []
        self._snapshot: str | None = None
        self._refused = False

    def get(self, main: psycopg.Connection[Any], wanted: int) -> list[psycopg.Connection[Any]]:
        """Up to ``wanted`` connections seeing ``main``'s snapshot (``main`` is in its transaction)."""
        self.connections = [conn for conn in self.connections if not (conn.broken or conn.closed)]
        if self._refused or len(self.connections) >= wanted:
            return self.connections[:wanted]
        if self._snapshot is None:
            # Not in a savepoint: a snapshot cannot be exported from a subtransaction, and a
            # failure would end the transaction. A standby cannot export one before PG 16.
            if main.execute("SELECT pg_is_in_recovery()").fetchone()[0]:  # type: ignore[index]
                self._refused = True
                return []
            self._snapshot = main.execute("SELECT pg_export_snapshot()").fetchone()[0]  # type: ignore[index]
        while len(self.connections) < wanted:
            try:
                conn = self._connect()
            except Exception:  # noqa: BLE001 — any refusal: read with fewer connections
                self._refused = True
                break
            try:
                conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                conn.execute(f"SET TRANSACTION SNAPSHOT '{self._snapshot}'")  # '0000000A-0000002B-1'
            except psycopg.Error:
                conn.close()
                self._refused = True
                break
            self.connections.append(conn)
        return self.connections

    def broken(self) -> bool:
        return any(conn.broken for conn in self.connections)

    def cancel(self) -> None:
        for conn in list(self.connections):
            with suppress(psycopg.Error):
                conn.cancel_safe(timeout=5)

    def close(self) -> None:
        """The main transaction ends: so do the helpers' (they only ever read)."""
        for conn in self.connections:
            with suppress(psycopg.Error):
                conn.close()
        self.connections, self._snapshot, self._refused = [], None, False
