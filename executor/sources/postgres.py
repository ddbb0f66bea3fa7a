"""The PostgreSQL source (psycopg 3): ``--source postgresql://user@host:5432/dbname``.

PostgreSQL 12 or later. The URL is libpq's (``postgres://`` too, with its query
parameters: ``sslmode``, ``connect_timeout`` (default here 10 s), ``options``…).
libpq ends the user-info at the first ``@`` or ``/``: a password holding either
must be percent-encoded (``%40``, ``%2F``), and a URL libpq would split otherwise
than the redaction does (``executor.credentials``) is refused, never connected to.

Reading. The session is read-only (``default_transaction_read_only``) and every
read of a run happens inside one ``REPEATABLE READ, READ ONLY, DEFERRABLE``
transaction (``snapshot()``; DEFERRABLE only matters at SERIALIZABLE and is
harmless here). Each row's JSON is built by the server and a table is read in
chunks of heap block ranges, a big one by several connections sharing the
snapshot (``executor.sources.pgread``); tables with array columns stream through
a named server-side cursor with ``fetchmany``. No OFFSET, never a whole table
in memory.

Schemas. Tables, partitioned tables and views of every namespace except
``pg_*`` and ``information_schema``, named ``table`` in ``public`` and
``namespace.table`` elsewhere (when ``public`` holds a table literally named
``a.b`` and namespace ``a`` a table ``b``, the name means the ``public`` one, and
only that one is listed).
Partitions are not listed: their rows are exported through their partitioned
table. Materialized views are listed as views (exported only when named;
an unpopulated one fails the run with PostgreSQL's message). Foreign tables
are not listed: their rows live in another server, outside the snapshot.

Encoding. Text comes as UTF-8. A ``SQL_ASCII`` database stores text unchecked and
PostgreSQL will not send bytes that are not UTF-8 to a UTF8 client: its session
reads as LATIN1 (every byte as it is), and its values and names are exported and
listed with those bytes as U+FFFD, as SQLite's (names differing only there look
alike; the first listed is the one a name means). A filter's columns and values
are sent as UTF-8.

Row counts (``executor.sources.server``): a table's size is its size on disk,
the estimate PostgreSQL's planner's (``pg_class.reltuples``, null when the
table was never analyzed); an unpopulated materialized view has none.

Type fidelity (PostgreSQL → JSON value):

=============================== ==============================================
PostgreSQL                      JSON
=============================== ==============================================
smallint, integer, bigint, oid  number (64-bit integers exact)
real, double precision          number (shortest exact form); ``"NaN"``,
                                ``"Infinity"``, ``"-Infinity"`` as strings
numeric / decimal               string with the exact digits (``"12.50"``,
                                ``"NaN"``, ``"Infinity"``), never a float
boolean                         true / false
text, varchar, char, name, enum string, exact (char(n) keeps its padding)
bytea                           string, base64
uuid                            string (``"a0eebc99-…"``)
json, jsonb                     the JSON value itself, nested; its text is
                                copied as is (made one line), so numbers keep
                                every digit and json keeps key order; a JSON
                                null is null, as SQL NULL is
date                            ``"2024-01-02"``
timestamp                       ``"2024-01-02T03:04:05.123456"`` (no offset)
timestamp with time zone        ``"2024-01-02T03:04:05.123456Z"`` (UTC)
time                            ``"03:04:05.5"``
time with time zone             ``"03:04:05+02:00"``
date/timestamp ±infinity        ``"infinity"``, ``"-infinity"``
BC dates and timestamps         astronomical ISO 8601 years: 1 BC is
                                ``"0000-…"``, 44 BC is ``"-0043-…"``
interval                        ISO 8601 duration (``"P1Y2M3DT4H5M6.5S"``;
                                each part signed: ``"P-1Y-2M3DT-4H"``)
arrays (any dimension)          arrays, nested, each element as above (an
                                array of a domain: as the domain's base type);
                                one with a lower bound other than 1: its
                                text, ``"[0:1]={1,2}"`` (as a list, it would be
                                ``'{1,2}'``; the session's text: UTC, ISO)
anything else (inet, money,     string, PostgreSQL's text form: the output
ranges, geometry, composite,    function's, what psql shows (inet '10.0.0.1'
bit, xml, tsvector, …)          is "10.0.0.1"; ::text adds "/32"); int2vector
                                and oidvector too (``"1 2 3"``): they are not
                                arrays, whatever their category
NULL                            null
=============================== ==============================================

Fractional seconds carry the digits PostgreSQL prints (trailing zeros dropped).
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import psycopg
import psycopg.errors
from psycopg.conninfo import conninfo_to_dict
from psycopg.postgres import types as builtin_types
from psycopg.pq import Format
from psycopg.types import TypeInfo
from psycopg.types.array import register_array

from executor.credentials import ambiguous_password
from executor.filters import compile_where
from executor.sources import pgread
from executor.sources.base import SourceError
from executor.sources.parallel import in_order
from executor.sources.pgload import (
    BoundsLoader,
    UncheckedStrDumper,
    as_session_text,
    configure_loaders,
    read_unchecked,
    shown,
    shown_value,
    start_session,
)
from executor.sources.rowjson import RowEncoder, lower_first, one_line, valid_utf8
from executor.sources.server import Listed, ServerSource

JSON_OIDS = frozenset({114, 199, 3802, 3807})  # json, json[], jsonb, jsonb[]

# Every type a table's columns are made of: the column types, then (repeatedly) a domain's
# base type and an array's element type. An array is a type whose text is array_out's
# ("{1,2}"): int2vector and oidvector have an element type and the array category but their
# own text ("1 2 3"), and point, box, name… an element type too; those are scalars here.
_USED_TYPES_SQL = """
WITH RECURSIVE used(oid) AS (
    SELECT atttypid FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped
    UNION
    SELECT CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.typelem END
      FROM used JOIN pg_type t ON t.oid = used.oid
     WHERE t.typtype = 'd' OR t.typoutput = 'array_out'::regproc
)
SELECT t.oid, t.typtype = 'd', t.typbasetype, t.typelem, t.typoutput = 'array_out'::regproc, t.typdelim
  FROM used JOIN pg_type t ON t.oid = used.oid
"""

# A table gets one more reading connection per this many heap blocks (8 MiB), up to read_connections.
PARALLEL_MIN_BLOCKS = 1024
# The server's reasons for refusing a connection for want of a privilege: the database's
# CONNECT (42501), the role's LOGIN or the host (28000).
REFUSED = (
    "permission denied for database",
    "is not permitted to log in",
    "pg_hba.conf rejects connection",
    "no pg_hba.conf entry",
)

ON_ACTION = {"a": "NO ACTION", "r": "RESTRICT", "c": "CASCADE", "n": "SET NULL", "d": "SET DEFAULT"}


# ---------------------------------------------------------------- the source


def _quote(identifier: str) -> str:
    # Doubled '%' because every statement is sent with a parameter list.
    return '"' + identifier.replace('"', '""').replace("%", "%%") + '"'


def _quote_given(identifier: str) -> str:
    """``_quote`` of a name given in UTF-8 (a filter's column) for a SQL_ASCII session."""
    return _quote(as_session_text(identifier))


# Every relation that is a schema of the source, with what listings need.
_RELATIONS_SQL = """
SELECT CASE WHEN n.nspname = 'public' THEN c.relname ELSE n.nspname || '.' || c.relname END,
       c.oid, n.nspname, c.relname, c.relkind,
       (SELECT count(*) FROM pg_attribute a
         WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped),
       CASE WHEN c.relkind = 'p' THEN
              (SELECT coalesce(sum(pg_relation_size(t.relid)), 0)::bigint
                 FROM pg_partition_tree(c.oid) t WHERE t.isleaf)
            WHEN c.relkind IN ('r', 'm') THEN pg_relation_size(c.oid) END,
       CASE WHEN c.relkind = 'p' THEN
              (SELECT CASE WHEN bool_or(l.reltuples < 0) THEN -1
                           ELSE coalesce(sum(l.reltuples), 0) END::float8
                 FROM pg_partition_tree(c.oid) t JOIN pg_class l ON l.oid = t.relid
                WHERE t.isleaf)
            ELSE c.reltuples::float8 END,
       c.relkind <> 'm' OR c.relispopulated,
       has_table_privilege(c.oid, 'SELECT')
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'p', 'v', 'm') AND NOT c.relispartition
   AND n.nspname <> 'information_schema' AND n.nspname !~ '^pg_'
"""


def _listed(row: tuple[Any, ...], unchecked: bool = False) -> Listed:
    """A row of _RELATIONS_SQL as a listing.

    An exact count only for a table the session may read; the planner's estimate only
    once the table was analyzed (reltuples ≥ 0); neither for a view or an unpopulated
    materialized view. ``unchecked``: names of a SQL_ASCII database, shown as UTF-8.
    """
    name, oid, namespace, relname, relkind, columns, size, estimate, populated, readable = row
    counted = relkind != "v" and populated
    return Listed(
        name=shown(name) if unchecked else name,
        kind="table" if relkind in "rp" else "view",
        sql=f"{_quote(namespace)}.{_quote(relname)}",
        columns=columns,
        size=size if counted and readable else None,
        estimate=int(estimate) if counted and estimate is not None and estimate >= 0 else None,
        key=oid,
    )


class PostgresSource(ServerSource):
    """A read-only PostgreSQL connection (see the module docstring for the rules)."""

    dialect = "postgresql"
    #: Connections reading one big table at once (its snapshot's and helpers sharing it): one
    #: per core of this machine, which parses and writes what they read, up to four. On two
    #: cores, four took 4 % longer than two (bench/RESULTS.md, 2026-12-01).
    read_connections = min(4, len(os.sched_getaffinity(0)))  # the cores this process may use
    #: Each row's JSON built by the server (``executor.sources.pgread``); False: row by row.
    server_json = True
    text_holds_nul = False  # psycopg: "PostgreSQL text fields cannot contain NUL (0x00) bytes"
    _label = "PostgreSQL"
    _errors = (psycopg.Error,)
    _columns_sql = (
        "SELECT attname FROM pg_attribute"
        " WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
    )
    _quote = staticmethod(_quote)

    def _configure(self, location: str) -> None:
        if ambiguous_password(location, _libpq_userinfo(location)):
            raise SourceError(
                "The PostgreSQL URL is ambiguous: libpq ends the user name and password at the first "
                "'@' or '/'; write those characters as %40 and %2F in the password (and an '@' after "
                "the host as %40)"
            )
        try:
            params = conninfo_to_dict(location)
        except psycopg.Error as exc:
            raise SourceError(f"Invalid PostgreSQL URL: {self._reason(exc)}") from None
        self._host = params.get("host") or "localhost"
        self._port = params.get("port") or 5432  # as written until connected: "5432,5433"…
        self._database = params.get("dbname") or params.get("user") or ""
        self._location = location
        self._extra: dict[str, Any] = {}
        if "connect_timeout" not in params:
            self._extra["connect_timeout"] = 10  # a dead host fails start-up in seconds, not minutes
        if "application_name" not in params:
            self._extra["application_name"] = "extracts"
        self._unchecked = False  # a SQL_ASCII database: text read as LATIN1 (CLIENT_ENCODING)
        self._array_oids: set[int] = set()
        self._bounded_oids: set[int] = set()  # arrays whose loader keeps bounds (BoundsLoader)
        self._json_oids = set(JSON_OIDS)  # and the user arrays of JSON registered on this connection
        self._cursor_ids = itertools.count(1)
        self._helpers = pgread.Helpers(self._open_helper)

    def _open(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self._location, autocommit=True, **self._extra)
        try:
            self._unchecked = start_session(conn)
        except psycopg.Error as exc:
            conn.close()
            raise SourceError(f"Cannot configure the PostgreSQL session: {self._reason(exc)}") from None
        self._host = conn.info.host
        self._port = conn.info.port
        self._database = conn.info.dbname
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        conn.deferrable = True
        configure_loaders(conn)
        if self._unchecked:
            conn.adapters.register_dumper(str, UncheckedStrDumper)
        self._quote = _quote_given if self._unchecked else _quote  # a filter's columns, as given
        self._array_oids.clear()
        self._bounded_oids.clear()
        self._json_oids = set(JSON_OIDS)
        return conn

    def _open_helper(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self._location, autocommit=True, **self._extra)
        start_session(conn)
        return conn

    def _connect_reason(self, exc: BaseException) -> str:
        # 'connection to server at "h", port 5432 failed: FATAL:  <the reason>'
        return lower_first(one_line(self._reason(exc).rsplit(" failed: ", 1)[-1]))

    def _refused(self, exc: BaseException) -> bool:
        # libpq keeps no SQLSTATE for a failed connection: the server's message says it.
        return any(reason in str(exc) for reason in REFUSED)

    def _disconnect(self) -> None:
        self._conn.close()

    def interrupt(self) -> None:
        # A cancel request on its own socket (thread-safe); the running statement fails
        # with "canceling statement due to user request" and the worker stops.
        with suppress(psycopg.Error):
            self._conn.cancel_safe(timeout=5)
        self._helpers.cancel()

    def _gone(self) -> bool:
        return self._conn.broken or self._conn.closed

    def _lost(self, exc: BaseException) -> bool:
        return self._gone() or self._helpers.broken()

    def _missing_table(self, exc: BaseException) -> bool:
        return isinstance(exc, psycopg.errors.UndefinedTable)

    def _fetch(self, query: str, params: Any = ()) -> list[tuple[Any, ...]]:
        return self._conn.execute(query, params).fetchall()

    def _catalog(self, query: str, params: Any = ()) -> list[tuple[Any, ...]]:
        """``_fetch`` for what is shown, not sent back: a SQL_ASCII database's names as UTF-8."""
        rows = self._fetch(query, params)
        if not self._unchecked:
            return rows
        return [tuple(shown_value(value) for value in row) for row in rows]

    def _listing(self) -> list[Listed]:
        # One entry per name, the relation the name means (``_lookup``: the public one first). A
        # shadowed relation was listed too: /api/describe showed the name twice, and a run of
        # every table failed on two files of one name.
        rows = self._fetch(_RELATIONS_SQL)
        meant: dict[str, Any] = {}  # name -> oid
        for row in sorted(rows, key=lambda row: (row[2] != "public", row)):
            meant.setdefault(shown(row[0]) if self._unchecked else row[0], row[1])
        kept = set(meant.values())
        return [_listed(row, self._unchecked) for row in sorted(rows) if row[1] in kept]

    def _column_names(self, listed: Listed) -> list[str]:
        return [row[0] for row in self._catalog(self._columns_sql, (listed.key,))]

    def _lookup(self, name: str) -> Listed | None:
        # The public table wins when a name could mean two relations (module docstring).
        if self._unchecked:  # a name shown with U+FFFD has no SQL: compared here
            rows = sorted(self._fetch(_RELATIONS_SQL), key=lambda row: (row[2] != "public", row))
            return next((_listed(row, True) for row in rows if shown(row[0]) == name), None)
        rows = self._fetch(
            _RELATIONS_SQL
            + " AND ((n.nspname = 'public' AND c.relname = %s)"
            + " OR (n.nspname <> 'public' AND n.nspname || '.' || c.relname = %s))"
            + " ORDER BY n.nspname <> 'public' LIMIT 1",
            (name, name),
        )
        return _listed(rows[0]) if rows else None

    def _structure(self, listed: Listed) -> dict[str, Any]:
        oid = listed.key
        constraints = self._catalog(
            """
            SELECT con.contype,
                   ARRAY(SELECT a.attname::text FROM unnest(con.conkey) WITH ORDINALITY k(num, i)
                           JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.num
                          ORDER BY k.i),
                   ARRAY(SELECT a.attname::text FROM unnest(con.confkey) WITH ORDINALITY k(num, i)
                           JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.num
                          ORDER BY k.i),
                   CASE WHEN rn.nspname = 'public' THEN rc.relname::text
                        ELSE rn.nspname || '.' || rc.relname END,
                   con.confupdtype, con.confdeltype
              FROM pg_constraint con
              LEFT JOIN pg_class rc ON rc.oid = con.confrelid
              LEFT JOIN pg_namespace rn ON rn.oid = rc.relnamespace
             WHERE con.conrelid = %s AND con.contype IN ('p', 'f')
             ORDER BY con.conname
            """,
            (oid,),
        )
        primary_key: list[str] = []
        foreign_keys = []
        for contype, columns, ref_columns, ref_table, on_update, on_delete in constraints:
            if contype == "p":
                primary_key = columns
            else:
                foreign_keys.append(
                    {
                        "columns": columns,
                        "references": {"table": ref_table, "columns": ref_columns},
                        "on_update": ON_ACTION.get(on_update, on_update),
                        "on_delete": ON_ACTION.get(on_delete, on_delete),
                    }
                )
        columns = {}
        for name, type_, notnull, default, identity, generated, type_oid, typmod in self._catalog(
            """
            SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                   pg_get_expr(d.adbin, d.adrelid), a.attidentity, a.attgenerated,
                   a.atttypid, a.atttypmod
              FROM pg_attribute a
              LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
             WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped
             ORDER BY a.attnum
            """,
            (oid,),
        ):
            column: dict[str, Any] = {
                "type": type_,
                "required": notnull,
                "default": None if generated else default,
                "primary_key": name in primary_key,
            }
            if type_oid == 1700:  # numeric: its declared precision and scale (None: unconstrained)
                column["precision"], column["scale"] = _numeric_typmod(typmod)
            if identity:
                column["identity"] = "always" if identity == "a" else "by default"
            if generated:
                column["generated"] = default  # GENERATED ALWAYS AS (<expression>) STORED
            columns[name] = column
        indexes = [
            {"name": index_name, "columns": index_columns, "unique": unique}
            for index_name, index_columns, unique in self._catalog(
                """
                SELECT i.relname,
                       ARRAY(SELECT CASE WHEN x.indkey[k - 1] = 0
                                         THEN pg_get_indexdef(x.indexrelid, k, true)
                                         ELSE (SELECT a.attname::text FROM pg_attribute a
                                                WHERE a.attrelid = x.indrelid
                                                  AND a.attnum = x.indkey[k - 1]) END
                               FROM generate_series(1, x.indnkeyatts) k ORDER BY k),
                       x.indisunique
                  FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
                 WHERE x.indrelid = %s AND NOT x.indisprimary  -- that one is primary_key
                 ORDER BY i.relname
                """,
                (oid,),
            )
        ]
        return {
            "columns": columns,
            "primary_key": primary_key,
            "foreign_keys": foreign_keys,
            "indexes": indexes,
        }

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        # BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY DEFERRABLE (set in _open).
        try:
            with self._translate("hold the read transaction"), self._conn.transaction():
                yield
        finally:
            self._helpers.close()

    def json_lines(
        self, name: str, where: dict[str, Any] | None, batch_size: int
    ) -> Iterator[tuple[bytes, int]]:
        """Chunks of JSON lines built by the server (``executor.sources.pgread``) where it can."""
        listed = self._resolve(name)
        clause, params = compile_where(where, self._quote, "%s")
        with self._translate(f"read '{name}'", name):
            with self._reading():
                read = pgread.plan(self._conn, listed.sql, listed.key, listed.kind)
                if read.row_sql is not None and self.server_json:
                    yield from self._server_lines(listed, read, clause, params, batch_size)
                    return
            for batch in self._rows(listed, clause, params, batch_size):  # arrays: row by row
                yield b"\n".join(batch), len(batch)

    def json_batches(self, name: str, where: dict[str, Any] | None, batch_size: int) -> Iterator[list[bytes]]:
        for chunk, _ in self.json_lines(name, where, batch_size):
            lines = chunk.split(b"\n")
            for start in range(0, len(lines), batch_size):
                yield lines[start : start + batch_size]

    def _server_lines(
        self, listed: Listed, read: pgread.Plan, clause: str, params: list[Any], batch_size: int
    ) -> Iterator[tuple[bytes, int]]:
        chunks = self._server_chunks(listed, read, clause, params, batch_size)
        if not self._unchecked:
            yield from chunks
            return
        for chunk, count in chunks:  # a SQL_ASCII database's bytes, as they are stored
            yield valid_utf8(chunk), count

    def _server_chunks(
        self, listed: Listed, read: pgread.Plan, clause: str, params: list[Any], batch_size: int
    ) -> Iterator[tuple[bytes, int]]:
        assert read.row_sql is not None
        if read.blocks is None:  # no heap of its own: the rows of a query
            query = f"SELECT {read.row_sql.replace('%', '%%')} FROM {listed.sql} t{clause}"
            name = f"extracts_{next(self._cursor_ids)}"
            yield from pgread.cursor_chunks(self._conn, name, query, params, batch_size)
            return
        wanted = max(1, min(self.read_connections, read.blocks // PARALLEL_MIN_BLOCKS))
        connections = [self._conn, *self._helpers.get(self._conn, wanted - 1)] if wanted > 1 else [self._conn]
        condition, n = clause.removeprefix(" WHERE "), len(connections)
        yield from in_order(
            [
                pgread.reader(conn, listed.sql, read.row_sql, condition, params, read.blocks, read.step, i, n)
                for i, conn in enumerate(connections)
            ],
            "postgresql-read",
        )

    def _rows(self, listed: Listed, clause: str, params: list[Any], batch_size: int) -> Iterator[list[bytes]]:
        self._register_arrays(listed.key)
        with self._reading():
            cursor = self._conn.cursor(name=f"extracts_{next(self._cursor_ids)}")
            if self._unchecked:
                read_unchecked(cursor.adapters)
            with cursor:
                cursor.execute(f"SELECT * FROM {listed.sql}{clause}", params)
                description = cursor.description or []
                encoder = RowEncoder(
                    [shown(column.name) if self._unchecked else column.name for column in description],
                    [i for i, column in enumerate(description) if column.type_code in self._json_oids],
                )
                while rows := cursor.fetchmany(batch_size):
                    yield encoder.encode(rows)

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """A read transaction for a server-side cursor: the snapshot's, or its own."""
        if self._in_snapshot:
            yield
        else:
            try:
                with self._conn.transaction():
                    yield
            finally:
                self._helpers.close()

    def _register_arrays(self, oid: int) -> None:
        """Teach psycopg the arrays of a table's user-defined types (enum[], composite[], domain[], …).

        Array elements load as values of their base type: PostgreSQL describes a domain
        column by its base type, but an array of a domain by the array's own type, whose
        element is the domain, which has no loader. Domains over domains, domains over
        arrays and arrays of those resolve the same way. Arrays whose elements are JSON
        are remembered, so that RowEncoder copies their text. Every array's loader, built-in
        or not, then keeps lower bounds other than 1 (``BoundsLoader``).
        """
        types = {row[0]: row[1:] for row in self._fetch(_USED_TYPES_SQL, (oid,))}

        def base(type_oid: int) -> int:
            while type_oid in types and types[type_oid][0]:
                type_oid = types[type_oid][1]
            return type_oid

        def holds_json(type_oid: int) -> bool:
            type_oid = base(type_oid)
            if type_oid in JSON_OIDS:
                return True
            return type_oid in types and types[type_oid][3] and holds_json(types[type_oid][2])

        known = {info.array_oid for info in builtin_types} | self._array_oids
        for array_oid, (is_domain, _base, element_oid, is_array, delimiter) in types.items():
            if is_domain or not is_array or element_oid == 0 or array_oid in known:
                continue
            # Named: psycopg swaps a loader class named plain "ArrayLoader" (an empty name) for
            # its C base class, whose element type is unknown, and every element was a string.
            info = TypeInfo("extracts", base(element_oid), array_oid, delimiter=delimiter)
            register_array(info, self._conn)
            self._array_oids.add(array_oid)
            if holds_json(element_oid):
                self._json_oids.add(array_oid)
        for array_oid, (is_domain, _base, element_oid, is_array, _delimiter) in types.items():
            if is_domain or not is_array or element_oid == 0 or array_oid in self._bounded_oids:
                continue
            array = self._conn.adapters.get_loader(array_oid, Format.TEXT)
            if array is not None:
                as_json = array_oid in self._json_oids
                loader = type("BoundsLoader", (BoundsLoader,), {"array": array, "as_json": as_json})
                self._conn.adapters.register_loader(array_oid, loader)
                self._bounded_oids.add(array_oid)


def _numeric_typmod(typmod: int) -> tuple[int | None, int | None]:
    """numeric(p, s) from the attribute's typmod; (None, None) when unconstrained."""
    if typmod < 4:
        return None, None
    packed = typmod - 4
    scale = packed & 0x7FF
    return (packed >> 16) & 0xFFFF, scale - 0x800 if scale & 0x400 else scale  # scale may be < 0


def _libpq_userinfo(location: str) -> str | None:
    """The user-info as libpq reads a URL: up to the first '@', if no '/' comes before it."""
    rest = location.partition("://")[2]
    end = re.search("[@/]", rest)
    return rest[: end.start()] if end and end[0] == "@" else None
