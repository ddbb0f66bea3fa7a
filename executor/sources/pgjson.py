"""Each row's JSON built inside PostgreSQL, byte for byte what the row-by-row path writes.

``row_json_sql`` gives one SQL expression per table: the row as one JSON
object, the text the psycopg loaders and ``RowEncoder`` would have produced
(the type-fidelity table of ``executor.sources.postgres``), so that the server
does the formatting and Python only moves bytes. It is built from concatenated
pieces (the cheapest way PostgreSQL 15 has: ``row_to_json``, ``format`` and
``concat`` all cost more), as few as can be: a key joins the literal of the
CASE beside it (``_joined``). Each value in its cheapest exact form:

* integers, ``oid``: their text; ``boolean``: ``true`` / ``false``;
* ``real`` / ``double precision``: orjson's form of the shortest exact
  digits — PostgreSQL's own text (``extra_float_digits = 1``) in the common
  range (1e-4 to 1e15), with ``.0`` on whole numbers; every other value is
  finished in Python as the row-by-row path does (``finish``): there the two
  formats differ, and PostgreSQL's digits are not always the shortest;
* text types: ``to_json``, whose escaping is orjson's (the same short
  escapes, ``\\u00XX`` in lower case, nothing else escaped);
* dates and times: their ISO text with a ``T``; BC years made astronomical;
  ``timestamptz`` in UTC (``AT TIME ZONE INTERVAL '0'``) and a ``Z``;
* ``bytea``: base64 without line breaks; ``numeric``, ``uuid``, ``time``,
  ``interval``: their text as a string;
* ``json`` / ``jsonb``: their text, compacted in Python (``rowjson.compact_json``);
* any other scalar type (enums, ranges, ``inet``, ``money``, composites…): its
  output function's text as a string.

Arrays are left to the row-by-row path: ``None``. (``int2vector``, ``oidvector``, ``point``…
have an element type but are no arrays: their text, as any other scalar.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

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
    is_array: bool  # an array (its text is array_out's): not built in SQL


# A row's SQL is built as pieces: a literal's text (``str``), an expression (``_Sql``) or a CASE
# (``_Case``). Each ``||`` costs PostgreSQL a call, a copy and an allocation, so ``_joined`` moves
# a literal into a neighbouring CASE, where it joins the literal its branches start or end with
# (a key into ``'null'``, a closing ``"`` into the ``Z`` of a timestamp) instead of costing one.
@dataclass(frozen=True)
class _Sql:
    text: str


@dataclass(frozen=True)
class _Case:
    whens: tuple[tuple[str, tuple[Any, ...]], ...]  # (condition, pieces)
    otherwise: tuple[Any, ...]


def _case(whens: list[tuple[str, tuple[Any, ...]]], otherwise: tuple[Any, ...]) -> _Case:
    """A CASE; one whose ELSE is a single CASE takes that CASE's branches (no nesting)."""
    if len(otherwise) == 1 and isinstance(otherwise[0], _Case):
        return _Case(tuple(whens) + otherwise[0].whens, otherwise[0].otherwise)
    return _Case(tuple(whens), otherwise)


def _around(case: _Case, before: str, after: str) -> _Case:
    """The CASE with ``before`` and ``after`` joined to every branch (both sides of ``||`` alike)."""
    return _Case(
        tuple((test, _joined((before, *pieces, after))) for test, pieces in case.whens),
        _joined((before, *case.otherwise, after)),
    )


def _joined(pieces: tuple[Any, ...]) -> tuple[Any, ...]:
    """The same text in fewer ``||``: adjacent literals merged, the others moved into a CASE beside them."""
    out: list[Any] = []
    for piece in pieces:
        if piece == "":
            continue
        if isinstance(piece, str) and out and isinstance(out[-1], str):
            out[-1] += piece
        elif isinstance(piece, str) and out and isinstance(out[-1], _Case):
            out[-1] = _around(out[-1], "", piece)
        elif isinstance(piece, _Case) and out and isinstance(out[-1], str):
            out[-1] = _around(piece, out[-1], "")
        else:
            out.append(piece)
    return tuple(out)


def _literal(text: str) -> str:
    """A SQL string literal (standard_conforming_strings is on in the session)."""
    if any(char < " " for char in text):
        escaped = text.replace("\\", "\\\\").replace("'", "''")
        return "E'" + "".join(f"\\x{ord(char):02x}" if char < " " else char for char in escaped) + "'"
    return "'" + text.replace("'", "''") + "'"


def _sql(pieces: tuple[Any, ...]) -> str:
    """The pieces' SQL: ``||`` nested as a balanced tree, each byte copied about log2(n) times, not n/2."""
    if len(pieces) > 1:
        middle = len(pieces) // 2
        return f"({_sql(pieces[:middle])} || {_sql(pieces[middle:])})"
    piece = pieces[0]
    if isinstance(piece, str):
        return _literal(piece)
    if isinstance(piece, _Sql):
        return f"({piece.text})"
    whens = " ".join(f"WHEN {test} THEN {_sql(branch)}" for test, branch in piece.whens)
    return f"CASE {whens} ELSE {_sql(piece.otherwise)} END"


def _bc(text: str) -> str:
    """'0044-03-15 …  BC' → '-0043-03-15 …' (1 BC is year 0000), as ``pgload._astronomical``."""
    year = f"split_part({text}, '-', 1)"
    return (
        f"(CASE WHEN {year} = '0001' THEN '0000' ELSE '-' || lpad(({year}::int - 1)::text, 4, '0') END"
        f" || substr(left({text}, -3), strpos({text}, '-')))"
    )


def _marked(tag: str, text: str) -> tuple[Any, ...]:
    """A value Python finishes (``finish``): its PostgreSQL text between two \\x01, after a tag."""
    return ("\x01" + tag, _Sql(text), "\x01")


def _float(c: str, fixed_below: str) -> tuple[Any, ...]:
    """A float's JSON number (module docstring); ``fixed_below``: where PostgreSQL's text turns to
    exponents (1e15 for double precision, 1e6 for real; 1e-4 below, for both).

    Outside that range the two formats differ, and PostgreSQL's digits are not always the
    shortest (past 2**53 it skips a decimal lying exactly halfway between two doubles, which
    round-half-even would accept): those values, rare in data, are finished in Python
    exactly as the row-by-row path does (``float(text)``, then orjson).
    """
    text = _Sql(f"{c}::text")
    common = (
        f"{c} >= 1e-4::float8 AND {c} < {fixed_below}::float8"
        f" OR {c} <= -1e-4::float8 AND {c} > -{fixed_below}::float8"
    )
    return (
        _case(
            [
                (common, (_case([(f"{c} = trunc({c})", (text, ".0"))], (text,)),)),
                (f"{c} = 0", (_case([(f"{c}::text = '-0'", ("-0.0",))], ("0.0",)),)),
            ],
            _marked("f", f"{c}::text"),
        ),
    )


def _quoted(sql: str) -> tuple[Any, ...]:
    return ('"', _Sql(sql), '"')


def _value(column: Column, c: str) -> tuple[Any, ...] | None:
    """The pieces of the value's JSON text (``_joined``); None: not built in SQL.

    A quoted value's SQL gives the string's content only (no character of it needs an escape).
    """
    oid = column.type_oid
    if column.is_array:
        return None
    if oid in (INT2, INT4, INT8, OID):
        return (_Sql(f"{c}::text"),)
    if oid == BOOL:
        return (_case([(c, ("true",))], ("false",)),)
    if oid == FLOAT8:
        return _float(c, "1e15")
    if oid == FLOAT4:
        return _float(c, "1e6")
    if oid in _TEXT_TYPES:
        return (_Sql(f"to_json({c})::text"),)
    if oid in _QUOTED_TEXT:
        return _quoted(f"{c}::text")
    if oid == BYTEA:
        return _quoted(f"replace(encode({c}, 'base64'), E'\\n', '')")
    if oid in (JSON, JSONB):
        return _marked("j", f"{c}::text")
    if oid == DATE:
        common = f"{c} >= '0001-01-01' OR {c} = '-infinity'"
        return ('"', _case([(common, (_Sql(f"{c}::text"),))], (_Sql(_bc(f"{c}::text")),)), '"')
    if oid == TIMESTAMP:
        common = f"{c} >= '0001-01-01' OR {c} = '-infinity'"
        bc = f"replace({_bc(f'{c}::text')}, ' ', 'T')"
        return ('"', _case([(common, (_Sql(f"replace({c}::text, ' ', 'T')"),))], (_Sql(bc),)), '"')
    if oid == TIMESTAMPTZ:
        # AT TIME ZONE INTERVAL '0' is AT TIME ZONE 'UTC' without parsing a zone's name per row.
        common = f"{c} >= '0001-01-01 00:00:00+00' AND {c} < 'infinity'"
        utc = _Sql(f"replace(({c} AT TIME ZONE INTERVAL '0')::text, ' ', 'T')")
        infinite = f"{c} = 'infinity' OR {c} = '-infinity'"
        bc = f"replace(replace({_bc(f'{c}::text')}, ' ', 'T'), '+00', 'Z')"
        return ('"', _case([(common, (utc, "Z")), (infinite, (_Sql(f"{c}::text"),))], (_Sql(bc),)), '"')
    if oid == TIMETZ:
        return _quoted(f"regexp_replace({c}::text, '([+-][0-9][0-9])$', '\\1:00')")
    if column.kind == "p":
        return None  # a pseudo-type (a view's "unknown" literal…): let psycopg say what it is
    # The output function's text, even where a cast differs.
    return (_Sql(f"to_json(format('%s', {c}))::text"),)


def row_json_sql(columns: list[Column], alias: str) -> str | None:
    """SQL of one row of ``alias`` as a JSON object (module docstring); None: some column cannot be.

    The text has no ``%`` of its own doubled: pass it as a statement without parameters,
    or double them.
    """
    pieces: list[Any] = []
    for position, column in enumerate(columns):
        c = f'{alias}."{column.name.replace(chr(34), chr(34) * 2)}"'
        if column.cast:
            c = f"({c}{column.cast})"
        value = _value(column, c)
        if value is None:
            return None
        pieces.append(("{" if position == 0 else ",") + orjson.dumps(column.name).decode() + ":")
        if column.nullable:
            # A composite's value, not its fields: (NULL, NULL) is a row (the parser makes this IS
            # NOT DISTINCT FROM NULL a scalar test).
            test = f"{c} IS NOT DISTINCT FROM NULL" if column.kind == "c" else f"{c} IS NULL"
            value = (_case([(test, ("null",))], _joined(value)),)
        pieces += value
    pieces.append("}" if columns else "{}")
    return _sql(_joined(tuple(pieces)))


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
