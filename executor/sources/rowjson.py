"""Row tuples to JSON object bytes, shared by the PostgreSQL and MySQL sources.

The drivers are configured (psycopg loaders, PyMySQL converters) so that every
value already arrives as a JSON-ready Python value: str, int, float, bool, None
or a list of those. One ``orjson.dumps`` per row then does the rest.

JSON columns are the exception: their text is copied into the output as it is
(made one line), so that numbers keep every digit and keys keep their order.
A JSON value is carried as ``bytes`` (already JSON) or ``str`` (JSON text to
compact); nothing else in a row is ever ``bytes``, because binary columns
arrive as base64 strings. MariaDB's JSON columns may hold text that is not JSON
(``lenient_json``).
"""

from __future__ import annotations

import codecs
import contextlib
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from executor.credentials import blank

# A JSON string token, or a run of the whitespace JSON allows between tokens.
_TOKEN_OR_SPACE = re.compile(rb'("(?:[^"\\]|\\.)*")|[ \t\n\r]+')
_UTF8_PIECE = 1 << 16  # bytes of JSON text checked at a time (valid_utf8)


def _keep_strings(match: re.Match[bytes]) -> bytes:
    return match.group(1) or b""


def compact_json(text: str | bytes) -> bytes:
    """Valid JSON text without the whitespace between tokens: one line, same values."""
    raw = text.encode() if isinstance(text, str) else bytes(text)
    return _TOKEN_OR_SPACE.sub(_keep_strings, raw)


def _refuse(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


def _is_json(raw: bytes) -> bool:
    """Whether ``raw`` is JSON text (RFC 8259), whatever Python could make of its values."""
    with contextlib.suppress(orjson.JSONDecodeError):
        orjson.loads(raw)  # strict, and fast: nearly every value ends here
        return True
    # orjson also refuses JSON it cannot hold: 1e400, a lone surrogate escape ("\ud800"),
    # nesting beyond 1024. The json module's grammar is RFC 8259's once NaN and Infinity are
    # refused; numbers stay text (a 5,000-digit integer passes int()'s limit).
    try:
        json.loads(raw.decode(), parse_constant=_refuse, parse_int=str, parse_float=str)
    except (ValueError, RecursionError):
        return False
    return True


def lenient_json(text: str | bytes) -> bytes:
    """A MariaDB JSON column's value: compact JSON when its text is JSON, else that text as a string.

    MariaDB's ``json_valid`` lets in text that is no JSON (``[1.]``, ``"\\x"``, ``[1e+]``), and
    ``check_constraint_checks = 0`` anything at all; as a JSON string such text is kept whole.
    """
    raw = text.encode() if isinstance(text, str) else bytes(text)
    if _is_json(raw):
        return compact_json(raw)
    return orjson.dumps(text if isinstance(text, str) else raw.decode(errors="replace"))


def valid_utf8(chunk: bytes) -> bytes:
    """``chunk``, bytes that are not UTF-8 as U+FFFD (SQLite, SQL_ASCII PostgreSQL: text is unchecked)."""
    if chunk.isascii():  # the common case, checked a word at a time
        return chunk
    # Decoded 64 KiB at a time: each piece's text is small and stays in the CPU's
    # cache, three times faster than one string of the whole chunk (up to 4 bytes
    # a character), and no megabyte-sized string fragments the heap run after run.
    decoder = codecs.getincrementaldecoder("utf-8")()
    view = memoryview(chunk)
    try:
        for start in range(0, len(view), _UTF8_PIECE):
            decoder.decode(view[start : start + _UTF8_PIECE])
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return chunk.decode("utf-8", "replace").encode("utf-8")
    return chunk


def _encode_json_value(value: Any, text: Callable[[str | bytes], bytes]) -> bytes:
    if value is None:
        return b"null"
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return text(value)
    if isinstance(value, list):  # an array of JSON values
        return b"[" + b",".join([_encode_json_value(item, text) for item in value]) + b"]"
    return orjson.dumps(value)


class RowEncoder:
    """Encodes the rows of one result set as JSON objects, keys in column order."""

    def __init__(
        self,
        names: Sequence[str],
        json_columns: Sequence[int] = (),
        json_text: Callable[[str | bytes], bytes] = compact_json,
    ) -> None:
        """``json_text`` writes a JSON column's text (``lenient_json`` where it may be no JSON)."""
        self.names = tuple(names)
        self.json_columns = frozenset(json_columns)
        self._json_text = json_text
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
                parts.append(key + _encode_json_value(value, self._json_text))
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
