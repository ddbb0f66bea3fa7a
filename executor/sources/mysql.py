"""The MySQL / MariaDB source (PyMySQL): ``--source mysql://user:pass@host:3306/dbname``.

``mariadb://`` is the same source. The URL must name a database; its tables and
views are the schemas. Query parameters: ``unix_socket``, ``connect_timeout``
(default 10 s), ``ssl_ca``, ``ssl_cert``, ``ssl_key``, ``ssl_verify_cert``,
``ssl_verify_identity``, ``ssl_disabled``. The password may hold a raw ``@`` or
``:`` (the last ``@`` ends it); ``/``, ``?`` and ``#`` must be percent-encoded, or
the URL is refused.

Reading. The session is read-only (``SET SESSION TRANSACTION … READ ONLY``,
isolation REPEATABLE READ, time zone UTC) and every read of a run happens inside
one ``START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY`` (``snapshot()``).
That snapshot covers InnoDB tables; MyISAM/Aria tables have no snapshots and are
read as they are at that moment. Each row's JSON is built by the server, a
primary-key range at a time (``executor.sources.myread``; on MariaDB by two connections
in the one snapshot, ``executor.sources.mysnap``); tables without an integer primary key,
and tables with a type built row by row, stream through an unbuffered ``SSCursor``
with ``fetchmany``: no OFFSET, never a whole table in memory.

Stopping a read early (cancel, disk full, an error while writing). MySQL's
protocol has no way to abandon a streaming result: the client must read it to
its end. So the server is told to stop: ``KILL QUERY`` from a second,
short-lived connection; the client then reads only what was already on its way
(the socket buffers) up to the server's "Query execution was interrupted", in
milliseconds, and the connection and its snapshot go on. When that second
connection cannot be opened (the server's connection limit), the read's own
connection is closed instead: the rest of that snapshot is lost ("closed when a
read stopped early"), and the next call outside a snapshot connects again.

Schemas. Base tables (and MariaDB system-versioned tables: their current rows)
and views of the URL's database; sequences are not listed. A row has every
column ``describe`` lists, INVISIBLE ones included (``SELECT *`` leaves them out).

Row counts (``executor.sources.server``): a table's size is its
``DATA_LENGTH``, at least 64 bytes a row of ``TABLE_ROWS`` (``mysnap.TABLE_SIZE_SQL``:
InnoDB's statistics lag behind a bulk load), the estimate
``information_schema.TABLES.TABLE_ROWS``; a table the session cannot count gets
the estimate.

Type fidelity (MySQL/MariaDB → JSON value):

=============================== ==============================================
MySQL / MariaDB                 JSON
=============================== ==============================================
TINYINT … BIGINT (UNSIGNED)     number (64-bit, unsigned included, exact);
                                ZEROFILL, like a display width, changes no
                                value: 42, never 00042
TINYINT(1) / BOOLEAN            number 0 / 1 (it is TINYINT: -128…127 fit;
                                describe shows ``tinyint(1)``)
BIT(n)                          number, the bits as an unsigned integer
                                (BIT(1): 0 / 1)
FLOAT, DOUBLE                   number, the shortest form that reads back as
                                the stored value (a FLOAT: as a float32, the
                                digits PostgreSQL gives a ``real``); the
                                display width of FLOAT(M,D) / DOUBLE(M,D) and
                                ZEROFILL are ignored. MySQL cannot store NaN
                                or Infinity
DECIMAL / NUMERIC               string with the exact digits (``"12.50"``;
                                ZEROFILL pads none: ``"1.500"``)
YEAR                            number (YEAR(2) too: 2024, not 24)
CHAR, VARCHAR, TEXT             string, exact (utf8mb4)
ENUM                            string
SET                             string, members comma-separated (``"a,c"``)
BINARY, VARBINARY, BLOB         string, base64 (BINARY(n) keeps its 0x00 padding)
GEOMETRY types                  string, base64 of MySQL's internal value
JSON (MySQL's type, MariaDB's   the JSON value itself, nested; its text is copied
LONGTEXT CHECK json_valid)      as is (made one line); describe shows ``json``.
                                Text that is no JSON (RFC 8259) though MariaDB's
                                json_valid accepts it (``[1.]``, ``"\\x"``): a JSON
                                string holding the text (``rowjson.lenient_json``).
                                Through a view: LONGTEXT, a string. A JSON
                                ``null`` and SQL NULL are both null
DATE                            ``"2024-01-02"``
DATETIME                        ``"2024-01-02T03:04:05.123456"`` (no offset)
TIMESTAMP                       ``"2024-01-02T03:04:05.123456Z"`` (UTC: MySQL
                                stores TIMESTAMP as an instant)
TIME                            ``"03:04:05.5"`` as MySQL prints it: TIME is also
                                a duration, so ``"-12:30:00"``, ``"838:59:59"``
zero and partial dates          as MySQL prints them, never an ISO date:
                                ``"0000-00-00"``, ``"0000-00-00 00:00:00"``,
                                ``"2024-00-15"``
NULL                            null
=============================== ==============================================
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import pymysql
import pymysql.cursors
from pymysql.constants import ER

from executor.credentials import ambiguous_password
from executor.filters import compile_where
from executor.sources import myread, mysnap
from executor.sources.base import SourceError, foreign_keys
from executor.sources.myconnect import URL_OPTIONS, Connector
from executor.sources.myconv import CONVERSIONS, RAW_CONVERSIONS, RowLines, raw_results
from executor.sources.parallel import in_order
from executor.sources.rowjson import lower_first, one_line
from executor.sources.server import Listed, ServerSource

NUMERIC_TYPES = {
    "tinyint", "smallint", "mediumint", "int", "integer", "bigint", "decimal", "numeric",
    "float", "double", "real", "bit", "year",
}  # fmt: skip

# Lost-connection errors: the server or the network went away.
CONNECTION_LOST = {2006, 2013, 2055, 1927, 4031}
# Connections refused for want of a privilege: the database (1044), the host (1130), a locked account.
REFUSED = {ER.DBACCESS_DENIED_ERROR, ER.HOST_NOT_PRIVILEGED, 4151}


# ---------------------------------------------------------------- the source


def _ident(identifier: str) -> str:
    return "`" + identifier.replace("`", "``") + "`"


def _quote(identifier: str) -> str:
    # Doubled '%' because every statement is sent with a parameter tuple.
    return _ident(identifier).replace("%", "%%")


class MySQLSource(ServerSource):
    """A read-only MySQL / MariaDB connection (see the module docstring for the rules)."""

    dialect = "mysql"
    #: Each row's JSON built by the server (``executor.sources.myread``); False: row by row.
    server_json = True
    _errors = (pymysql.err.MySQLError,)
    _columns_sql = (
        "SELECT COLUMN_NAME FROM information_schema.COLUMNS"
        " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %s ORDER BY ORDINAL_POSITION"
    )
    _quote = staticmethod(_quote)
    read_connections = 2  #: reading one big table at once, on MariaDB (``executor.sources.mysnap``)

    def __init__(self, location: str) -> None:
        super().__init__(location)
        self._mariadb = "mariadb" in self._conn.get_server_info().lower()
        self._helpers = mysnap.Helpers(self._connector.session)
        if self._mariadb:
            self._label = "MariaDB"

    def _configure(self, location: str) -> None:
        self._label = "MariaDB" if location.lower().startswith("mariadb:") else "MySQL"
        try:
            url = urlsplit(location)
            if ambiguous_password(location, url.netloc.rpartition("@")[0] if "@" in url.netloc else None):
                raise SourceError(
                    f"The {self._label} URL is ambiguous: a '/', '?' or '#' in the password ends the "
                    "host for the driver; write them as %2F, %3F and %23 (and an '@' after the host "
                    "as %40)"
                )
            port = url.port or 3306
        except ValueError as exc:
            raise SourceError(f"Invalid {self._label} URL: {self._reason(exc)}") from None
        self._host = url.hostname or "localhost"
        self._port = port
        self._database = unquote(url.path.lstrip("/"))
        if not self._database or "/" in self._database:
            raise SourceError(
                f"The {self._label} URL must name one database: "
                f"{url.scheme}://user:password@host:port/database"
            )
        options: dict[str, Any] = {"connect_timeout": 10}
        for key, value in parse_qsl(url.query, keep_blank_values=True):
            if key not in URL_OPTIONS:
                raise SourceError(
                    f"Unknown option '{key}' in the {self._label} URL; "
                    f"known options: {', '.join(sorted(URL_OPTIONS))}"
                )
            try:
                options[key] = URL_OPTIONS[key](value)
            except ValueError:
                raise SourceError(f"Invalid value for '{key}' in the {self._label} URL") from None
        self._connector = Connector(
            {
                "host": self._host,
                "port": self._port,
                "user": unquote(url.username) if url.username else None,
                "password": unquote(url.password or ""),
                "database": self._database,
                "charset": "utf8mb4",
                "autocommit": True,  # outside snapshot() every statement sees fresh data
                "conv": CONVERSIONS,
                **options,
            }
        )
        self._stream: pymysql.cursors.SSCursor | None = None  # a read in progress
        self._closed_by_stopped_read = False

    def _open(self) -> pymysql.Connection:
        conn = self._connector.session()
        self._closed_by_stopped_read = False
        return conn

    def _connect_reason(self, exc: BaseException) -> str:
        message = str(self._message(exc))
        # "Can't connect to MySQL server on 'h' ([Errno 111] Connection refused)"
        found = re.search(r"\[Errno -?\d+\] ([^)]*)\)", message)
        if found:
            message = found.group(1)
        return one_line(lower_first(message), *self._secrets)

    def _refused(self, exc: BaseException) -> bool:
        return (exc.args[0] if exc.args else None) in REFUSED

    def _disconnect(self) -> None:
        if self._conn.open:
            self._conn.close()

    def interrupt(self) -> None:
        # The running statements fail with "Query execution was interrupted" and the worker stops.
        self._kill_query(*self._helpers.thread_ids())

    def _kill_query(self, *helpers: int) -> bool:
        """KILL QUERY this connection's statement (and helpers'), from a second, short-lived connection.

        Thread-safe (this connection may be busy reading). Killing an idle connection's
        query does nothing: its next statement runs. False when it could not be sent.
        """
        try:
            killer = self._connector.connect(connect_timeout=5)
        except (pymysql.err.MySQLError, OSError):
            return False
        try:
            with killer.cursor() as cursor:
                for thread_id in (self._conn.thread_id(), *helpers):
                    cursor.execute("KILL QUERY %s", (thread_id,))
        except pymysql.err.MySQLError:
            return False
        finally:
            killer.close()
        return True

    def _gone(self) -> bool:
        return not self._conn.open

    def _message(self, exc: BaseException) -> BaseException | str:
        args = getattr(exc, "args", ())
        return args[1] if len(args) > 1 and isinstance(args[1], str) else str(exc)

    def _missing_table(self, exc: BaseException) -> bool:
        return bool(exc.args) and exc.args[0] == ER.NO_SUCH_TABLE

    def _lost(self, exc: BaseException) -> bool:
        return (exc.args[0] if exc.args else None) in CONNECTION_LOST or self._gone()

    def _fetch(self, query: str, params: Any = ()) -> list[tuple[Any, ...]]:
        if self._stream is not None:
            raise RuntimeError("a json_batches() read is still in progress on this source")
        if not self._conn.open:
            why = " when a read stopped early" if self._closed_by_stopped_read else ""
            raise SourceError(f"The connection to {self._label} was closed{why}; the snapshot is lost")
        with self._conn.cursor() as cursor:
            cursor.execute(query, params)
            return list(cursor.fetchall())

    def _tables(self, name: str | None = None) -> list[Listed]:
        """The database's base tables (and system-versioned ones) and views."""
        query = f"""
            SELECT t.TABLE_NAME, t.TABLE_TYPE, {mysnap.TABLE_SIZE_SQL}, t.TABLE_ROWS,
                   (SELECT COUNT(*) FROM information_schema.COLUMNS c
                     WHERE c.TABLE_SCHEMA = t.TABLE_SCHEMA AND c.TABLE_NAME = t.TABLE_NAME)
              FROM information_schema.TABLES t
             WHERE t.TABLE_SCHEMA = DATABASE()
               AND t.TABLE_TYPE IN ('BASE TABLE', 'SYSTEM VERSIONED', 'VIEW')
        """
        if name is None:
            rows = sorted(self._fetch(query))
        else:
            # information_schema compares names case-insensitively; the table's name is exact.
            rows = [row for row in self._fetch(query + " AND t.TABLE_NAME = %s", (name,)) if row[0] == name]
        return [
            Listed(
                name=table,
                kind="view" if table_type == "VIEW" else "table",
                sql=_quote(table),
                columns=columns,
                size=None if table_type == "VIEW" else data_bytes,
                estimate=None if table_type == "VIEW" or estimate is None else int(estimate),
                key=table,
            )
            for table, table_type, data_bytes, estimate, columns in rows
        ]

    def _listing(self) -> list[Listed]:
        return self._tables()

    def _lookup(self, name: str) -> Listed | None:
        tables = self._tables(name)
        return tables[0] if tables else None

    def _exact_count(self, listed: Listed) -> int | None:
        try:
            return super()._exact_count(listed)
        except pymysql.err.MySQLError:
            if not self._conn.open:
                raise
            return None  # e.g. no SELECT privilege: the estimate will do for a listing

    def _json_columns(self, name: str) -> set[str]:
        """Columns holding JSON: MySQL's JSON type, MariaDB's LONGTEXT CHECK (json_valid(col))."""
        columns = {
            column
            for column, data_type in self._fetch(
                "SELECT COLUMN_NAME, DATA_TYPE FROM information_schema.COLUMNS"
                " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %s",
                (name,),
            )
            if data_type == "json"
        }
        if self._mariadb:
            checks = {
                clause
                for (clause,) in self._fetch(
                    "SELECT CHECK_CLAUSE FROM information_schema.CHECK_CONSTRAINTS"
                    " WHERE CONSTRAINT_SCHEMA = DATABASE() AND TABLE_NAME = %s",
                    (name,),
                )
            }
            columns |= {
                column for (column,) in self._fetch(
                    "SELECT COLUMN_NAME FROM information_schema.COLUMNS"
                    " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %s",
                    (name,),
                )
                if f"json_valid({_ident(column)})" in checks
            }  # fmt: skip
        return columns

    def _select_list(self, name: str) -> tuple[str, set[str]]:
        """``*``, or every column (INVISIBLE ones too, which ``*`` leaves out), those whose text is
        not their value cast; and the FLOATs.

        A FLOAT prints 6 significant digits, a FLOAT(M,D) or DOUBLE(M,D) D decimals, whatever
        is stored; MariaDB's YEAR(2) prints 2024 as 24; a DECIMAL ZEROFILL pads its digits with
        zeros (integers and doubles are parsed, padding and all). FLOAT values then arrive as
        doubles holding the float32 exactly (see shortest_float32).
        """
        parts, cast, float32_columns = [], False, set()
        for column, data_type, column_type, scale, extra, table in self._fetch(
            "SELECT COLUMN_NAME, DATA_TYPE, COLUMN_TYPE, NUMERIC_SCALE, EXTRA, TABLE_NAME"
            " FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %s"
            " ORDER BY ORDINAL_POSITION",
            (name,),
        ):
            if table != name:
                continue  # another letter case's table
            quoted = _quote(column)
            if "INVISIBLE" in (extra or "").upper():
                cast = True  # SELECT * leaves it out (MariaDB 10.3, MySQL 8.0.23); describe lists it
            if data_type == "float" or (data_type == "double" and scale is not None):
                if data_type == "float":
                    float32_columns.add(column)
                quoted, cast = f"CAST({quoted} AS DOUBLE) AS {quoted}", True
            elif column_type.lower() == "year(2)":
                quoted, cast = f"YEAR({quoted}) AS {quoted}", True
            elif data_type in ("decimal", "numeric") and column_type.lower().endswith("zerofill"):
                quoted, cast = f"{quoted} + 0 AS {quoted}", True
            parts.append(quoted)
        # '*' otherwise: a view the server cannot open lists no columns here, and SELECT *
        # then fails with the server's own reason.
        return (", ".join(parts) if cast else "*"), float32_columns

    def _structure(self, listed: Listed) -> dict[str, Any]:
        name = listed.key
        index_rows = self._fetch(
            "SELECT INDEX_NAME, NON_UNIQUE, COLUMN_NAME FROM information_schema.STATISTICS"
            " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %s ORDER BY SEQ_IN_INDEX",
            (name,),
        )
        indexes: dict[str, dict[str, Any]] = {}
        for index_name, non_unique, column in index_rows:
            index = indexes.setdefault(
                index_name, {"name": index_name, "columns": [], "unique": not int(non_unique)}
            )
            index["columns"].append(column)
        primary_key = indexes["PRIMARY"]["columns"] if "PRIMARY" in indexes else []

        rows = self._fetch(
            """
            SELECT k.CONSTRAINT_NAME, k.REFERENCED_TABLE_SCHEMA, k.REFERENCED_TABLE_NAME, k.COLUMN_NAME,
                   k.REFERENCED_COLUMN_NAME, r.UPDATE_RULE, r.DELETE_RULE
              FROM information_schema.KEY_COLUMN_USAGE k
              JOIN information_schema.REFERENTIAL_CONSTRAINTS r
                ON r.CONSTRAINT_SCHEMA = k.CONSTRAINT_SCHEMA
               AND r.CONSTRAINT_NAME = k.CONSTRAINT_NAME AND r.TABLE_NAME = k.TABLE_NAME
             WHERE k.TABLE_SCHEMA = DATABASE() AND k.TABLE_NAME = %s
               AND k.REFERENCED_TABLE_NAME IS NOT NULL
             ORDER BY k.ORDINAL_POSITION
            """,
            (name,),
        )
        keys = foreign_keys(
            (constraint, table if schema == self._database else f"{schema}.{table}", *rest)
            for constraint, schema, table, *rest in rows
        )

        json_columns = self._json_columns(name)
        columns = {}
        for (
            column_name, column_type, nullable, default, extra, data_type, precision, scale,
            generation,
        ) in self._fetch(
            """
            SELECT COLUMN_NAME, COLUMN_TYPE, IS_NULLABLE, COLUMN_DEFAULT, EXTRA, DATA_TYPE,
                   NUMERIC_PRECISION, NUMERIC_SCALE, GENERATION_EXPRESSION
              FROM information_schema.COLUMNS
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %s ORDER BY ORDINAL_POSITION
            """,
            (name,),
        ):  # fmt: skip
            extra = (extra or "").lower()
            generated = "generated" in extra and "default_generated" not in extra
            column: dict[str, Any] = {
                "type": "json" if column_name in json_columns else column_type,
                "required": nullable == "NO",
                "default": None if generated else self._default_sql(default, data_type, extra),
                "primary_key": column_name in primary_key,
            }
            if data_type in ("decimal", "numeric"):
                column["precision"], column["scale"] = int(precision), int(scale)
            if "auto_increment" in extra:
                column["auto_increment"] = True
            if generated:
                column["generated"] = generation
            columns[column_name] = column
        return {
            "columns": columns,
            "primary_key": primary_key,
            "foreign_keys": [keys[key] for key in sorted(keys)],
            "indexes": [indexes[key] for key in sorted(indexes) if key != "PRIMARY"],  # primary_key
        }

    def _default_sql(self, default: str | None, data_type: str, extra: str) -> str | None:
        """COLUMN_DEFAULT as an SQL expression (None: no default, or DEFAULT NULL)."""
        if default is None:
            return None
        if self._mariadb:  # MariaDB ≥ 10.2.7 already shows SQL: 'text', 0, current_timestamp()
            return None if default == "NULL" else default
        # MySQL shows literals bare and marks expressions DEFAULT_GENERATED.
        if "default_generated" in extra or data_type in NUMERIC_TYPES:
            return default
        return "'" + default.replace("'", "''") + "'"

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        wanted = self.read_connections - 1 if self._mariadb and self.server_json else 0
        with self._translate("start a read transaction"):
            self._helpers.begin(self._conn, wanted)
        try:
            yield
        finally:
            self._helpers.close()
            if self._stream is not None:  # a read left suspended, its generator not closed
                self._stop_stream(self._stream)
            if self._conn.open:
                # Read-only: COMMIT is ROLLBACK. A failure here loses nothing: every read
                # already succeeded, or failed with its own error.
                with suppress(pymysql.err.MySQLError):
                    self._fetch("COMMIT")

    def json_lines(
        self, name: str, where: dict[str, Any] | None, batch_size: int
    ) -> Iterator[tuple[bytes, int]]:
        """Chunks of JSON lines built by the server (``executor.sources.myread``) where it can."""
        listed = self._resolve(name)
        clause, params = compile_where(where, self._quote, "%s")
        with self._translate(f"read '{name}'", name):
            json_columns = self._json_columns(listed.key) if self.server_json else set()
            row_sql, key = self._server_row(listed.key, json_columns) if self.server_json else (None, None)
            if row_sql is None:
                for batch in self._rows(listed, clause, params, batch_size):
                    yield b"\n".join(batch), len(batch)
            elif key is None:  # no integer primary key: one row at a time, still built by the server
                query = f"SELECT CAST({row_sql} AS BINARY) FROM {listed.sql}{clause}"
                for rows in self._stream_rows(query, params, batch_size, raw=True):
                    yield myread.finish(b"\n".join([row[0] for row in rows])), len(rows)
            else:
                readers = self._key_readers(listed, row_sql, key, clause, params, json_columns)
                yield from in_order(readers, "mysql-read") if readers else ()

    def json_batches(self, name: str, where: dict[str, Any] | None, batch_size: int) -> Iterator[list[bytes]]:
        for chunk, _ in self.json_lines(name, where, batch_size):
            lines = chunk.split(b"\n")
            for start in range(0, len(lines), batch_size):
                yield lines[start : start + batch_size]

    def _server_row(self, name: str, json_columns: set[str]) -> tuple[str | None, str | None]:
        """The SQL of a row's JSON (its ``%`` doubled) and the integer primary key, quoted; or Nones."""
        return myread.server_row(self._fetch, name, json_columns, _ident, self._conn.escape)

    def _key_readers(
        self, listed: Listed, row_sql: str, key: str, clause: str, params: list[Any], json_columns: set[str]
    ) -> list[Any]:
        """Readers of ``in_order``: the table's chunks by primary-key ranges (``myread.reader``)."""
        low, high = self._fetch(f"SELECT MIN({key}), MAX({key}) FROM {listed.sql}")[0]
        if low is None:
            return []
        limit = min(self._fetch("SELECT @@max_allowed_packet, @@group_concat_max_len")[0])
        size = max(listed.size or 0, 1)
        # The first range's width: as if the table's JSON took what its data takes on disk.
        width = max(1, (high - low + 1) * myread.CHUNK_BYTES // size)
        connections = [self._conn, *self._helpers.connections][: 1 + size // mysnap.PARALLEL_MIN_BYTES]
        unit = myread.unit_width(low, high, size, len(connections))
        where = f"{clause} AND {key} BETWEEN %s AND %s" if clause else f" WHERE {key} BETWEEN %s AND %s"
        query = (
            # GROUP_CONCAT cuts each value at the length its expression declares, which a
            # number's text can pass (MariaDB prints 1.7763568394002505e-15 with 33 characters):
            # an empty string declared 16M characters long makes room.
            f"SELECT COUNT(*), CAST(GROUP_CONCAT(CONCAT({row_sql}, CAST('' AS CHAR(16777216)))"
            " SEPARATOR '\\n') AS BINARY)"
            f" FROM {listed.sql} FORCE INDEX (PRIMARY){where}"
        )
        columns, float32_columns = self._select_list(listed.key)
        single_row = f"SELECT {columns} FROM {listed.sql}{clause} {'AND' if clause else 'WHERE'} {key} = %s"
        encode = RowLines(json_columns, float32_columns)
        ranges, readers = myread.Ranges(key, low, high, width), []
        for index, conn in enumerate(connections):

            def fetch(first: int, last: int, conn: pymysql.Connection = conn) -> tuple[int, bytes | None]:
                with conn.cursor() as cursor, raw_results(conn):
                    cursor.execute(query, (*params, first, last))
                    return cursor.fetchone()

            def single(value: int, conn: pymysql.Connection = conn) -> Iterator[tuple[bytes, int]]:
                # A row too big for GROUP_CONCAT: read as the row-by-row path reads it.
                with conn.cursor() as cursor:
                    cursor.execute(single_row, (*params, value))
                    lines = encode(cursor.fetchall(), cursor.description or ())
                if lines:
                    yield b"\n".join(lines), len(lines)

            readers.append(myread.reader(fetch, single, ranges, unit, limit, index, len(connections)))
        return readers

    def _rows(self, listed: Listed, clause: str, params: list[Any], batch_size: int) -> Iterator[list[bytes]]:
        columns, float32_columns = self._select_list(listed.key)
        encode = RowLines(self._json_columns(listed.key), float32_columns)
        query = f"SELECT {columns} FROM {listed.sql}{clause}"
        for rows in self._stream_rows(query, params, batch_size):
            yield encode(rows, self._stream_description)

    def _stream_rows(
        self, query: str, params: list[Any], batch_size: int, raw: bool = False
    ) -> Iterator[list[tuple[Any, ...]]]:
        """The rows of one statement through an unbuffered cursor, ``batch_size`` at a time."""
        cursor = self._conn.cursor(pymysql.cursors.SSCursor)
        self._stream = cursor
        self._conn.decoders = RAW_CONVERSIONS if raw else CONVERSIONS
        try:
            cursor.execute(query, params)
            self._stream_description = cursor.description or ()
            while rows := cursor.fetchmany(batch_size):
                yield rows
            self._stream = None
            cursor.close()
        finally:
            self._conn.decoders = CONVERSIONS
            if self._stream is cursor:  # stopped early, or failed
                self._stop_stream(cursor)

    def _stop_stream(self, cursor: pymysql.cursors.SSCursor) -> None:
        """End a read before its last row: KILL QUERY, else close the connection (module docstring)."""
        self._stream = None
        if self._conn.open and self._kill_query():
            # Reads what the server had already sent, up to its "Query execution was
            # interrupted" (or the last row): the result is over, the connection goes on.
            with suppress(pymysql.err.MySQLError):
                cursor.close()
            if self._conn.open:
                cursor.close()  # a close that met the error stopped before marking the cursor closed
                return
        # No second connection (the server's connection limit), or this one is gone.
        self._closed_by_stopped_read = True
        self._disconnect()
        _forget(cursor)


def _forget(cursor: pymysql.cursors.SSCursor) -> None:
    """Close a streaming cursor whose connection is closed: nothing is left to read.

    PyMySQL (1.1, 1.2) has no public way to: its result still waits for the rest of
    the rows, and the cursor's ``close()`` and the result's finalizer would read them
    from the closed socket and raise ("Exception ignored in MySQLResult.__del__").
    The one use of PyMySQL's private state, and only once the socket is gone.
    """
    result = cursor._result
    if result is not None:
        result.unbuffered_active = False
    cursor.close()
