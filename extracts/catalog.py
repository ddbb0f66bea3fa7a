"""Every read of the source the service makes itself (the workers read it for runs).

The describe API, validation of an extract's ``schemas`` and ``filter``, and the
OpenAPI document's list of schemas and columns, kept with the documents built
from it (``DocumentCache``). Each read opens the source in a worker thread,
never on the event loop; a source that cannot be read raises ``SourceError``
(a 503 for the request).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import orjson

from executor.filters import check_where
from executor.sources import SourceError, open_source
from extracts.openapi import openapi_document

# What a check read of the catalog: every schema name, and the columns of the filtered schemas.
Seen = tuple[set[str], dict[str, list[str]]]


class Catalog:
    """The source's schemas and columns, read on demand."""

    def __init__(self, location: str) -> None:
        self.location = location
        self._watchers: list[Callable[[set[str], dict[str, list[str]]], None]] = []

    def watch(self, notice: Callable[[set[str], dict[str, list[str]]], None]) -> None:
        """Call ``notice(names, columns)`` with what each check read (a cache can tell it is stale)."""
        self._watchers.append(notice)

    async def schemas(self) -> list[dict[str, Any]]:
        """``GET /api/describe``: every table and view with its column and row counts."""
        return await anyio.to_thread.run_sync(self._schemas)

    async def describe(self, name: str) -> dict[str, Any] | None:
        """One schema's ``describe.yaml`` entry; None when the source has no such schema."""
        return await anyio.to_thread.run_sync(self._describe, name)

    async def check(self, schemas: list[str] | None, filters: dict[str, Any] | None) -> list[dict[str, str]]:
        """What the source refuses of an extract's ``schemas`` and ``filter``, as 400 details."""
        details, (names, columns) = await anyio.to_thread.run_sync(self._check, schemas, filters)
        for notice in self._watchers:
            notice(names, columns)
        return details

    def columns(self) -> dict[str, list[str]] | None:
        """Every schema with its columns (blocking: for a worker thread); None when unreadable."""
        try:
            with open_source(self.location) as source:
                return {name: source.columns(name) for name in source.names()}
        except SourceError:
            return None

    def _schemas(self) -> list[dict[str, Any]]:
        # In one snapshot, as a run reads: counted one by one, tables written together (an
        # order and its lines) could show counts of different moments, which the source never held.
        with open_source(self.location) as source, source.snapshot():
            return source.schemas()

    def _describe(self, name: str) -> dict[str, Any] | None:
        with open_source(self.location) as source:
            if name not in source.names():
                return None
            return source.describe([name])[name]

    def _check(
        self, schemas: list[str] | None, filters: dict[str, Any] | None
    ) -> tuple[list[dict[str, str]], Seen]:
        details = []
        columns: dict[str, list[str]] = {}
        with open_source(self.location) as source:
            known = set(source.names())
            # SPEC: schemas null is every user table, views only when named.
            tables = set(source.tables()) if schemas is None and filters else known
            if schemas is not None:
                unknown = [name for name in schemas if name not in known]
                if unknown:
                    message = "schemas not found in the source: " + ", ".join(unknown)
                    details.append({"field": "schemas", "message": message})
            for schema, spec in (filters or {}).items():
                field = f"filter.{schema}"
                if schema not in known:
                    message = f"schema '{schema}' does not exist in the source"
                    details.append({"field": field, "message": message})
                elif schemas is not None and schema not in schemas:
                    details.append(
                        {"field": field, "message": f"schema '{schema}' is not among the extract's schemas"}
                    )
                elif schema not in tables:
                    message = (
                        f"schema '{schema}' is a view, and with schemas null only tables are exported: "
                        "name it in schemas to export and filter it"
                    )
                    details.append({"field": field, "message": message})
                else:
                    columns[schema] = source.columns(schema)
                    problems = check_where(
                        spec["where"],
                        columns[schema],
                        field=f"{field}.where",
                        text_holds_nul=source.text_holds_nul,
                    )
                    details += [{"field": path, "message": message} for path, message in problems]
        return details, (known, columns)


CATALOG_TTL_S = 60.0
CATALOG_RETRY_S = 5.0  # after the source could not be read


@dataclass(frozen=True)
class KeptDocument:
    expires: float
    catalog: dict[str, list[str]] | None
    document: bytes


class DocumentCache:
    """The two documents, serialized: neither is built per request.

    The anonymous one is built once. The authenticated one lists the source's catalog:
    read and built in a worker thread (one read for a burst of requests), kept for
    CATALOG_TTL_S, and dropped sooner when validation reads a catalog that differs.
    """

    def __init__(
        self,
        build: Callable[[dict[str, list[str]] | None], bytes],
        read_catalog: Callable[[], dict[str, list[str]] | None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._build = build
        self._read_catalog = read_catalog
        self.clock = clock
        self._anonymous: bytes | None = None
        self._kept: KeptDocument | None = None
        self._lock = anyio.Lock()

    @classmethod
    def of(cls, routes: Sequence[tuple[str, str, str]], catalog: Catalog) -> DocumentCache:
        """The documents of the app's routes over the source's catalog, refreshed when it changes."""
        cache = cls(lambda columns: orjson.dumps(openapi_document(routes, columns)), catalog.columns)
        catalog.watch(cache.notice)
        return cache

    def anonymous(self) -> bytes:
        if self._anonymous is None:
            self._anonymous = self._build(None)
        return self._anonymous

    async def authenticated(self) -> bytes:
        async with self._lock:
            kept = self._kept
            if kept is None or self.clock() >= kept.expires:

                def load() -> tuple[dict[str, list[str]] | None, bytes]:
                    catalog = self._read_catalog()
                    return catalog, self._build(catalog)

                catalog, document = await anyio.to_thread.run_sync(load)
                ttl = CATALOG_TTL_S if catalog is not None else CATALOG_RETRY_S
                self._kept = kept = KeptDocument(self.clock() + ttl, catalog, document)
            return kept.document

    def notice(self, names: set[str], columns: dict[str, list[str]]) -> None:
        """What validation read of the source: every schema name, some schemas' columns."""
        kept = self._kept
        if kept is None or kept.catalog is None:
            return
        if set(kept.catalog) != names or any(kept.catalog.get(s) != c for s, c in columns.items()):
            self._kept = None
