"""Each row's JSON built inside PostgreSQL, byte for byte what the row-by-row path writes.

``row_json_sql`` gives one SQL expression per table: the row as one JSON
object, the text the psycopg loaders and ``RowEncoder`` would have produced
(the type-fidelity table of ``executor.sources.postgres``), so that the server
does the formatting and Python only moves bytes. It is built from concatenated
pieces (the cheapest way PostgreSQL 15 has: ``row_to_json``, ``format`` and
``concat`` all cost more), each value in its cheapest exact form:

* integers, ``oid``: their text; ``boolean``: ``true`` / ``false``;
* ``real`` / ``double precision``: orjson's form of the shortest exact
  digits — PostgreSQL's own text (``extra_float_digits = 1``) in the common
  range (1e-4 to 1e15), with ``.0`` on whole numbers; every other value is
  finished in Python as the row-by-row path does (``finish``): there the two
  formats differ, and PostgreSQL's digits are not always the shortest;
* text types: ``to_json``, whose escaping is orjson's (the same short
  escapes, ``\\u00XX`` in lower case, nothing else escaped);
* dates and times: their ISO text with a ``T``; BC years made astronomical;
  ``timestamptz`` through ``AT TIME ZONE 'UTC'`` and a ``Z``;
* ``bytea``: base64 without line breaks; ``numeric``, ``uuid``, ``time``,
  ``interval``: their text as a string;
* ``json`` / ``jsonb``: their text, compacted in Python (``rowjson.compact_json``);
* any other scalar type (enums, ranges, ``inet``, ``money``, composites…): its
  output function's text as a string.

Arrays (and the ``int2vector`` kind) are left to the row-by-row path: ``None``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import orjson

from executor.sources.rowjson import compact_json

# Built-in type oids (pg_type.dat).
BOOL, BYTEA, CHAR, NAME, INT8, INT2, INT4, TEXT, OID = 16, 17, 18, 19, 20, 21, 23, 25, 26
JSON, FLOAT4, FLOAT8, BPCHAR, VARCHAR, DATE, TIME = 114, 700, 701, 1042, 1043, 1082, 1083
TIMESTAMP, TIMESTAMPTZ, INTERVAL, TIMETZ, NUMERIC, UUID, JSONB = 1114, 1184, 1186, 1266, 1700, 2950, 3802

_TEXT_TYPES = {TEXT, VARCHAR, BPCHAR, NAME, CHAR}
_QUOTED_TEXT = {NUMERIC, UUID, TIME, INTERVAL}  # their text never needs a JSON escape

# A value finished in Python: \x01, a tag, PostgreSQL's text (never holding \x01), \x01.
_MARKED = re.compile(rb"\x01([fj])([^\x01]*)\x01")


@dataclass(frozen=True)
class Column:
    """One column as the row-by-row path sees it."""

    name: str
    type_oid: int  # the type psycopg is told (a domain's base type)
    cast: str | None  # ``::<base type>`` when the column is a domain, else None
    nullable: bool
    kind: str  # pg_type.typtype of the base type: b (base), c (composite), e, r, m, p…
    is_array: bool  # an array (or int2vector / oidvector): not built in SQL


def _literal(text: str) -> str:
    """A SQL string literal (standard_conforming_strings is on in the session)."""
    return "'" + text.replace("'", "''") + "'"


def _bc(text: str) -> str:
    """'0044-03-15 …  BC' → '-0043-03-15 …' (1 BC is year 0000), as ``postgres._astronomical``."""
    year = f"split_part({text}, '-', 1)"
    return (
        f"(CASE WHEN {year} = '0001' THEN '0000' ELSE '-' || lpad(({year}::int - 1)::text, 4, '0') END"
        f" || substr(left({text}, -3), strpos({text}, '-')))"
    )


def _marked(tag: str, text: str) -> str:
    """A value Python finishes (``finish``): its PostgreSQL text between two \\x01, after a tag."""
    return f"E'\\x01{tag}' || {text} || E'\\x01'"


def _float(c: str, fixed_below: str) -> str:
    """A float's JSON number (module docstring); ``fixed_below``: where PostgreSQL's text turns to
    exponents (1e15 for double precision, 1e6 for real; 1e-4 below, for both).

    Outside that range the two formats differ, and PostgreSQL's digits are not always the
    shortest (past 2**53 it skips a decimal lying exactly halfway between two doubles, which
    round-half-even would accept): those values, rare in data, are finished in Python
    exactly as the row-by-row path does (``float(text)``, then orjson).
    """
    return (
        f"CASE WHEN {c} >= 1e-4::float8 AND {c} < {fixed_below}::float8"
        f" OR {c} <= -1e-4::float8 AND {c} > -{fixed_below}::float8"
        f" THEN CASE WHEN {c} = trunc({c}) THEN {c}::text || '.0' ELSE {c}::text END"
        f" WHEN {c} = 0 THEN CASE WHEN {c}::text = '-0' THEN '-0.0' ELSE '0.0' END"
        f" ELSE {_marked('f', f'{c}::text')} END"
    )


def _value(column: Column, c: str) -> tuple[str, bool] | None:
    """(SQL of the value's JSON text, whether it goes between quotes); None: not built in SQL.

    A quoted value's SQL gives the string's content only (no character of it needs an
    escape), so that the quotes can join the key's literal.
    """
    oid = column.type_oid
    if column.is_array:
        return None
    if oid in (INT2, INT4, INT8, OID):
        return f"{c}::text", False
    if oid == BOOL:
        return f"CASE WHEN {c} THEN 'true' ELSE 'false' END", False
    if oid == FLOAT8:
        return _float(c, "1e15"), False
    if oid == FLOAT4:
        return _float(c, "1e6"), False
    if oid in _TEXT_TYPES:
        return f"to_json({c})::text", False
    if oid in _QUOTED_TEXT:
        return f"{c}::text", True
    if oid == BYTEA:
        return f"replace(encode({c}, 'base64'), E'\\n', '')", True
    if oid in (JSON, JSONB):
        return _marked("j", f"{c}::text"), False
    if oid == DATE:
        bc = _bc(f"{c}::text")
        return f"CASE WHEN {c} >= '0001-01-01' OR {c} = '-infinity' THEN {c}::text ELSE {bc} END", True
    if oid == TIMESTAMP:
        return (
            f"replace(CASE WHEN {c} >= '0001-01-01' OR {c} = '-infinity' THEN {c}::text"
            f" ELSE {_bc(f'{c}::text')} END, ' ', 'T')",
            True,
        )
    if oid == TIMESTAMPTZ:
        return (
            f"CASE WHEN {c} >= '0001-01-01 00:00:00+00' AND {c} < 'infinity'"
            f" THEN replace(({c} AT TIME ZONE 'UTC')::text, ' ', 'T') || 'Z'"
            f" WHEN {c} = 'infinity' OR {c} = '-infinity' THEN {c}::text"
            f" ELSE replace(replace({_bc(f'{c}::text')}, ' ', 'T'), '+00', 'Z') END",
            True,
        )
    if oid == TIMETZ:
        return f"regexp_replace({c}::text, '([+-][0-9][0-9])$', '\\1:00')", True
    if column.kind == "p":
        return None  # a pseudo-type (a view's "unknown" literal…): let psycopg say what it is
    return f"to_json(format('%s', {c}))::text", False  # the output function's text, even where a cast differs


def row_json_sql(columns: list[Column], alias: str) -> str | None:
    """SQL of one row of ``alias`` as a JSON object (module docstring); None: some column cannot be.

    The text has no ``%`` of its own doubled: pass it as a statement without parameters,
    or double them.
    """
    pieces: list[tuple[bool, str]] = []  # (is a literal, text)
    for position, column in enumerate(columns):
        c = f'{alias}."{column.name.replace(chr(34), chr(34) * 2)}"'
        if column.cast:
            c = f"({c}{column.cast})"
        value = _value(column, c)
        if value is None:
            return None
        sql, quoted = value
        key = ("{" if position == 0 else ",") + orjson.dumps(column.name).decode() + ":"
        if not column.nullable:
            pieces += [(True, key + ('"' if quoted else "")), (False, sql)]
            if quoted:
                pieces.append((True, '"'))
            continue
        if quoted:
            sql = f"'\"' || {sql} || '\"'"
        # A composite's value, not its fields: (NULL, NULL) is a row (the parser makes this IS
        # NOT DISTINCT FROM NULL a scalar test).
        test = f"{c} IS NOT DISTINCT FROM NULL" if column.kind == "c" else f"{c} IS NULL"
        pieces += [(True, key), (False, f"CASE WHEN {test} THEN 'null' ELSE {sql} END")]
    pieces.append((True, "}" if columns else "{}"))
    merged: list[str] = []
    literal = ""
    for is_literal, text in pieces:
        if is_literal:
            literal += text
            continue
        if literal:
            merged.append(_literal(literal))
            literal = ""
        merged.append(f"({text})")
    if literal:
        merged.append(_literal(literal))
    return " || ".join(merged)


def _finish_one(match: re.Match[bytes]) -> bytes:
    tag, text = match.group(1), match.group(2)
    if tag == b"j":
        return compact_json(text)
    number = float(text)
    # As the row-by-row path's float loader: NaN and the infinities stay PostgreSQL's words.
    return orjson.dumps(number if number - number == 0 else text.decode("ascii"))


def finish(chunk: bytes) -> bytes:
    """The chunk with every marked value (``_marked``) in its final form; most chunks have none."""
    if b"\x01" not in chunk:
        return chunk
    return _MARKED.sub(_finish_one, chunk)
