"""Each SQLite row as a JSON object, built by SQLite itself (see ``executor.sources.sqlite``).

``row_json_sql`` gives the SQL of one row: ``json_object(?, <value>, …)``, keys
bound as parameters, each value checked only for the storage classes its
column can hold (``AFFINITY_KINDS``). Every column is read ``COLLATE BINARY``:
the checks compare values, and a column declared with a collation this process
does not have (an application's own) would otherwise fail the statement.
"""

from __future__ import annotations

# SQLite's default SQLITE_MAX_FUNCTION_ARG is 127: at most 63 key/value pairs per
# json_object() call, so wide tables are encoded as several objects glued together.
_PAIRS_PER_CALL = 60

# What each kind of column can hold: "raw" (integers, text and NULL, which json_object
# encodes exactly: the rowid alias), "text" (text or blobs), or "any" storage class, of
# which the column's affinity makes one the likely one, worth testing first:
# "mostly-integer", "mostly-real". A STRICT table's types are not trusted further than
# their affinity: SQLite 3.37-3.4x let ALTER TABLE ADD COLUMN give an INT column a REAL
# default, a REAL or BLOB column a TEXT one, a TEXT column a BLOB one, on rows already there.
AFFINITY_KINDS = {"TEXT": "text", "INTEGER": "mostly-integer", "REAL": "mostly-real"}
_ASCII_UPPER = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def ascii_upper(text: str) -> str:
    """``text`` with ASCII letters in upper case, as SQLite compares type names (``'ﬅ'.upper()``
    is ``'ST'`` to Python, and nothing to SQLite)."""
    return text.translate(_ASCII_UPPER)


def affinity(declared: str) -> str:
    """SQLite's column affinity for a declared type (its documented rules, in order)."""
    upper = ascii_upper(declared)
    if "INT" in upper:
        return "INTEGER"
    if "CHAR" in upper or "CLOB" in upper or "TEXT" in upper:
        return "TEXT"
    if "BLOB" in upper or not upper:
        return "BLOB"
    if "REAL" in upper or "FLOA" in upper or "DOUB" in upper:
        return "REAL"
    return "NUMERIC"


def _real_sql(c: str, zero_sql: str) -> str:
    """A REAL as JSON that parses back to the same double (see the module docstring).

    A value with at most 6 decimals under 1e9 in size (prices, rates,
    coordinates) is written short: ``m / 1e6 = c`` with ``m`` the integer
    ``round(c * 1e6)`` is an IEEE division of two exact doubles, so it holds
    exactly when the decimal ``m`` * 10^-6 reads back as ``c``, and that decimal
    (15 digits at most) is what ``%!.15g`` prints. That is how ``json_object``
    prints a REAL, so the value goes in as it is: ``json()``, which marks text
    as JSON, costs more than the formatting. Every other finite value gets 18
    significant digits; the infinities become strings, which ``json_object``
    quotes.
    """
    return (
        f"CASE WHEN {c} = 0 THEN json({zero_sql.format(c=c)}) "
        f"WHEN {c} > -1e9 AND {c} < 1e9 AND round({c} * 1e6) / 1e6 = {c} THEN {c} "
        f"WHEN {c} < 9e999 AND {c} > -9e999 THEN json(printf('%!.18g', {c})) "
        f"WHEN {c} > 0 THEN 'Infinity' ELSE '-Infinity' END"
    )


def _value_sql(c: str, kind: str, zero_sql: str) -> str:
    """The JSON value of column ``c``, checked only for the storage classes ``kind`` allows.

    Text and blobs are told apart from numbers by comparison (numbers < text <
    blob, ``+`` dropping affinity), which costs less than ``typeof``; where a
    number is likely, one ``typeof`` tests for it first.
    """
    blob = f"_extracts_base64({c})"
    if kind == "raw":
        return c
    if kind == "text":
        return f"CASE WHEN +{c} >= x'' THEN {blob} ELSE {c} END"
    if kind == "mostly-integer":
        return (
            f"CASE typeof({c}) WHEN 'integer' THEN {c} WHEN 'real' THEN {_real_sql(c, zero_sql)} "
            f"WHEN 'blob' THEN {blob} ELSE {c} END"
        )
    if kind == "mostly-real":
        return (
            f"CASE typeof({c}) WHEN 'real' THEN {_real_sql(c, zero_sql)} WHEN 'blob' THEN {blob} ELSE {c} END"
        )
    return (
        f"CASE WHEN +{c} >= '' THEN (CASE WHEN +{c} >= x'' THEN {blob} ELSE {c} END) "
        f"WHEN typeof({c}) = 'real' THEN {_real_sql(c, zero_sql)} ELSE {c} END"
    )


def row_json_sql(columns: list[str], kinds: list[str], zero_sql: str) -> str:
    """SQL for one row as a JSON object; one ``?`` per column (its key, ``columns`` quoted), in order."""
    binary = [f"({c} COLLATE BINARY)" for c in columns]
    pairs = [f"?, {_value_sql(c, kind, zero_sql)}" for c, kind in zip(binary, kinds, strict=True)]
    calls = [
        "json_object(" + ", ".join(pairs[i : i + _PAIRS_PER_CALL]) + ")"
        for i in range(0, len(pairs), _PAIRS_PER_CALL)
    ]
    if len(calls) == 1:
        return calls[0]
    # '{"a":1}' + '{"b":2}' -> '{"a":1,"b":2}': no value ends with '}' nor starts a call.
    inner = [
        f"rtrim({calls[0]}, '}}')",
        *(f"trim({c}, '{{}}')" for c in calls[1:-1]),
        f"ltrim({calls[-1]}, '{{')",
    ]
    return " || ',' || ".join(inner)
