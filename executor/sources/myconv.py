"""PyMySQL converters: each column's text (or bytes) as the JSON-ready value of the MySQL source.

The row-by-row path of ``executor.sources.mysql``: PyMySQL hands each converter
the value's text (str), or bytes for binary columns; each returns the value of
the type-fidelity table there.
"""

from __future__ import annotations

import binascii
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pymysql.converters
from pymysql.constants import FIELD_TYPE

from executor.sources.float32 import shortest_float32
from executor.sources.rowjson import RowEncoder, lenient_json


def _is_calendar_date(text: str) -> bool:
    return text[5:7] != "00" and text[8:10] != "00"


def _datetime(text: str) -> str:
    return text.replace(" ", "T", 1) if _is_calendar_date(text) else text


def _timestamp(text: str) -> str:
    return text.replace(" ", "T", 1) + "Z" if _is_calendar_date(text) else text


def _bit(raw: bytes) -> int:
    return int.from_bytes(raw, "big")


def _binary_or_text(value: str | bytes) -> str:
    # Text columns arrive decoded; binary ones (charset 'binary') as bytes.
    if value.__class__ is str:
        return value  # type: ignore[return-value]
    return binascii.b2a_base64(value, newline=False).decode("ascii")  # type: ignore[arg-type]


_BINARY_OR_TEXT = (
    FIELD_TYPE.STRING,
    FIELD_TYPE.VAR_STRING,
    FIELD_TYPE.VARCHAR,
    FIELD_TYPE.TINY_BLOB,
    FIELD_TYPE.MEDIUM_BLOB,
    FIELD_TYPE.LONG_BLOB,
    FIELD_TYPE.BLOB,
    FIELD_TYPE.GEOMETRY,
)
CONVERSIONS: dict[Any, Any] = dict(pymysql.converters.conversions)
CONVERSIONS.update(
    {
        FIELD_TYPE.DECIMAL: None,  # the exact digits, as text
        FIELD_TYPE.NEWDECIMAL: None,
        FIELD_TYPE.DATE: None,  # already ISO 8601 (or a zero date, kept as printed)
        FIELD_TYPE.TIME: None,
        FIELD_TYPE.DATETIME: _datetime,
        FIELD_TYPE.TIMESTAMP: _timestamp,
        FIELD_TYPE.BIT: _bit,
        FIELD_TYPE.JSON: None,  # JSON text, copied by RowEncoder (lenient_json)
        **dict.fromkeys(_BINARY_OR_TEXT, _binary_or_text),
    }
)


def with_float32(row: Sequence[Any], positions: Sequence[int]) -> list[Any]:
    # FLOAT columns arrive as exact doubles (MySQLSource._select_list casts them: the text
    # protocol prints 6 significant digits, 16777216 → 16777200); each value then becomes the
    # shortest decimal that reads back as the same float32.
    values = list(row)
    for position in positions:
        if values[position] is not None:
            values[position] = shortest_float32(values[position])
    return values


# Chunks of JSON built by the server (executor.sources.myread) come as bytes, unconverted.
RAW_CONVERSIONS: dict[Any, Any] = {
    field_type: None if field_type in _BINARY_OR_TEXT else converter
    for field_type, converter in CONVERSIONS.items()
    if isinstance(field_type, int)
}


class RowLines:
    """Rows of the row-by-row path as JSON lines: one encoder per description (a stream's first)."""

    def __init__(self, json_columns: set[str], float32_columns: set[str]) -> None:
        self._json_columns, self._float32_columns = json_columns, float32_columns
        self._encoder: RowEncoder | None = None
        self._float32_positions: list[int] = []

    def __call__(self, rows: Any, description: Any) -> list[bytes]:
        if self._encoder is None:
            names = [column[0] for column in description]
            json_positions = [i for i, name in enumerate(names) if name in self._json_columns]
            self._encoder = RowEncoder(names, json_positions, lenient_json)
            self._float32_positions = [i for i, name in enumerate(names) if name in self._float32_columns]
        if self._float32_positions:  # the only per-value work in Python: FLOAT columns
            rows = [with_float32(row, self._float32_positions) for row in rows]
        return self._encoder.encode(rows)


@contextmanager
def raw_results(conn: pymysql.Connection) -> Iterator[None]:
    """Binary results as bytes, as the server sent them (a chunk is never base64'd)."""
    conn.decoders = RAW_CONVERSIONS
    try:
        yield
    finally:
        conn.decoders = CONVERSIONS
