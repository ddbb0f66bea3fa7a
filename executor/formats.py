"""The data formats: the bytes a data file holds around and between chunks of JSON lines.

Records arrive as chunks of JSON lines (``Source.json_lines``), built by the
source. Formats (SPEC: Artifacts, 2): ``jsonl`` one object per line, ``json``
one array, ``yaml`` one sequence of mappings (a JSON object is a YAML flow
mapping, so each record is its JSON line with the few characters YAML reads
differently escaped). Each is streamed chunk by chunk: memory stays flat.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

import yaml

_YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class Encoder(Protocol):
    """A data format: the bytes before, for each chunk of JSON lines, and after the records."""

    extension: str
    content_type: str

    def head(self) -> bytes: ...

    def body(self, chunk: bytes, first: bool) -> tuple[bytes, ...]: ...

    def tail(self, records: int) -> bytes: ...


class JsonLines:
    """``jsonl``: one object per line; an empty table is an empty file."""

    extension, content_type = "jsonl", "application/x-ndjson"

    def head(self) -> bytes:
        return b""

    def body(self, chunk: bytes, first: bool) -> tuple[bytes, ...]:
        return chunk, b"\n"

    def tail(self, records: int) -> bytes:
        return b""


class JsonArray:
    """``json``: one array, an object per line; ``[]`` when empty."""

    extension, content_type = "json", "application/json"

    def head(self) -> bytes:
        return b"["

    def body(self, chunk: bytes, first: bool) -> tuple[bytes, ...]:
        # Newlines only separate records: a JSON object never holds a raw one.
        return b"\n" if first else b",\n", chunk.replace(b"\n", b",\n")

    def tail(self, records: int) -> bytes:
        return b"\n]\n" if records else b"]\n"


# Characters a YAML reader refuses (DEL, C1 controls, U+FFFE/F) or folds into a
# space (NEL, U+2028/9) inside a double-quoted scalar, and the BOM: as UTF-8 bytes.
# Outside JSON strings there is only ASCII, so they are always inside one.
_YAML_UNSAFE = re.compile(rb"\x7f|\xc2[\x80-\x9f]|\xe2\x80[\xa8\xa9]|\xef\xbb\xbf|\xef\xbf[\xbe\xbf]")
# The same, tested piece by piece (one alternation tries every byte, about six
# times slower): each scan looks for a literal lead, with memchr or with sre's
# literal-prefix search.
_YAML_LINE_SEPARATORS = re.compile(rb"\xe2\x80[\xa8\xa9]")
_YAML_UNSAFE_AFTER_LEAD = {
    b"\xc2": re.compile(rb"\xc2[\x80-\x9f]"),
    b"\xef": re.compile(rb"\xef(?:\xbb\xbf|\xbf[\xbe\xbf])"),
}
# JSON that YAML 1.1 reads otherwise: a number with an exponent but no dot or no
# sign (a string to YAML 1.1), an escaped UTF-16 surrogate (two lone halves).
_YAML_MISREAD = re.compile(rb"[:,\[]-?[0-9]+(?:[eE]|\.[0-9]+[eE][0-9])|\\u[dD][89a-fA-F]")
# A JSON string (consumed whole, so nothing inside one is taken for a number), or a
# number with an exponent: its integer part, its fraction, its exponent's sign and digits.
_JSON_STRING_OR_EXPONENT = re.compile(rb'("[^"\\]*(?:\\.[^"\\]*)*")|(-?[0-9]+)(\.[0-9]+)?[eE]([-+]?)([0-9]+)')
# Inside a string: an escaped surrogate pair, a lone escaped surrogate, or another escape
# (matched so that an escaped backslash is never taken for the start of one).
_SURROGATE_ESCAPE = re.compile(
    rb"\\u([dD][89abAB][0-9a-fA-F]{2})\\u([dD][c-fC-F][0-9a-fA-F]{2})|(\\u[dD][89a-fA-F][0-9a-fA-F]{2})|\\."
)


# YAML takes a mapping key without a ``?`` (an implicit key) only up to 1024 characters: a longer
# one (a nested key of a JSON column's value, an SQLite column's name) failed the whole file
# ("expected ',' or '}', but got ':'"). Such a key is written explicit, ``{? "<key>":1}``: the same
# mapping. Bytes are counted (at least the characters): a key over this many gets its ``?``.
_LONG_KEY_BYTES = 1000
# A JSON string token and the colon after it when it is a key (strings consumed whole, so nothing
# inside one is taken for a key); a long run between two quotes, then a colon: a long key, maybe.
_JSON_STRING_AND_COLON = re.compile(rb'("[^"\\]*(?:\\.[^"\\]*)*")(:?)')
_LONG_KEY = re.compile(rb'"[^"\n]{%d}[^"\n]*+":' % _LONG_KEY_BYTES)


def _yaml_key(match: re.Match[bytes]) -> bytes:
    string, colon = match.groups()
    return b"? " + string + colon if colon and len(string) > _LONG_KEY_BYTES else match.group()


def _long_key_lines(chunk: bytes) -> list[tuple[int, int]]:
    """Where the lines that may hold a long key start and end.

    Searched in a copy whose escapes are blanked (each ``\\\\`` and ``\\"`` by two bytes, left to
    right, as JSON pairs them), where a string is the run between two quotes: a long value (text)
    costs the search only. A line found is then read token by token: one wrongly found (a run
    between two strings) costs only that.
    """
    probe = chunk.replace(b"\\\\", b"__").replace(b'\\"', b"__") if b"\\" in chunk else chunk
    lines, at = [], 0
    while (found := _LONG_KEY.search(probe, at)) is not None:
        end = probe.find(b"\n", found.end())
        at = len(probe) if end < 0 else end
        lines.append((probe.rfind(b"\n", 0, found.start()) + 1, at))
    return lines


def _explicit_keys(chunk: bytes, keys_as_first_line: bool) -> bytes:
    """``chunk`` with its keys too long for implicit YAML keys made explicit (``_LONG_KEY_BYTES``).

    A record's own keys are its columns' names, the same on every line: the first line tells.
    Other keys are those of objects inside values (a JSON column's), which only a source writing
    JSON values has (not ``keys_as_first_line``), and only in a chunk with more than one ``{`` a
    line: those chunks are searched (``_long_key_lines``).
    """
    line = chunk.partition(b"\n")[0]
    if any(colon and len(key) > _LONG_KEY_BYTES for key, colon in _JSON_STRING_AND_COLON.findall(line)):
        return _JSON_STRING_AND_COLON.sub(_yaml_key, chunk)
    if keys_as_first_line or chunk.count(b"{") == chunk.count(b"\n") + 1:  # one object a line
        return chunk
    lines = _long_key_lines(chunk)
    if not lines:
        return chunk
    pieces, done = [], 0
    for start, end in lines:
        pieces += [chunk[done:start], _JSON_STRING_AND_COLON.sub(_yaml_key, chunk[start:end])]
        done = end
    return b"".join([*pieces, chunk[done:]])


def _has_yaml_unsafe(chunk: bytes) -> bool:
    """Whether ``_YAML_UNSAFE`` matches ``chunk``: mostly not, and found out fast."""
    if b"\x7f" in chunk or _YAML_LINE_SEPARATORS.search(chunk):
        return True
    for lead, pattern in _YAML_UNSAFE_AFTER_LEAD.items():
        at = chunk.find(lead)
        if at >= 0 and pattern.search(chunk, at):
            return True
    return False


def _yaml_escape(match: re.Match[bytes]) -> bytes:
    return b"\\u%04x" % ord(match.group().decode())


def _yaml_surrogate(match: re.Match[bytes]) -> bytes:
    high, low, lone = match.groups()
    if high is not None:  # one character: YAML's \U escape, which every YAML reader takes
        return b"\\U%08x" % (0x10000 + ((int(high, 16) - 0xD800) << 10) + (int(low, 16) - 0xDC00))
    return b"\\ufffd" if lone is not None else match.group()  # YAML holds no lone surrogate


def _yaml_token(match: re.Match[bytes]) -> bytes:
    """A JSON string or number as YAML 1.1 reads the same value (``_JSON_STRING_OR_EXPONENT``)."""
    string, integer, fraction, sign, exponent = match.groups()
    if string is not None:
        return _SURROGATE_ESCAPE.sub(_yaml_surrogate, string) if b"\\u" in string else string
    # YAML 1.1's float needs a dot and a signed exponent: 1e5 -> 1.0e+5, the same decimal.
    letter = match.group()[len(integer) + len(fraction or b"")]
    return b"%s%s%c%s%s" % (integer, fraction or b".0", letter, sign or b"+", exponent)


class YamlSequence:
    """``yaml``: one sequence of mappings, a record per line; ``[]`` when empty.

    A JSON object is a YAML flow mapping, so each record is its JSON line after
    ``- ``, with the few characters YAML reads differently escaped: about as
    fast as ``jsonl``, and ``yaml.safe_load`` gives back the same values. Unless
    the source vouches for its JSON (``Source.json_is_yaml_safe``), what YAML 1.1
    would misread in a chunk is rewritten in place, never parsed (every digit of
    a number stays): a number with an exponent gets a dot and a signed exponent
    (``1e5`` -> ``1.0e+5``), an escaped surrogate pair becomes one ``\\U``
    escape, a lone surrogate, which YAML cannot hold, U+FFFD. A key too long for
    an implicit YAML key is made explicit (``_LONG_KEY_BYTES``).
    """

    extension, content_type = "yaml", "application/yaml"

    def __init__(self, json_is_yaml_safe: bool = False) -> None:
        self.json_is_yaml_safe = json_is_yaml_safe

    def head(self) -> bytes:
        return b""

    def body(self, chunk: bytes, first: bool) -> tuple[bytes, ...]:
        if not self.json_is_yaml_safe and _YAML_MISREAD.search(chunk):
            chunk = _JSON_STRING_OR_EXPONENT.sub(_yaml_token, chunk)
        if _has_yaml_unsafe(chunk):  # mostly not
            chunk = _YAML_UNSAFE.sub(_yaml_escape, chunk)
        chunk = _explicit_keys(chunk, self.json_is_yaml_safe)  # last: the escapes above lengthen keys
        return b"- ", chunk.replace(b"\n", b"\n- "), b"\n"

    def tail(self, records: int) -> bytes:
        return b"" if records else b"[]\n"


def dump_yaml(data: Any, flow: bool = False) -> bytes:
    """YAML (block style, or one flow line), keys in their order, unicode kept."""
    return yaml.dump(
        data,
        Dumper=_YAML_DUMPER,
        sort_keys=False,
        allow_unicode=True,
        default_flow_style=flow,
        width=1 << 30,
        encoding="utf-8",
    )


def encoder(fmt: str, json_is_yaml_safe: bool = False) -> Encoder:
    """The encoder of a data format (``jsonl``, ``json``, ``yaml``)."""
    if fmt == "yaml":
        return YamlSequence(json_is_yaml_safe)
    return JsonArray() if fmt == "json" else JsonLines()
