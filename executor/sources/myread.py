"""Reading a MySQL / MariaDB table fast: each row's JSON built by the server, a chunk a query.

PyMySQL is pure Python: reading a row costs it 2–3 µs, whatever the row
holds, and the row-by-row path adds orjson on top. Here the server builds each
row's JSON with one ``CONCAT`` (``row_json_sql``) and joins the rows of a
primary-key range with ``GROUP_CONCAT``, so Python reads one value per chunk
of about 1 MiB:

    SELECT COUNT(*), CAST(GROUP_CONCAT(<row JSON> SEPARATOR '\\n') AS BINARY)
      FROM t FORCE INDEX (PRIMARY) WHERE pk BETWEEN a AND b [AND filter]

The ranges follow the primary key (InnoDB's clustered order: a full scan's
order), each about 1 MiB of JSON: the next range's width is adjusted from
what the last one gave. ``GROUP_CONCAT`` cuts its result at
``max_allowed_packet`` with only a warning, and leaves out rows whose JSON
is NULL: a chunk whose length reaches that limit, or whose line count is
not its row count, is read again in halves, down to a single row, which the
row-by-row path reads. Tables without a single integer primary key (views
included) stream one JSON text per row through the unbuffered cursor.

Values are written byte for byte as the row-by-row path writes them (the
type-fidelity table of ``executor.sources.mysql``); the few the server
cannot write that way are finished in Python (``finish``):

* strings: ``JSON_QUOTE``, whose escapes are orjson's except for the upper
  case hex of ``\\u001F``-style escapes, put in lower case here (before the
  JSON values are put in: theirs are copied as they are);
* ``DOUBLE``: the server's shortest text in the common range, ``.0`` on whole
  numbers; elsewhere the formats differ, and the text goes to Python;
* ``FLOAT``: its exact double goes to Python (``shortest_float32``);
* JSON columns: their text, in hex, goes to Python (``lenient_json``);
* binary strings: ``TO_BASE64`` without its line breaks; ``BIT``: a number;
  dates and times: their text (``T`` and ``Z`` on calendar dates).

Geometry and other types keep the row-by-row path.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from executor.sources.float32 import shortest_float32
from executor.sources.rowjson import lenient_json

CHUNK_BYTES = 1 << 20
UNIT_BYTES = 1 << 20  # of the table on disk (about two chunks of JSON): a unit of a parallel read
INTEGER_TYPES = {"tinyint", "smallint", "mediumint", "int", "integer", "bigint"}
TEXT_TYPES = {"char", "varchar", "tinytext", "text", "mediumtext", "longtext", "enum", "set"}
BINARY_TYPES = {"binary", "varbinary", "tinyblob", "blob", "mediumblob", "longblob"}
# Types whose JSON text is short, whatever the value: numbers, dates and times.
_SHORT_NUMBERS = {"decimal", "numeric", "float", "double", "real", "bit", "year"}
_SHORT_TYPES = INTEGER_TYPES | _SHORT_NUMBERS | {"date", "time", "datetime", "timestamp"}

# A value finished in Python: CHAR(1), a tag, the server's text (hex for JSON), CHAR(1).
_MARKED = re.compile(rb"\x01([fgh])([^\x01]*)\x01")
# An escaped backslash, or a \u00XX escape with upper-case hex (JSON_QUOTE's): left to right,
# so that the backslash of "\\u001F" (a backslash, then text) is never taken for an escape.
_UPPER_ESCAPE = re.compile(rb"\\(\\|u00[01][A-F])")


@dataclass(frozen=True)
class Column:
    """One column as ``information_schema.COLUMNS`` describes it."""

    name: str
    data_type: str
    column_type: str
    scale: int | None
    nullable: bool
    charset: str | None
    is_json: bool
    octets: int | None = None  # CHARACTER_OCTET_LENGTH: a string's most bytes


def _most_json_bytes(column: Column) -> float:
    """The most bytes of the column's key and value as JSON built here (``inf``: no bound kept)."""
    key = 6 * len(column.name) + 4
    if column.data_type in _SHORT_TYPES and not column.is_json:
        return key + 128  # numbers, dates and times: their text is short
    if column.octets is None or not (
        column.data_type in TEXT_TYPES or column.data_type in BINARY_TYPES or column.is_json
    ):
        return float("inf")
    # JSON_QUOTE writes a control character as \u00XX (six bytes), HEX two a byte, base64 4 of 3.
    return key + column.octets * 6 + 2


def _marked(tag: str, text: str) -> str:
    return f"CHAR(1), '{tag}', {text}, CHAR(1)"


def _double(x: str) -> str:
    return (
        f"IF({x} >= 1e-4 AND {x} < 1e15 OR {x} <= -1e-4 AND {x} > -1e15,"
        f" IF({x} = FLOOR({x}), CONCAT({x}, '.0'), CONCAT({x})),"
        f" IF({x} = 0, IF(CONCAT({x}) LIKE '-%', '-0.0', '0.0'), CONCAT({_marked('f', x)})))"
    )


def _value(column: Column, c: str) -> tuple[str, bool] | None:
    """(SQL of the value's JSON, whether it goes between quotes); None: row by row."""
    kind = column.data_type
    binary = column.charset in (None, "binary")
    if column.is_json:
        return f"CONCAT({_marked('h', f'HEX(CONVERT({c} USING utf8mb4))')})", False
    # ZEROFILL pads a number's text with zeros (00042): only + 0 or a CAST gives the bare number.
    zerofill = column.column_type.lower().endswith("zerofill")
    if kind in INTEGER_TYPES:
        return (f"CONCAT({c} + 0)" if zerofill else f"CONCAT({c})"), False
    if kind in ("decimal", "numeric"):
        return (f"CONCAT({c} + 0)" if zerofill else f"CONCAT({c})"), True
    if kind in ("date", "time"):
        return f"CONCAT({c})", True
    if kind == "float":
        return f"CONCAT({_marked('g', f'CAST({c} AS DOUBLE)')})", False
    if kind in ("double", "real"):
        return _double(f"CAST({c} AS DOUBLE)" if column.scale is not None or zerofill else c), False
    if kind == "bit":
        return f"CONCAT({c} + 0)", False
    if kind == "year":
        return (
            f"CONCAT(YEAR({c}))" if column.column_type.lower() == "year(2)" else f"CONCAT({c} + 0)"
        ), False
    if kind in TEXT_TYPES and not binary:
        return f"JSON_QUOTE(CONVERT({c} USING utf8mb4))", False
    if kind in BINARY_TYPES or (kind in TEXT_TYPES and binary):
        return f"REPLACE(TO_BASE64({c}), '\\n', '')", True
    if kind in ("datetime", "timestamp"):
        calendar = f"MONTH({c}) <> 0 AND DAYOFMONTH({c}) <> 0"
        zone = ", 'Z'" if kind == "timestamp" else ""
        return f"IF({calendar}, CONCAT(REPLACE({c}, ' ', 'T'){zone}), CONCAT({c}))", True
    return None


def row_json_sql(
    columns: list[Column], quote: Callable[[str], str], literal: Callable[[str], str]
) -> str | None:
    """One row as a JSON object (keys in column order); None when a column cannot be built here.

    ``quote`` makes an identifier, ``literal`` a string literal, both for a statement sent
    without parameters (double its ``%`` to send it with some).
    """
    parts: list[tuple[bool, str]] = []
    for position, column in enumerate(columns):
        value = _value(column, quote(column.name))
        if value is None:
            return None
        sql, quoted = value
        key = ("{" if position == 0 else ",") + orjson.dumps(column.name).decode() + ":"
        if not column.nullable:
            parts += [(True, key + ('"' if quoted else "")), (False, sql)] + ([(True, '"')] if quoted else [])
            continue
        if quoted:
            sql = f"""CONCAT('"', {sql}, '"')"""
        # The column's NULL, not the expression's: TO_BASE64, JSON_QUOTE… give NULL for a result over
        # max_allowed_packet, which then makes the row NULL (read again row by row), not a null.
        parts += [(True, key), (False, f"IF({quote(column.name)} IS NULL, 'null', {sql})")]
    parts.append((True, "}" if columns else "{}"))
    merged, text = [], ""
    for is_literal, piece in parts:
        if is_literal:
            text += piece
            continue
        if text:
            merged.append(literal(text))
            text = ""
        merged.append(piece)
    if text:
        merged.append(literal(text))
    return f"CONCAT({', '.join(merged)})"


def server_row(
    fetch: Callable[..., list[tuple[Any, ...]]],
    name: str,
    json_columns: set[str],
    ident: Callable[[str], str],
    literal: Callable[[str], str],
) -> tuple[str | None, str | None]:
    """The SQL of a table's row JSON (its ``%`` doubled), and its integer primary key (quoted, or
    None); ``(None, None)``: the row-by-row path (a type not built here, a view that cannot be opened,
    rows that could pass max_allowed_packet without a key to read one again)."""
    columns = [
        Column(
            column, data_type, column_type, scale, nullable == "YES", charset, column in json_columns, octets
        )
        for column, data_type, column_type, scale, nullable, charset, table, octets in fetch(
            "SELECT COLUMN_NAME, DATA_TYPE, COLUMN_TYPE, NUMERIC_SCALE, IS_NULLABLE, CHARACTER_SET_NAME,"
            " TABLE_NAME, CHARACTER_OCTET_LENGTH FROM information_schema.COLUMNS"
            " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %s ORDER BY ORDINAL_POSITION",
            (name,),
        )
        if table == name  # not another letter case's table
    ]
    row_sql = row_json_sql(columns, ident, literal) if columns else None
    if row_sql is None:
        return None, None
    keys = fetch(
        "SELECT s.COLUMN_NAME, c.DATA_TYPE FROM information_schema.STATISTICS s"
        " JOIN information_schema.COLUMNS c ON c.TABLE_SCHEMA = s.TABLE_SCHEMA"
        " AND c.TABLE_NAME = s.TABLE_NAME AND c.COLUMN_NAME = s.COLUMN_NAME"
        " WHERE s.TABLE_SCHEMA = DATABASE() AND s.TABLE_NAME = %s AND s.INDEX_NAME = 'PRIMARY'",
        (name,),
    )
    key = ident(keys[0][0]).replace("%", "%%") if len(keys) == 1 and keys[0][1] in INTEGER_TYPES else None
    if key is None and sum(map(_most_json_bytes, columns)) >= fetch("SELECT @@max_allowed_packet")[0][0]:
        # A row's JSON over max_allowed_packet is NULL (with a warning): a range of keys is read
        # again row by row, but a row of a stream cannot be; such a table is read row by row.
        return None, None
    return row_sql.replace("%", "%%"), key


def _finish_one(match: re.Match[bytes]) -> bytes:
    tag, text = match.group(1), match.group(2)
    if tag == b"h":
        return lenient_json(binascii.a2b_hex(text))
    number = float(text)
    return orjson.dumps(shortest_float32(number) if tag == b"g" else number)


def _lower_escape(match: re.Match[bytes]) -> bytes:
    return match.group().lower()


def finish(chunk: bytes) -> bytes:
    """The chunk with JSON_QUOTE's escapes as orjson's and every marked value in its final form.

    Escapes first: a JSON column's text is still hex then, and keeps its own escapes, as the
    row-by-row path keeps them (``"\\u001F"``).
    """
    if b"\\u00" in chunk:
        chunk = _UPPER_ESCAPE.sub(_lower_escape, chunk)
    if b"\x01" in chunk:
        chunk = _MARKED.sub(_finish_one, chunk)
    return chunk


@dataclass
class Ranges:
    """A table's primary key, read in ranges of about ``CHUNK_BYTES`` of JSON."""

    key: str  # the key's column, quoted
    low: int
    high: int
    width: int  # key values in the next range

    def next_width(self, width: int, size: int) -> int:
        """The next range's width, from what the last one (``width`` wide) gave."""
        if size <= 0:
            return min(width * 4, max(1, self.high - self.low + 1))
        wanted = width * CHUNK_BYTES // size
        return max(1, min(width * 4, max(width // 4, wanted)))


def chunks(
    fetch: Callable[[int, int], tuple[int, bytes | None]],
    single: Callable[[int], Iterator[tuple[bytes, int]]],
    ranges: Ranges,
    limit: int,
) -> Iterator[tuple[bytes, int]]:
    """The table's chunks in key order: ``fetch(a, b)`` gives ``(rows, text)`` of one range.

    A range whose text may be cut (``limit`` reached, rows missing) is read again in
    halves; a single key that still fails goes to ``single`` (the row-by-row path).
    """

    def one(a: int, b: int) -> Iterator[tuple[bytes, int]]:
        count, text = fetch(a, b)
        if count == 0:
            return
        if text is not None and len(text) < limit and text.count(b"\n") + 1 == count:
            yield finish(text), count
        elif a == b:
            yield from single(a)
        else:
            middle = a + (b - a) // 2
            yield from one(a, middle)
            yield from one(middle + 1, b)

    start = ranges.low
    while start <= ranges.high:
        end = min(ranges.high, start + ranges.width - 1)
        size = 0
        for text, count in one(start, end):
            size += len(text)
            yield text, count
        ranges.width = ranges.next_width(end - start + 1, size)
        start = end + 1


def unit_width(low: int, high: int, size: int, readers: int) -> int:
    """The key width of one unit of a parallel read: about ``UNIT_BYTES`` of the table each.

    One reader reads the whole key range as one unit (the single stream). Several
    read units ``i, i + n, …`` (``executor.sources.parallel``): fixed key ranges,
    so that every reader knows its own without asking the others.
    """
    span = high - low + 1
    if readers <= 1:
        return span
    return max(1, span * UNIT_BYTES // max(size, 1))


def reader(
    fetch: Callable[[int, int], tuple[int, bytes | None]],
    single: Callable[[int], Iterator[tuple[bytes, int]]],
    ranges: Ranges,
    unit: int,
    limit: int,
    index: int,
    readers: int,
) -> Callable[[Any], None]:
    """Reader ``index`` of ``readers`` for ``in_order``: its units' chunks, each unit in key order."""

    def read(feed: Any) -> None:
        width = ranges.width
        for first in range(ranges.low + index * unit, ranges.high + 1, readers * unit):
            part = Ranges(ranges.key, first, min(ranges.high, first + unit - 1), width)
            for chunk in chunks(fetch, single, part, limit):
                feed.put(chunk)
            width = part.width
            feed.end_unit()

    return read
