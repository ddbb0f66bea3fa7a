"""PostgreSQL's values as JSON-ready Python values: the session they are read in, psycopg's loaders.

Each loader turns PostgreSQL's text output (in ``SESSION_SETTINGS``) into the
value of the type-fidelity table (``executor.sources.postgres``). A ``SQL_ASCII``
database stores text unchecked: its session reads as LATIN1, every byte as it is,
and what is shown (values, names) is made UTF-8 here, U+FFFD for bytes that are not.
"""

from __future__ import annotations

import binascii
from typing import Any

import orjson
import psycopg
from psycopg.adapt import AdaptersMap, Buffer, Loader
from psycopg.postgres import types as builtin_types
from psycopg.types.string import StrDumperUnknown, TextLoader

from executor.sources.rowjson import compact_json, valid_utf8

# Session settings the loaders below rely on.
SESSION_SETTINGS = """
SET default_transaction_read_only = on;
SET TimeZone = 'UTC';
SET DateStyle = 'ISO, YMD';
SET IntervalStyle = 'iso_8601';
SET bytea_output = 'hex';
SET extra_float_digits = 1;
SET standard_conforming_strings = on
"""
# A SQL_ASCII database stores text unchecked, and PostgreSQL refuses to send a byte that is
# not UTF-8 to a UTF8 client. As LATIN1 every byte comes as it is, one character each, and a
# name read so goes back into SQL the same (``shown`` gives it as UTF-8).
CLIENT_ENCODING = {False: "SET client_encoding = 'UTF8'", True: "SET client_encoding = 'LATIN1'"}


# ---------------------------------------------------------------- loaders
# Each turns PostgreSQL's text output (in the session settings above) into the
# JSON-ready value of the type-fidelity table; psycopg's array loaders apply
# them to array elements too.


def _astronomical(text: str) -> str:
    """'0044-03-15 …  BC' → '-0043-03-15 …' (ISO 8601 has a year 0000 = 1 BC)."""
    year, rest = text[:-3].split("-", 1)
    astronomical = 1 - int(year)
    return (f"-{-astronomical:04d}" if astronomical else "0000") + "-" + rest


class _DateLoader(Loader):
    def load(self, data: Buffer) -> str:
        text = str(data, "utf-8")
        return _astronomical(text) if text.endswith("BC") else text


class _TimestampLoader(Loader):
    def load(self, data: Buffer) -> str:
        text = str(data, "utf-8")
        if text.endswith("BC"):
            text = _astronomical(text)
        return text.replace(" ", "T", 1)


class _TimestampTzLoader(Loader):
    def load(self, data: Buffer) -> str:
        text = str(data, "utf-8")
        if text.endswith("+00"):  # the offset, always, in a UTC session
            return text[:-3].replace(" ", "T", 1) + "Z"
        if text.endswith("BC"):
            return self.load(_astronomical(text).encode())
        return text  # ±infinity


class _TimeTzLoader(Loader):
    def load(self, data: Buffer) -> str:
        text = str(data, "utf-8")
        sign = max(text.rfind("+"), text.rfind("-"))
        return text + ":00" if len(text) - sign == 3 else text  # '+02' → '+02:00'


class _FloatLoader(Loader):
    def load(self, data: Buffer) -> float | str:
        number = float(data)
        # inf - inf and nan - nan are nan: those three stay strings, JSON has no such numbers.
        return number if number - number == 0 else str(data, "utf-8")


class _ByteaLoader(Loader):
    def load(self, data: Buffer) -> str:
        raw = binascii.a2b_hex(bytes(data)[2:])  # hex output: '\x0102…'
        return binascii.b2a_base64(raw, newline=False).decode("ascii")


class _JsonLoader(Loader):
    def load(self, data: Buffer) -> bytes:
        return compact_json(data)


class _UncheckedTextLoader(Loader):
    """Text of a SQL_ASCII database: UTF-8, bytes that are not as U+FFFD."""

    def load(self, data: Buffer) -> str:
        return str(data, "utf-8", "replace")


class _UncheckedJsonLoader(Loader):
    def load(self, data: Buffer) -> bytes:
        return compact_json(valid_utf8(bytes(data)))


class BoundsLoader(Loader):
    """An array as a list (psycopg's loader, ``array``) when every lower bound is 1, the common
    case; otherwise PostgreSQL's text of it ("[0:1]={1,2}"), as a list would drop the bounds.

    PostgreSQL prints the bounds ("[lower:upper]=" for each dimension) exactly when one of them
    is not 1. ``as_json``: the array holds JSON, and RowEncoder copies bytes: give a JSON string.
    """

    array: type[Loader]
    as_json: bool

    def __init__(self, oid: int, context: Any = None) -> None:
        super().__init__(oid, context)
        self._load = self.array(oid, context).load

    def load(self, data: Buffer) -> Any:
        if data[0] != 91:  # '[': a byte compared, the cheapest test (the common case pays it alone)
            return self._load(data)
        text = str(data, "utf-8", "replace")  # "replace": a SQL_ASCII database's text
        return orjson.dumps(text) if self.as_json else text


_LOADERS: dict[str, type[Loader]] = {
    "date": _DateLoader,
    "timestamp": _TimestampLoader,
    "timestamptz": _TimestampTzLoader,
    "timetz": _TimeTzLoader,
    "float4": _FloatLoader,
    "float8": _FloatLoader,
    "bytea": _ByteaLoader,
    "json": _JsonLoader,
    "jsonb": _JsonLoader,
}
# psycopg's own loaders already give JSON-ready values for these.
_KEEP = {"int2", "int4", "int8", "oid", "bool", "text", "varchar", "bpchar", "name", '"char"'}
_NUMBERS = {"int2", "int4", "int8", "oid", "bool"}


def configure_loaders(conn: psycopg.Connection[Any]) -> None:
    for info in builtin_types:
        if info.name in _LOADERS:
            conn.adapters.register_loader(info.oid, _LOADERS[info.name])
        elif info.name not in _KEEP:
            # numeric, uuid, interval (ISO 8601 in this session), time, inet, ranges, …:
            # the exact text PostgreSQL prints.
            conn.adapters.register_loader(info.oid, TextLoader)


def read_unchecked(adapters: AdaptersMap) -> None:
    """The loaders of a SQL_ASCII database's values (a cursor's): text as UTF-8, U+FFFD for
    bytes that are not. The connection's keep reading names as they are, for SQL."""
    for info in builtin_types:
        if info.name in ("json", "jsonb"):
            adapters.register_loader(info.oid, _UncheckedJsonLoader)
        elif info.name not in _LOADERS and info.name not in _NUMBERS:
            adapters.register_loader(info.oid, _UncheckedTextLoader)
    adapters.register_loader(0, _UncheckedTextLoader)  # psycopg's for every other type (enums…)


def shown(raw: str) -> str:
    """A SQL_ASCII database's text read as LATIN1 (``CLIENT_ENCODING``) as UTF-8, U+FFFD for bytes
    that are not."""
    return raw.encode("latin-1").decode("utf-8", "replace")


def as_session_text(given: str) -> str:
    """A name or value given in UTF-8 as a SQL_ASCII session (LATIN1) sends those bytes."""
    return given.encode("utf-8").decode("latin-1")


class UncheckedStrDumper(StrDumperUnknown):
    """A str parameter of a SQL_ASCII session: its UTF-8 bytes, not LATIN1's."""

    def dump(self, obj: str) -> Buffer | None:
        return super().dump(as_session_text(obj))


def start_session(conn: psycopg.Connection[Any]) -> bool:
    """The session settings; True: the database is SQL_ASCII, its text read unchecked as LATIN1."""
    unchecked = conn.info.parameter_status("server_encoding") == "SQL_ASCII"
    conn.execute(f"{SESSION_SETTINGS};\n{CLIENT_ENCODING[unchecked]}")
    return unchecked


def shown_value(value: Any) -> Any:
    """A catalog value, its strings (in lists too) ``shown``."""
    if isinstance(value, str):
        return shown(value)
    if isinstance(value, list):
        return [shown_value(item) for item in value]
    return value
