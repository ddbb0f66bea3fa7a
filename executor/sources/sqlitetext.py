"""SQLite's text is unchecked, names included: how the source reads, names and shows it.

SQLite stores TEXT as it is given, bytes that are not UTF-8 too, and so it keeps
table, column and index names. Python's sqlite3 sends SQL and parameters as UTF-8,
so a name holding other bytes cannot be named at all (``spellable``); what is only
shown (a declared type, a default, an index name) shows such bytes as U+FFFD.
"""

from __future__ import annotations

from typing import Any


def read_text(value: bytes) -> str:
    """A TEXT value, its bytes that are not UTF-8 kept as surrogates (``spellable``, ``shown``).

    SQLite does not check TEXT: a table, column or index name may hold any bytes, and
    the sqlite3 module's own decoding would fail the whole listing over one such name.
    """
    return value.decode("utf-8", "surrogateescape")


def spellable(name: str) -> bool:
    """Whether SQL from this process can name ``name``: the sqlite3 module sends SQL and
    parameters as UTF-8, which a name holding bytes that are not UTF-8 has no form in."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown_all(value: Any) -> Any:
    """``value`` (describe's mapping) with each string ``shown``."""
    if isinstance(value, str):
        return shown(value)
    if isinstance(value, dict):
        return {shown_all(key): shown_all(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shown_all(item) for item in value]
    return value


def shown(text: str | None) -> str | None:
    """Catalog text as it is shown (describe): bytes that are not UTF-8 as U+FFFD."""
    return None if text is None else text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def utf8_bytes(text: bytes | str) -> bytes:
    """A chunk's bytes: as they are (a UTF-8 database's blob cast), or a UTF-16 database's text."""
    return text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")
