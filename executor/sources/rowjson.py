"""Row tuples to JSON object bytes, shared by the PostgreSQL and MySQL sources.

The drivers are configured (psycopg loaders, PyMySQL converters) so that every
value already arrives as a JSON-ready Python value: str, int, float, bool, None
or a list of those. One ``orjson.dumps`` per row then does the rest.

JSON columns are the exception: their text is copied into the output as it is
(made one line), so that numbers keep every digit and keys keep their order.
A JSON value is carried as ``bytes`` (already JSON) or ``str`` (JSON text to
compact); nothing else in a row is ever ``bytes``, because binary columns
arrive as base64 strings.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import orjson

from executor.credentials import blank

# A JSON string token, or a run of the whitespace JSON allows between tokens.
_TOKEN_OR_SPACE = re.compile(rb'("(?:[^"\\]|\\.)*")|[ \t\n\r]+')
_CONTROL = re.compile(rb"[\x00-\x1f]")


def _keep_strings(match: re.Match[bytes]) -> bytes:
    return match.group(1) or b""


def compact_json(text: str | bytes) -> bytes:
    """Valid JSON text without the whitespace between tokens: one line, same values."""
    raw = text.encode() if isinstance(text, str) else bytes(text)
    compact = _TOKEN_OR_SPACE.sub(_keep_strings, raw)
    if _CONTROL.search(compact):
        # Only lenient JSON has raw control characters inside strings; re-encode it
        # (numbers beyond a double's precision are rounded on this rare path).
        return orjson.dumps(json.loads(raw, strict=False))
    return compact


def _encode_json_value(value: Any) -> bytes:
    if value is None:
        return b"null"
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return compact_json(value)
    if isinstance(value, list):  # an array of JSON values
        return b"[" + b",".join(map(_encode_json_value, value)) + b"]"
    return orjson.dumps(value)


class RowEncoder:
    """Encodes the rows of one result set as JSON objects, keys in column order."""

    def __init__(self, names: Sequence[str], json_columns: Sequence[int] = ()) -> None:
        self.names = tuple(names)
        self.json_columns = frozenset(json_columns)
        # Each key pre-encoded once: b'"name":'
        self._keys = [orjson.dumps(name) + b":" for name in self.names]

    def encode(self, rows: Sequence[Sequence[Any]]) -> list[bytes]:
        """JSON object bytes for each row (no newline)."""
        names = self.names
        if not self.json_columns:
            dumps = orjson.dumps
            return [dumps(dict(zip(names, row, strict=True))) for row in rows]
        return [self._encode_with_json(row) for row in rows]

    def _encode_with_json(self, row: Sequence[Any]) -> bytes:
        parts = []
        for index, (key, value) in enumerate(zip(self._keys, row, strict=True)):
            if index in self.json_columns:
                parts.append(key + _encode_json_value(value))
            else:
                parts.append(key + orjson.dumps(value))
        return b"{" + b",".join(parts) + b"}"


def one_line(exc: BaseException | str, *secrets: str | None) -> str:
    """The first meaningful line of a driver error (or message), with every secret blanked out.

    Drivers can echo the connection string (and with it the password) in their
    messages; nothing that leaves a source may contain it.
    """
    text = str(exc).strip() or type(exc).__name__
    line = next((part.strip() for part in text.splitlines() if part.strip()), text)
    for prefix in ("FATAL:", "ERROR:"):
        if line.startswith(prefix):
            line = line[len(prefix) :].strip()
    return blank(line, sorted(filter(None, secrets), key=len, reverse=True))


def lower_first(text: str) -> str:
    """A driver's sentence, to follow "Cannot connect …: ": an acronym (SSL, FATAL) keeps its case."""
    return text[:1].lower() + text[1:] if text[1:2].islower() else text
