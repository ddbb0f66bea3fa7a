"""The source abstraction: one class per database dialect, one interface.

The service (parent process) uses a Source to list and describe schemas and to
validate extract configurations; the worker processes use it to read every
selected schema inside one read transaction and stream rows as JSON.

Modules: ``base`` (the Source interface, SourceError, UnknownSchema),
``sqlite`` (``SQLiteSource``, the default), ``server`` (``ServerSource``, what
the two server dialects share: connecting, errors, listings, the snapshot
guard), ``postgres`` (``PostgresSource``), ``mysql`` (``MySQLSource``),
``rowjson`` (row tuples to JSON, for the server dialects) and ``float32`` (the
digits of a MySQL FLOAT). Every implementation opens its source read-only,
quotes every identifier and binds every value as a parameter.
"""

from __future__ import annotations

from executor.sources.base import Source, SourceError, SourceUnavailable, UnknownSchema

__all__ = ["Source", "SourceError", "SourceUnavailable", "UnknownSchema", "open_source"]


def open_source(location: str) -> Source:
    """Open the source named by a path or URL; raises SourceError with a one-line reason."""
    scheme = location.split("://", 1)[0].lower() if "://" in location else ""
    # Each dialect is imported when first used: a SQLite-only service never loads a server driver.
    if scheme in ("postgresql", "postgres"):
        from executor.sources.postgres import PostgresSource

        return PostgresSource(location)
    if scheme in ("mysql", "mariadb"):
        from executor.sources.mysql import MySQLSource

        return MySQLSource(location)
    from executor.sources.sqlite import SQLiteSource

    return SQLiteSource(location)
