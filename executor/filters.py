"""Row filters of an extract: checking them, and compiling them to a SQL ``WHERE``.

A filter is ``{"<schema>": {"where": {"<column>": <condition>}}}`` (SPEC: Extract
configurations). A condition is a bare scalar (equality; a bare ``null`` means
``IS NULL``) or an operator object::

    $eq $ne $gt $gte $lt $lte   a scalar          $in $nin   a non-empty array of scalars
    $like                       a string          $null      true (IS NULL) or false (IS NOT NULL)

Several operators in one object all apply (``{"$gte": 1, "$lt": 10}``), as do
several columns: everything is joined with ``AND``. ``$eq``/``$ne`` with ``null``
mean ``IS NULL``/``IS NOT NULL``. Otherwise comparisons follow SQL: a NULL value
matches no comparison, ``$ne`` and ``$nin`` included; ``$like`` uses the
database's own ``LIKE`` (case-insensitive for ASCII in SQLite and MySQL,
case-sensitive in PostgreSQL).

A list takes at most ``MAX_LIST`` values, and one ``where`` at most
``MAX_OPERANDS`` values in all. Every value must be one the source can bind, or
it would pass validation and then fail every run: integers within signed 64 bits,
whatever the source (SQLite's INTEGER; Python's sqlite3 raises OverflowError past
it), and, where the source's text cannot hold NUL (PostgreSQL: ``Source.
text_holds_nul``), strings without one.

Column names are quoted by the caller's dialect; every value is bound as a
parameter, never spliced into the SQL.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any

import orjson

COMPARISONS = {"$eq": "=", "$ne": "<>", "$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
LISTS = {"$in": "IN", "$nin": "NOT IN"}
OPERATORS = (*COMPARISONS, *LISTS, "$like", "$null")
MAX_LIST = 1000
# Values bound in one schema's where: keeps a filter's checking and compiling small, and its
# query under SQLite's 32,766 parameters (PostgreSQL's limit is 65,535).
MAX_OPERANDS = 10_000

# What every source binds (module docstring).
INTEGER_MIN, INTEGER_MAX = -(2**63), 2**63 - 1

_SCALAR_HELP = "a string, a number or a boolean"


def _is_scalar(value: object) -> bool:
    return isinstance(value, str | int | float | bool)


def _unbindable(value: object, text_holds_nul: bool) -> str | None:
    """Why the source cannot bind the scalar ``value``, or None."""
    if isinstance(value, int) and not isinstance(value, bool) and not INTEGER_MIN <= value <= INTEGER_MAX:
        # Only short numbers are shown: str() of a huge int is slow, past 4,300 digits an error.
        shown = str(value) if value.bit_length() <= 128 else f"an integer of {value.bit_length()} bits"
        return (
            f"{shown} is outside the signed 64-bit integers every source can bind "
            f"({INTEGER_MIN} to {INTEGER_MAX})"
        )
    if not text_holds_nul and isinstance(value, str) and "\x00" in value:
        return "a string with NUL (\\u0000) is not a value this source can bind: its text cannot hold NUL"
    return None


def _operand_problem(op: str, value: object, text_holds_nul: bool) -> str | None:
    """Why ``value`` cannot follow ``op``, or None."""
    if op in ("$eq", "$ne") and value is None:
        return None
    if op in COMPARISONS:
        if not _is_scalar(value):
            return f"{op} needs {_SCALAR_HELP}" + (" or null" if op in ("$eq", "$ne") else "")
        return None if (problem := _unbindable(value, text_holds_nul)) is None else f"{op}: {problem}"
    if op in LISTS:
        if not isinstance(value, list) or not value:
            return f"{op} needs a non-empty array of scalars"
        if len(value) > MAX_LIST:
            return f"{op} takes at most {MAX_LIST} values"
        if not all(_is_scalar(item) for item in value):
            return f"{op} needs an array of {_SCALAR_HELP} values (match NULL with $null)"
        for index, item in enumerate(value):
            if (problem := _unbindable(item, text_holds_nul)) is not None:
                return f"{op} item {index}: {problem}"
        return None
    if op == "$like":
        if not isinstance(value, str):
            return "$like needs a string pattern"
        return None if (problem := _unbindable(value, text_holds_nul)) is None else f"$like: {problem}"
    return None if isinstance(value, bool) else "$null needs true or false"


def _condition_problems(condition: object, text_holds_nul: bool) -> list[tuple[str, str]]:
    """Problems of one column's condition, as (path below the column, message)."""
    if condition is None:
        return []
    if _is_scalar(condition):
        problem = _unbindable(condition, text_holds_nul)
        return [] if problem is None else [("", problem)]
    if isinstance(condition, list):
        return [("", 'use {"$in": [...]} to match one of several values')]
    if not isinstance(condition, dict):
        return [("", "must be a scalar, null or an operator object")]
    if not condition:
        return [("", "an operator object needs at least one operator: " + ", ".join(OPERATORS))]
    problems = []
    for op, value in condition.items():
        if op not in OPERATORS:
            problems.append((f".{op}", f"unknown operator '{op}'; use one of " + ", ".join(OPERATORS)))
        elif (message := _operand_problem(op, value, text_holds_nul)) is not None:
            problems.append((f".{op}", message))
    return problems


def check_where(
    where: object, columns: list[str], *, field: str = "where", text_holds_nul: bool = True
) -> list[tuple[str, str]]:
    """Every problem of a filter's ``where`` as (field path, message); empty when valid.

    Paths start with ``field``: pass ``field=f"filter.{schema}.where"`` to get
    ``filter.users.where.age.$in``. ``text_holds_nul``: the source's (``Source.text_holds_nul``).
    """
    if where is None:
        return []
    if not isinstance(where, dict):
        return [(field, "must be an object mapping column names to a value or an operator object")]
    known = set(columns)
    problems = []
    for column, condition in where.items():
        path = f"{field}.{column}"
        if column not in known:
            shown = ", ".join(columns[:20]) + (", …" if len(columns) > 20 else "")
            problems.append((path, f"unknown column '{column}'; the columns are: {shown}"))
            continue
        problems += [
            (path + below, message) for below, message in _condition_problems(condition, text_holds_nul)
        ]
    operands = sum(_operand_count(condition) for condition in where.values())
    if operands > MAX_OPERANDS:
        problems.append((field, f"holds {operands} values; at most {MAX_OPERANDS} in one where"))
    return problems


def _operand_count(condition: object) -> int:
    """How many values a condition binds (a list counts each item)."""
    if not isinstance(condition, dict):
        return 1
    return sum(len(value) if isinstance(value, list) else 1 for value in condition.values())


def _compile_op(column: str, op: str, value: Any, placeholder: str) -> tuple[str, list[Any]]:
    if op in ("$eq", "$ne") and value is None:
        return f"{column} IS {'NOT ' if op == '$ne' else ''}NULL", []
    if op in COMPARISONS:
        return f"{column} {COMPARISONS[op]} {placeholder}", [value]
    if op in LISTS:
        marks = ", ".join([placeholder] * len(value))
        return f"{column} {LISTS[op]} ({marks})", list(value)
    if op == "$like":
        return f"{column} LIKE {placeholder}", [value]
    return f"{column} IS {'' if value else 'NOT '}NULL", []


def compile_where(
    where: dict[str, Any] | None, quote: Callable[[str], str], placeholder: str
) -> tuple[str, list[Any]]:
    """``(" WHERE <cond> AND <cond>", params)`` for a checked ``where``; ``("", [])`` for none.

    ``quote`` quotes a column name in the dialect; ``placeholder`` is the driver's
    parameter mark (``?`` or ``%s``).
    """
    conditions: list[str] = []
    params: list[Any] = []
    for column, condition in (where or {}).items():
        ops = condition if isinstance(condition, dict) else {"$eq": condition}
        for op, value in ops.items():
            sql, values = _compile_op(quote(column), op, value, placeholder)
            conditions.append(sql)
            params += values
    if not conditions:
        return "", []
    return " WHERE " + " AND ".join(conditions), params


class DuplicateKey(ValueError):
    """A JSON object names one key twice: which of its values was meant cannot be told."""

    def __init__(self, key: str) -> None:
        shown = key if len(key) <= 100 else key[:100] + "…"
        super().__init__(f"the key {shown!r} appears twice in one object; give each key once")
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        raise DuplicateKey(next(key for key, _ in pairs if key in seen or seen.add(key)))
    return value


def loads_exact(raw: bytes | str) -> Any:
    """JSON (a body, a ``--filter``) with every integer exact and no key twice in an object;
    raises orjson.JSONDecodeError, or DuplicateKey.

    orjson reads an integer past 64 bits as a float, which would round a filter value
    that must be refused (outside a signed 64-bit integer) into one that passes; and
    it keeps the last of two equal keys, so ``{"name": "a", "name": "b"}`` or a
    ``where`` naming a column twice lost a value without a word. A value holding an
    object or a float is read again with ``json``, which keeps integers exact and
    shows every key (after orjson, whose syntax errors are the ones reported).
    """
    value = orjson.loads(raw)
    if _holds_object(value) or _holds_float(value):
        with contextlib.suppress(RecursionError):  # nested deeper than json's recursion allows
            value = json.loads(raw, object_pairs_hook=_unique_keys)
    return value


def _holds_object(value: Any) -> bool:
    """Whether a parsed JSON value is or holds an object (walked without recursion: any depth)."""
    todo = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, dict):
            return True
        if isinstance(item, list):
            todo += item
    return False


def _holds_float(value: Any) -> bool:
    """Whether a parsed JSON value holds a float anywhere (walked without recursion: any depth)."""
    todo = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, float):
            return True
        if isinstance(item, dict):
            todo += item.values()
        elif isinstance(item, list):
            todo += item
    return False
