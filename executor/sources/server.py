"""What the two server dialects share: one connection, its errors, listings, the snapshot guard.

``ServerSource`` is the skeleton of ``PostgresSource`` and ``MySQLSource``; each
dialect supplies only what differs: the driver's calls and errors, its catalog
queries and the streaming read.

Connection. One per source. Outside ``snapshot()`` it runs in autocommit, and a
call finding it lost connects again (a long-lived source, the service's,
survives a server restart); inside, never: a new connection would silently be a
new snapshot. The URL's secrets are blanked out of every message.

Errors. Every driver error leaves as a one-line SourceError: UnknownSchema for a
table that was dropped, ``Lost the connection to <server> at host:port database
'x' while trying to <action>: <reason>`` when the connection went away, else
``<server> could not <action>: <reason>``.

Row counts. ``count()`` is exact, inside the snapshot (it gives
``records_total``). The ``row_count`` of ``schemas()`` and ``describe()`` is
exact for tables with less than 32 MiB of data (as the dialect sizes them: MySQL
takes at least 64 bytes a row) and otherwise the server's estimate, so that
listing a large database stays fast; views have none.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

from executor.credentials import source_secrets
from executor.filters import compile_where
from executor.sources.base import Source, SourceError, SourceUnavailable, UnknownSchema
from executor.sources.rowjson import one_line

# Tables with less data than this get an exact row_count in listings.
EXACT_COUNT_MAX_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class Listed:
    """One schema as the server's catalog lists it."""

    name: str  # the source's name for it
    kind: str  # table | view
    sql: str  # the relation, quoted, for "SELECT … FROM"
    columns: int
    size: int | None  # bytes of data; None: never counted exactly (a view, an unreadable table)
    estimate: int | None  # the server's estimate of its rows; None: none, or no row_count at all
    key: Any  # what the dialect's catalog queries take (PostgreSQL: the oid; MySQL: the name)


class ServerSource(Source):
    """A read-only connection to a database server (see the module docstring for the rules)."""

    #: The driver's error classes: what ``_translate`` turns into SourceErrors.
    _errors: ClassVar[tuple[type[BaseException], ...]]
    #: The catalog query of a schema's column names in column order; its parameter: ``Listed.key``.
    _columns_sql: ClassVar[str]
    _label: str  # the server's name in messages: PostgreSQL, MySQL, MariaDB
    _host: str
    _port: int | str
    _database: str
    _conn: Any

    def __init__(self, location: str) -> None:
        self._secrets = source_secrets(location)  # first: a driver's parse errors may echo parts of the URL
        self._in_snapshot = False
        self._closed = False
        self._configure(location)
        self._conn = self._connect()

    # -- what a dialect supplies

    @abstractmethod
    def _configure(self, location: str) -> None:
        """Read the URL: ``_host``, ``_port``, ``_database`` and the driver's arguments; or SourceError."""

    @abstractmethod
    def _open(self) -> Any:
        """A new configured connection (read-only session); raises the driver's errors."""

    @abstractmethod
    def _disconnect(self) -> None:
        """Close the connection, if it is open."""

    @abstractmethod
    def _gone(self) -> bool:
        """Whether the connection is closed or broken."""

    @staticmethod
    @abstractmethod
    def _quote(identifier: str) -> str:
        """An identifier quoted for a statement sent with parameters (so a '%' is doubled)."""

    @abstractmethod
    def _connect_reason(self, exc: BaseException) -> str:
        """Why connecting failed, one line, for "Cannot connect to … : <reason>"."""

    @abstractmethod
    def _refused(self, exc: BaseException) -> bool:
        """Whether connecting failed because the server denies this user the database (no
        CONNECT or LOGIN privilege, a host not allowed): a permission error, which another
        attempt would meet again (SPEC: Retries), not the server being unreachable."""

    @abstractmethod
    def _missing_table(self, exc: BaseException) -> bool:
        """Whether the driver error says a table does not exist."""

    @abstractmethod
    def _fetch(self, query: str, params: Any = ()) -> list[tuple[Any, ...]]:
        """Every row of one statement (buffered)."""

    @abstractmethod
    def _listing(self) -> list[Listed]:
        """Every schema of the source, sorted by name."""

    @abstractmethod
    def _lookup(self, name: str) -> Listed | None:
        """The schema of that exact name, or None."""

    @abstractmethod
    def _structure(self, listed: Listed) -> dict[str, Any]:
        """Its ``describe.yaml`` entry between ``type`` and ``row_count``: columns, keys, indexes."""

    @abstractmethod
    def _transaction(self) -> AbstractContextManager[None]:
        """The snapshot's read transaction, from start to end."""

    @abstractmethod
    def _rows(self, listed: Listed, clause: str, params: list[Any], batch_size: int) -> Iterator[list[bytes]]:
        """Stream ``SELECT … FROM listed{clause}`` as JSON object bytes, in batches."""

    def _message(self, exc: BaseException) -> BaseException | str:
        """The driver error's message (the exception itself: ``one_line`` reads it)."""
        return exc

    def _lost(self, exc: BaseException) -> bool:
        """Whether the driver error means the connection went away."""
        return self._gone()

    def _column_names(self, listed: Listed) -> list[str]:
        return [row[0] for row in self._fetch(self._columns_sql, (listed.key,))]

    def _exact_count(self, listed: Listed) -> int | None:
        """``count(*)`` of a small table, for a listing; None: use the estimate."""
        return self._fetch(f"SELECT count(*) FROM {listed.sql}")[0][0]

    # -- plumbing

    def _connect(self) -> Any:
        try:
            return self._open()
        except (*self._errors, OSError) as exc:  # OSError: e.g. PyMySQL reading an ssl_ca file
            # 'from None': never chain a driver error, it may carry the connection string.
            raise (SourceError if self._refused(exc) else SourceUnavailable)(
                f"Cannot connect to {self._label} at {self._host}:{self._port} "
                f"database '{self._database}': {self._connect_reason(exc)}"
            ) from None

    def _reconnect_if_lost(self) -> None:
        """A long-lived source (the service's) survives a server restart or a read stopped early.

        Never inside a snapshot: a new connection would silently be a new snapshot.
        """
        if self._gone() and not self._in_snapshot and not self._closed:
            self._conn = self._connect()

    def _reason(self, exc: BaseException) -> str:
        return one_line(self._message(exc), *self._secrets)

    @contextmanager
    def _translate(self, action: str, name: str | None = None) -> Iterator[None]:
        """Driver errors become one-line SourceErrors (UnknownSchema for a dropped table)."""
        try:
            yield
        except self._errors as exc:
            if self._missing_table(exc):
                if name is not None:
                    raise UnknownSchema(name) from None
                raise SourceError(f"{self._label} could not {action}: a table has disappeared") from None
            if self._lost(exc):
                raise SourceUnavailable(
                    f"Lost the connection to {self._label} at {self._host}:{self._port} "
                    f"database '{self._database}' while trying to {action}: {self._reason(exc)}"
                ) from exc
            raise SourceError(f"{self._label} could not {action}: {self._reason(exc)}") from exc

    def _resolve(self, name: str) -> Listed:
        self._reconnect_if_lost()
        with self._translate(f"look up '{name}'"):
            listed = self._lookup(name)
        if listed is None:
            raise UnknownSchema(name)
        return listed

    def _row_count(self, listed: Listed) -> int | None:
        """Exact for small tables, else the server's estimate (module docstring)."""
        if listed.size is not None and listed.size <= EXACT_COUNT_MAX_BYTES:
            exact = self._exact_count(listed)
            if exact is not None:
                return exact
        return listed.estimate

    # -- the Source interface

    def close(self) -> None:
        self._closed = True
        self._disconnect()

    def location(self) -> dict[str, Any]:
        return {
            "dialect": self.dialect,
            "host": self._host,
            "port": self._port,
            "database": self._database,
        }

    def schemas(self) -> list[dict[str, Any]]:
        self._reconnect_if_lost()
        with self._translate("list the schemas"):
            return [
                {
                    "name": listed.name,
                    "type": listed.kind,
                    "columns": listed.columns,
                    "row_count": self._row_count(listed),
                }
                for listed in self._listing()
            ]

    def names(self) -> list[str]:
        self._reconnect_if_lost()
        with self._translate("list the schemas"):
            return [listed.name for listed in self._listing()]

    def tables(self) -> list[str]:
        self._reconnect_if_lost()
        with self._translate("list the schemas"):
            return [listed.name for listed in self._listing() if listed.kind == "table"]

    def columns(self, name: str) -> list[str]:
        listed = self._resolve(name)
        with self._translate(f"read the columns of '{name}'", name):
            return self._column_names(listed)

    def describe(self, names: list[str]) -> dict[str, dict[str, Any]]:
        described = {}
        for name in names:
            listed = self._resolve(name)
            with self._translate(f"describe '{name}'", name):
                described[name] = {
                    "type": listed.kind,
                    **self._structure(listed),
                    "row_count": self._row_count(listed),
                }
        return described

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        if self._in_snapshot:
            raise RuntimeError("snapshot() is already open on this source")
        self._reconnect_if_lost()
        with self._transaction():
            self._in_snapshot = True
            try:
                yield
            finally:
                self._in_snapshot = False

    def count(self, name: str, where: dict[str, Any] | None) -> int:
        listed = self._resolve(name)
        clause, params = compile_where(where, self._quote, "%s")
        with self._translate(f"count the rows of '{name}'", name):
            return self._fetch(f"SELECT count(*) FROM {listed.sql}{clause}", params)[0][0]

    def json_batches(self, name: str, where: dict[str, Any] | None, batch_size: int) -> Iterator[list[bytes]]:
        listed = self._resolve(name)
        clause, params = compile_where(where, self._quote, "%s")
        with self._translate(f"read '{name}'", name):
            yield from self._rows(listed, clause, params, batch_size)
