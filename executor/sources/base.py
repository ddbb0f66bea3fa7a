"""What every source is: the Source interface and the two errors it raises.

A dialect module (``sqlite``, ``postgres``, ``mysql``) implements Source;
``executor.sources.open_source`` picks one by the location's scheme. The errors
carry one line for a human, never a credential.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterable, Iterator
from contextlib import AbstractContextManager
from typing import Any


class SourceError(Exception):
    """The source cannot be opened or read; the message is one line for a human."""


class SourceUnavailable(SourceError):
    """The source cannot be reached, or the connection to it was lost: worth another attempt."""


class UnknownSchema(SourceError):
    """A schema named in a request or configuration does not exist in the source."""

    def __init__(self, name: str) -> None:
        super().__init__(f"Schema '{name}' does not exist in the source")
        self.name = name


class Source(ABC):
    """A read-only connection to the database being exported.

    Not thread-safe and not shared across processes: each worker opens its own.
    """

    dialect: str
    #: True when this source's JSON reads the same as YAML 1.1 (numbers with a dot and
    #: a signed exponent, no escaped UTF-16 surrogates): the yaml writer then skips
    #: checking for what YAML would read otherwise.
    json_is_yaml_safe: bool = False
    #: False when the source's strings cannot hold NUL (PostgreSQL): a filter value with one
    #: cannot be bound, so validation refuses it (``executor.filters``).
    text_holds_nul: bool = True

    @abstractmethod
    def close(self) -> None:
        """Close the connection."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def interrupt(self) -> None:  # noqa: B027 — optional: doing nothing is a valid default
        """Abort the statement running now, if the driver can; called from another thread.

        The worker calls it when a run is cancelled, so that a long statement (a
        count, a sparse filter) does not delay the stop. The default does nothing:
        the worker also checks for cancellation between batches.
        """

    @abstractmethod
    def location(self) -> dict[str, Any]:
        """Where the data comes from, for manifests: ``{"dialect", ...}``, no credentials."""

    @abstractmethod
    def schemas(self) -> list[dict[str, Any]]:
        """User tables and views: ``[{name, type, columns, row_count}]`` sorted by name.

        Internal tables (``sqlite_%``, system catalogs) never appear.
        """

    @abstractmethod
    def names(self) -> list[str]:
        """The names ``schemas()`` lists, without counting any rows: cheap on a big source."""

    @abstractmethod
    def tables(self) -> list[str]:
        """The names ``names()`` lists that are tables, not views: what a null ``schemas`` exports."""

    @abstractmethod
    def columns(self, name: str) -> list[str]:
        """Column names of ``name`` in column order; raises UnknownSchema."""

    @abstractmethod
    def describe(self, names: list[str]) -> dict[str, dict[str, Any]]:
        """The ``describe.yaml`` entry of each schema (SPEC: Artifacts, 1)."""

    @abstractmethod
    def snapshot(self) -> AbstractContextManager[None]:
        """One read transaction: every read inside it sees the same consistent state."""

    @abstractmethod
    def count(self, name: str, where: dict[str, Any] | None) -> int:
        """Rows of ``name`` matching the filter's ``where`` (None: all rows)."""

    @abstractmethod
    def json_batches(self, name: str, where: dict[str, Any] | None, batch_size: int) -> Iterator[list[bytes]]:
        """Stream the rows of ``name`` as JSON objects (UTF-8, no newline), in batches.

        Keys are column names in column order; values follow the SPEC's encoding.
        Streams with a server-side cursor: memory stays flat whatever the table size.
        """

    def json_lines(
        self, name: str, where: dict[str, Any] | None, batch_size: int
    ) -> Iterator[tuple[bytes, int]]:
        """The same rows as chunks of JSON lines: ``(b'{...}\\n{...}', rows)``, no final newline.

        What the writers consume. The default joins ``json_batches()``; a source
        that builds whole chunks itself (SQLite) overrides it and saves one
        Python object per row. A JSON object never holds a raw newline, so
        ``\\n`` separates the rows exactly.
        """
        for batch in self.json_batches(name, where, batch_size):
            if batch:
                yield b"\n".join(batch), len(batch)


def foreign_keys(
    rows: Iterable[tuple[Hashable, str, str, str | None, str, str]],
) -> dict[Hashable, dict[str, Any]]:
    """``describe.yaml``'s foreign keys, from one row per column of each key.

    A row: (the key's id, the referenced table, the column, the referenced column,
    on_update, on_delete), each key's rows in column order. Keys keep the order in
    which they first appear.
    """
    keys: dict[Hashable, dict[str, Any]] = {}
    for key_id, table, column, target, on_update, on_delete in rows:
        key = keys.setdefault(
            key_id,
            {
                "columns": [],
                "references": {"table": table, "columns": []},
                "on_update": on_update,
                "on_delete": on_delete,
            },
        )
        key["columns"].append(column)
        key["references"]["columns"].append(target)
    return keys
