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
    escape, a lone surrogate, which YAML cannot hold, U+FFFD.
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
