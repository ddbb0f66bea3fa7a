"""The PostgreSQL and MySQL/MariaDB sources against the real servers of this machine.

PostgreSQL at 127.0.0.1:5432 (database ``test``, user ``postgres``, trust auth) and
MariaDB at 127.0.0.1:3306 (user ``root``, empty password). These tests never skip:
when a server is down they fail and say how to start it. The module works in
its own uniquely named PostgreSQL schema and MySQL database and drops them after.
"""

from __future__ import annotations

import base64
import contextlib
import gc
import gzip
import json
import multiprocessing
import random
import re
import secrets
import shutil
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import date, datetime, timedelta
from datetime import time as time_of_day
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import orjson
import psycopg
import pymysql
import pytest
import yaml
from helpers import free_port, start_service, unique_name, wait_for
from pymysql.constants import CLIENT, ER

from executor.naming import safe_file_name
from executor.sources import Source, SourceError, UnknownSchema, open_source
from executor.sources.myconnect import SESSION_SETTINGS, Connector, session_settings, tls_as_offered
from executor.worker import run_extract

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
MY_URL = "mysql://root@127.0.0.1:3306"
START_HINT = {
    "postgresql": "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
    "mysql": "start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd",
}
NAME = unique_name("extracts_test")


def server_down(dialect: str, exc: Exception) -> None:
    pytest.fail(
        f"The {dialect} test server is not reachable ({exc}); start it with: {START_HINT[dialect]}",
        pytrace=False,
    )


# ---------------------------------------------------------------- fixtures


class PG:
    """The module's PostgreSQL schema, an admin connection to it and a source URL."""

    def __init__(self) -> None:
        try:
            self.admin = psycopg.connect(PG_URL, autocommit=True)
        except psycopg.OperationalError as exc:
            server_down("postgresql", exc)
        self.schema = NAME
        self.url = PG_URL
        self.admin.execute(f'CREATE SCHEMA "{NAME}"')

    def name(self, table: str) -> str:
        """The source's name for a table of the module's schema."""
        return f"{self.schema}.{table}"

    def sql(self, table: str) -> str:
        """The table, quoted, for the admin connection's SQL."""
        return f'"{self.schema}"."{table}"'

    def run(self, sql: str, params: Any = None) -> None:
        self.admin.execute(sql.replace("{s}", f'"{self.schema}"'), params)

    def rows(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        return self.admin.execute(sql.replace("{s}", f'"{self.schema}"'), params).fetchall()

    def connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(PG_URL, autocommit=True)

    def close(self) -> None:
        self.admin.execute(f'DROP SCHEMA "{NAME}" CASCADE')
        self.admin.close()


class My:
    """The module's MySQL database, an admin connection to it and a source URL."""

    def __init__(self) -> None:
        try:
            server = pymysql.connect(host="127.0.0.1", user="root", password="")
        except pymysql.err.OperationalError as exc:
            server_down("mysql", exc)
        with server.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE `{NAME}` CHARACTER SET utf8mb4")
        server.close()
        self.admin = self.connect()
        self.url = f"{MY_URL}/{NAME}"

    def name(self, table: str) -> str:
        return table

    def sql(self, table: str) -> str:
        return f"`{table}`"

    def run(self, sql: str, params: Any = None) -> None:
        with self.admin.cursor() as cursor:
            cursor.execute(sql, params)

    def rows(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        with self.admin.cursor() as cursor:
            cursor.execute(sql, params)
            return list(cursor.fetchall())

    def connect(self) -> pymysql.Connection:
        conn = pymysql.connect(
            host="127.0.0.1", user="root", password="", database=NAME, charset="utf8mb4",
            autocommit=True, init_command="SET time_zone = '+00:00'",
        )  # fmt: skip
        return conn

    def close(self) -> None:
        self.run(f"DROP DATABASE `{NAME}`")
        self.admin.close()


@pytest.fixture(scope="module")
def pg() -> Iterator[PG]:
    database = PG()
    yield database
    database.close()


@pytest.fixture(scope="module")
def my() -> Iterator[My]:
    database = My()
    yield database
    database.close()


@pytest.fixture(scope="module", params=["postgresql", "mysql"])
def db(request: pytest.FixtureRequest) -> PG | My:
    """Each test using it runs once per dialect."""
    return request.getfixturevalue("pg" if request.param == "postgresql" else "my")


def export(source: Source, name: str, where: dict | None = None, batch_size: int = 7) -> list[bytes]:
    """Every row of a schema as the JSON lines the worker would write, each one checked to be JSON."""
    lines = []
    for batch in source.json_batches(name, where, batch_size):
        assert 0 < len(batch) <= batch_size
        lines.extend(batch)
    for line in lines:
        assert strict_json(line), line
    return lines


def _refuse(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


def strict_json(text: bytes) -> bool:
    """Whether ``text`` is JSON (RFC 8259). orjson is stricter (1e400, lone surrogate escapes);
    ``json`` accepts NaN and Infinity unless told not to, and big integers up to its digit limit."""
    try:
        json.loads(text.decode(), parse_constant=_refuse, parse_int=str, parse_float=str)
    except ValueError:
        return False
    return True


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


# ---------------------------------------------------------------- comparing values


def duration(text: str) -> timedelta:
    """An ISO 8601 duration without years or months ('P1DT2H3M4.5S', parts signed)."""
    found = re.fullmatch(r"P(?:(-?\d+)D)?(?:T(?:(-?\d+)H)?(?:(-?\d+)M)?(?:(-?[\d.]+)S)?)?", text)
    assert found, text
    days, hours, minutes, seconds = (float(part or 0) for part in found.groups())
    return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)


def mysql_time(text: str) -> timedelta:
    sign = -1 if text.startswith("-") else 1
    hours, minutes, seconds = text.lstrip("-").split(":")
    return sign * timedelta(hours=int(hours), minutes=int(minutes), seconds=float(seconds))


def same(db_value: Any, exported: Any) -> bool:
    """Whether an exported JSON value carries exactly what the driver read from the database."""
    if db_value is None:
        return exported is None
    if isinstance(db_value, bool):
        return exported is db_value
    if isinstance(db_value, (int, str)):
        return type(exported) is type(db_value) and exported == db_value
    if isinstance(db_value, float):
        return isinstance(exported, float) and exported == db_value
    if isinstance(db_value, Decimal):  # exact digits, as a string
        return exported == format(db_value, "f")
    if isinstance(db_value, datetime):
        if db_value.tzinfo is not None:
            return exported.endswith("Z") and datetime.fromisoformat(exported) == db_value
        return "T" in exported and datetime.fromisoformat(exported) == db_value
    if isinstance(db_value, date):
        return date.fromisoformat(exported) == db_value
    if isinstance(db_value, time_of_day):
        return time_of_day.fromisoformat(exported) == db_value
    if isinstance(db_value, timedelta):
        return duration(exported) == db_value
    if isinstance(db_value, (bytes, memoryview)):
        return base64.b64decode(exported) == bytes(db_value)
    if isinstance(db_value, UUID):
        return exported == str(db_value)
    if isinstance(db_value, (dict, list)) and not isinstance(exported, list):
        return exported == db_value  # json / jsonb
    if isinstance(db_value, list):
        return len(db_value) == len(exported) and all(map(same, db_value, exported))
    raise AssertionError(f"no comparison for {type(db_value).__name__}")


def assert_same_row(db_row: dict[str, Any], exported: dict[str, Any], **special: Callable) -> None:
    assert list(exported) == list(db_row)  # keys: column names in column order
    for column, db_value in db_row.items():
        check = special.get(column, same)
        assert check(db_value, exported[column]), (column, db_value, exported[column])


# ---------------------------------------------------------------- PostgreSQL type fidelity

PG_EVERY_TYPE = """
CREATE TYPE {s}.mood AS ENUM ('happy', 'sad');
CREATE TABLE {s}.every_type (
    id integer PRIMARY KEY, i2 smallint, i8 bigint, n numeric(12,4), n_free numeric,
    f4 real, f8 double precision, b boolean, t text, vc varchar(20), c char(5), by bytea,
    u uuid, j json, jb jsonb, d date, ts timestamp, tz timestamptz, tm time, ttz timetz,
    iv interval, ia integer[], ta text[], ja jsonb[], tza timestamptz[], fa float8[],
    m {s}.mood, ma {s}.mood[], ip inet, rng int4range
)
"""


def test_postgres_every_type_matches_what_the_database_returns(pg: PG) -> None:
    pg.run(PG_EVERY_TYPE)
    pg.run(
        "INSERT INTO {s}.every_type VALUES (1, -32768, 9223372036854775807, 12345678.1234,"
        " 0.000000000000000000000000000001, 1.1, 0.1, true, %s, 'varchar ✓', 'ab', %s,"
        ' \'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11\', \'{"k": [1, "x", null]}\', \'{"z": {"y": false}}\','
        " '2024-02-29', '2024-01-02 03:04:05.123456', '2024-01-02 03:04:05.5+02', '23:59:59.999999',"
        " '03:04:05+05:30', '1 day 02:03:04.5', '{1,NULL,3}', '{\"a b\",\"\",\"{x}\"}',"
        " ARRAY['{\"a\": 1}'::jsonb, NULL], '{\"2024-01-02 03:04:05+00\"}', '{1.5,-2}', 'sad',"
        " '{happy,sad}', '192.168.0.1/24', '[1,5)')",
        ('Ünïcödé 🎉 "quoted" \\ \n tab\t', b"\x00\xff\x10\n"),
    )
    pg.run("INSERT INTO {s}.every_type (id) VALUES (2)")
    with pg.connect() as conn:
        conn.execute("SET TimeZone = 'Asia/Kolkata'")  # the export must not depend on it
        cursor = conn.execute(f"SELECT * FROM {pg.sql('every_type')} ORDER BY id")
        columns = [column.name for column in cursor.description]
        db_rows = [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]

    with open_source(pg.url) as source:
        lines = export(source, pg.name("every_type"))
    exported = sorted((orjson.loads(line) for line in lines), key=lambda row: row["id"])

    assert_same_row(
        db_rows[0], exported[0],
        # psycopg reads these as Python objects its own way; compare with PostgreSQL's text.
        m=lambda _db, out: out == "sad",
        ma=lambda _db, out: out == ["happy", "sad"],
        ip=lambda _db, out: out == "192.168.0.1/24",
        rng=lambda _db, out: out == "[1,5)",
        ttz=lambda _db, out: out == "03:04:05+05:30",
    )  # fmt: skip
    assert exported[0]["f4"] == 1.1 and exported[0]["f8"] == 0.1  # shortest exact forms
    assert exported[0]["tz"] == "2024-01-02T01:04:05.5Z"
    assert exported[0]["iv"] == "P1DT2H3M4.5S"
    assert exported[1] == {column: (2 if column == "id" else None) for column in columns}
    assert all(b"\n" not in line for line in lines)


def test_postgres_edge_values_are_lossless(pg: PG) -> None:
    pg.run(
        "CREATE TABLE {s}.edges (id int PRIMARY KEY, n numeric, f4 real, f8 float8, d date,"
        " ts timestamp, tz timestamptz, tm time, iv interval, j json, jb jsonb, ia int[],"
        " fa float8[], tza timestamptz[], by bytea, c char(4), i8 bigint)"
    )
    pg.run(
        "INSERT INTO {s}.edges VALUES"
        " (1, 'NaN', '-Infinity', 'NaN', 'infinity', '-infinity', 'infinity', '24:00:00',"
        "  '-1 year -2 months +3 days -04:05:06.5',"
        '  \'{"b": 1,\n  "a": [1.00000000000000000001, 123456789012345678901234567890]}\','
        "  '{\"b\": 1, \"a\": [1.00000000000000000001]}', '{{1,2},{3,NULL}}',"
        "  '{NaN,Infinity,-Infinity,1e308}', '{\"2024-01-02 03:04:05+00\",infinity}', '', 'x',"
        "  -9223372036854775808),"
        " (2, '123456789012345678901234567890.000000000000000000001', 'Infinity', '-0', "
        "  '0044-03-15 BC', '0044-03-15 12:00:00 BC', '0001-01-01 00:00:00+00 BC', '00:00:00',"
        "  '0', '[]', '{}', '{}', '{}', '{}', '\\x00', NULL, 0)"
    )
    with open_source(pg.url) as source:
        lines = export(source, pg.name("edges"))
    by_id = {orjson.loads(line)["id"]: line for line in lines}
    first, second = orjson.loads(by_id[1]), orjson.loads(by_id[2])
    assert first == {
        "id": 1, "n": "NaN", "f4": "-Infinity", "f8": "NaN", "d": "infinity", "ts": "-infinity",
        "tz": "infinity", "tm": "24:00:00", "iv": "P-1Y-2M3DT-4H-5M-6.5S",
        "j": {"b": 1, "a": [1.0, 1.2345678901234568e29]}, "jb": {"a": [1.0], "b": 1},
        "ia": [[1, 2], [3, None]], "fa": ["NaN", "Infinity", "-Infinity", 1e308],
        "tza": ["2024-01-02T03:04:05Z", "infinity"], "by": "", "c": "x   ",
        "i8": -9223372036854775808,
    }  # fmt: skip
    # JSON is copied, not re-encoded: every digit and (for json) the key order survive.
    assert b'"j":{"b":1,"a":[1.00000000000000000001,123456789012345678901234567890]}' in by_id[1]
    assert b'"jb":{"a":[1.00000000000000000001],"b":1}' in by_id[1]
    assert second == {
        "id": 2, "n": "123456789012345678901234567890.000000000000000000001", "f4": "Infinity",
        "f8": -0.0, "d": "-0043-03-15", "ts": "-0043-03-15T12:00:00", "tz": "0000-01-01T00:00:00Z",
        "tm": "00:00:00", "iv": "PT0S", "j": [], "jb": {}, "ia": [], "fa": [], "tza": [],
        "by": "AA==", "c": None, "i8": 0,
    }  # fmt: skip


PG_DOMAIN_ARRAYS = """
CREATE DOMAIN {s}.posint AS integer CHECK (VALUE > 0);
CREATE DOMAIN {s}.posint2 AS {s}.posint;
CREATE DOMAIN {s}.stamp AS timestamptz;
CREATE DOMAIN {s}.doc AS jsonb;
CREATE DOMAIN {s}.docs AS {s}.doc[];
CREATE DOMAIN {s}.blob AS bytea;
CREATE DOMAIN {s}.money2 AS numeric(10,2);
CREATE DOMAIN {s}.single AS real;
CREATE DOMAIN {s}.pair AS integer[];
CREATE TYPE {s}.feeling AS ENUM ('happy', 'sad');
CREATE DOMAIN {s}.feel AS {s}.feeling;
CREATE DOMAIN {s}.feelings AS {s}.feeling[];
CREATE TYPE {s}.point2 AS (x integer, label text);
CREATE DOMAIN {s}.spot AS {s}.point2;
CREATE DOMAIN {s}.place AS box;
CREATE TABLE {s}.domain_arrays (
    id integer PRIMARY KEY, i {s}.posint[], i2 {s}.posint2[], tz {s}.stamp[], j {s}.doc[],
    jj {s}.docs, jjj {s}.docs[], b {s}.blob[], n {s}.money2[], f {s}.single[], p {s}.pair,
    pp {s}.pair[], e {s}.feel[], ee {s}.feelings, eee {s}.feelings[], c {s}.spot[],
    bx {s}.place[], f4 real[], f8 float8[], nn numeric[]
);
INSERT INTO {s}.domain_arrays VALUES (
    1, '{1,2147483647}', '{{3},{4}}', '{"2024-01-02 03:04:05+02",infinity}',
    ARRAY['{"b": 1, "a": [1.000000000000000000001]}'::{s}.doc, NULL], '{"[1, 2]","{}"}',
    '{"{1,true}"}', ARRAY['\\x00ff'::{s}.blob, ''], '{1.5,NaN,-0.10}',
    '{16777216,3.1415927,1e-45,NaN,-0}', '{1,NULL}', '{"{1,2}","{3,4}"}', '{sad}',
    '{happy,sad}', '{"{happy}"}', ARRAY[ROW(1, 'a "b"')::{s}.spot],
    ARRAY['((1,1),(0,0))'::{s}.place, '((2,2),(1,1))'], '{16777216,3.1415927,1e-45,-Infinity}',
    '{0.30000000000000004,5e-324,1.7976931348623157e308,-0}', '{1e-30,12.500,NaN}'
);
INSERT INTO {s}.domain_arrays (id) VALUES (2);
"""


def test_postgres_arrays_of_domains_load_as_their_base_type(pg: PG) -> None:
    pg.run(PG_DOMAIN_ARRAYS)
    with open_source(pg.url) as source:
        lines = export(source, pg.name("domain_arrays"))
    by_id = {orjson.loads(line)["id"]: line for line in lines}
    # What PostgreSQL's text of each element says, typed as its base type is typed.
    assert orjson.loads(by_id[1]) == {
        "id": 1, "i": [1, 2147483647], "i2": [[3], [4]],
        "tz": ["2024-01-02T01:04:05Z", "infinity"],
        "j": [{"a": [1.0], "b": 1}, None], "jj": [[1, 2], {}], "jjj": [[1, True]],
        "b": ["AP8=", ""], "n": ["1.50", "NaN", "-0.10"],
        "f": [16777216.0, 3.1415927, 1e-45, "NaN", -0.0], "p": [1, None], "pp": [[1, 2], [3, 4]],
        "e": ["sad"], "ee": ["happy", "sad"], "eee": [["happy"]], "c": ['(1,"a ""b""")'],
        "bx": ["(1,1),(0,0)", "(2,2),(1,1)"], "f4": [16777216.0, 3.1415927, 1e-45, "-Infinity"],
        "f8": [0.30000000000000004, 5e-324, 1.7976931348623157e308, -0.0],
        "nn": ["0.000000000000000000000000000001", "12.500", "NaN"],
    }  # fmt: skip
    # JSON elements are copied, digits and all, whatever domain they come through.
    assert b'"j":[{"a":[1.000000000000000000001],"b":1},null]' in by_id[1]
    assert orjson.loads(by_id[2]) == {
        column: (2 if column == "id" else None) for column in orjson.loads(by_id[1])
    }


def export_both_paths(pg: PG, table: str) -> list[bytes]:
    """The table's JSON lines, the same bytes whether the server builds them or Python does."""
    exported = []
    for server_json in (True, False):
        with open_source(pg.url) as source:
            source.server_json = server_json  # type: ignore[attr-defined]
            exported.append(export(source, pg.name(table)))
    assert exported[0] == exported[1]
    return exported[0]


PG_NOT_ARRAYS = """
CREATE DOMAIN {s}.keys AS int2vector;
CREATE DOMAIN {s}.spot2 AS point;
CREATE TABLE {s}.not_arrays (
    id integer PRIMARY KEY, i2v int2vector, oidv oidvector, k {s}.keys, nm name, pt point,
    sp {s}.spot2, ls lseg, bx box, ln line, i2va int2vector[], oidva oidvector[], ka {s}.keys[],
    nma name[], pta point[], spa {s}.spot2[], lsa lseg[], bxa box[], lna line[]
);
INSERT INTO {s}.not_arrays VALUES (
    1, '1 2 3', '4 5', '', 'n', '(1,2)', '(3,4)', '[(1,2),(3,4)]', '((1,1),(0,0))', '{1,2,3}',
    '{"1 2",3}', '{"4 5"}', '{"6 7"}', '{a,"b c"}', '{"(1,2)"}', '{"(3,4)"}', '{"[(1,2),(3,4)]"}',
    '{(1,1),(0,0);(2,2),(1,1)}', '{"{1,2,3}"}'
);
INSERT INTO {s}.not_arrays (id) VALUES (2);
"""


def test_postgres_domains_over_types_with_a_length_keep_every_character(pg: PG) -> None:
    """A domain column is cast to its base type in the server's row JSON; the type's name without
    a length was char(1) for char(n) and bit(1) for bit(n): 'abcde' was exported as 'a'."""
    pg.run(
        "CREATE DOMAIN {s}.code AS char(5); CREATE DOMAIN {s}.flags AS bit(5);"
        " CREATE DOMAIN {s}.price AS numeric(6,2); CREATE DOMAIN {s}.second AS timestamptz(0);"
        " CREATE DOMAIN {s}.short AS varchar(3); CREATE DOMAIN {s}.code2 AS {s}.code;"
        " CREATE TABLE {s}.lengths (id int PRIMARY KEY, c {s}.code, b {s}.flags, p {s}.price,"
        "  s {s}.second, v {s}.short, cc {s}.code2);"
        " INSERT INTO {s}.lengths VALUES (1, 'ab', B'10101', 1234.5, '2024-01-02 03:04:05+00', 'xyz',"
        "  'abcde')"
    )
    expected = {
        "id": 1, "c": "ab   ", "b": "10101", "p": "1234.50", "s": "2024-01-02T03:04:05Z", "v": "xyz",
        "cc": "abcde",
    }  # fmt: skip
    with open_source(pg.url) as source:
        assert [orjson.loads(line) for line in export(source, pg.name("lengths"))] == [expected]


def test_postgres_inheritance_children_holding_null_where_the_parent_says_not_null(pg: PG) -> None:
    """The parent's NOT NULL dropped the null test from the server's row JSON, but the parent's
    rows include its children's: a child's NULL made that row's JSON NULL, and the row was lost
    (its count kept: the manifest said 3 records of a file holding 1)."""
    pg.run(
        "CREATE TABLE {s}.parent (id int NOT NULL, a text, b int[]); CREATE TABLE {s}.child ()"
        " INHERITS ({s}.parent); CREATE TABLE {s}.child2 (a text NOT NULL) INHERITS ({s}.parent);"
        " INSERT INTO {s}.parent VALUES (1, 'x'); INSERT INTO {s}.child VALUES (2, NULL);"
        " ALTER TABLE ONLY {s}.parent ALTER COLUMN a SET NOT NULL;"
        " ALTER TABLE {s}.child2 ALTER COLUMN a DROP NOT NULL; INSERT INTO {s}.child2 VALUES (3, NULL)"
    )
    expected = [{"id": 1, "a": "x"}, {"id": 2, "a": None}, {"id": 3, "a": None}]
    for with_arrays in (True, False):  # row by row, then the server's JSON
        with open_source(pg.url) as source, source.snapshot():
            rows = sorted((orjson.loads(line) for line in export(source, pg.name("parent"))), key=str)
            assert source.count(pg.name("parent"), None) == 3
        assert rows == [{**row, "b": None} if with_arrays else row for row in expected]
        pg.run("ALTER TABLE {s}.parent DROP COLUMN IF EXISTS b")


def test_postgres_types_with_an_element_type_that_are_not_arrays(pg: PG) -> None:
    """int2vector and oidvector (array category, their own text), point, box, name… (an element
    type, a fixed length): scalars, their text; their arrays, arrays of that text."""
    pg.run(PG_NOT_ARRAYS)
    lines = export_both_paths(pg, "not_arrays")
    assert [orjson.loads(line) for line in lines] == [
        {
            "id": 1, "i2v": "1 2 3", "oidv": "4 5", "k": "", "nm": "n", "pt": "(1,2)", "sp": "(3,4)",
            "ls": "[(1,2),(3,4)]", "bx": "(1,1),(0,0)", "ln": "{1,2,3}", "i2va": ["1 2", "3"],
            "oidva": ["4 5"], "ka": ["6 7"], "nma": ["a", "b c"], "pta": ["(1,2)"], "spa": ["(3,4)"],
            "lsa": ["[(1,2),(3,4)]"], "bxa": ["(1,1),(0,0)", "(2,2),(1,1)"], "lna": ["{1,2,3}"],
        },
        {"id": 2, **dict.fromkeys(["i2v", "oidv", "k", "nm", "pt", "sp", "ls", "bx", "ln", "i2va",
                                   "oidva", "ka", "nma", "pta", "spa", "lsa", "bxa", "lna"])},
    ]  # fmt: skip


PG_BOUNDS = """
CREATE DOMAIN {s}.ints AS integer[];
CREATE DOMAIN {s}.docs2 AS jsonb[];
CREATE TABLE {s}.bounds (
    id integer PRIMARY KEY, ia integer[], d {s}.ints, da {s}.ints[], ta text[], tza timestamptz[],
    jb jsonb[], dj {s}.docs2, dja {s}.docs2[]
);
INSERT INTO {s}.bounds VALUES
    (1, '{1,2}', '{1,2}', '{"{1,2}"}', '{a}', '{"2024-01-02 03:04:05+02"}', '{"[1]"}', '{"[1]"}',
     '{"{\\"[1]\\"}"}'),
    (2, '[0:1]={1,2}', '[0:1]={1,2}', '{"[0:1]={1,2}","{3}"}', '[0:1]={"a\\"b",NULL}',
     '[0:0]={"2024-01-02 03:04:05+02"}', '[2:2]={"{\\"a\\": 1}"}', '[0:0]={"[1]"}',
     '{"[0:0]={\\"[1]\\"}"}'),
    (3, '[-5:-4][2:3]={{1,2},{3,4}}', '[1:1][0:0]={{7}}', '[0:0]={"{1}"}', '{}', '{}', '{}', '{}',
     '{}');
"""


def test_postgres_arrays_whose_lower_bounds_are_not_all_1_are_their_text(pg: PG) -> None:
    """'[0:1]={1,2}' and '{1,2}' are two values: the first keeps its bounds as PostgreSQL's text
    (in the export's session: UTC), a domain over an array and an array's element alike."""
    pg.run(PG_BOUNDS)
    lines = export_both_paths(pg, "bounds")
    assert [orjson.loads(line) for line in lines] == [
        {
            "id": 1, "ia": [1, 2], "d": [1, 2], "da": [[1, 2]], "ta": ["a"], "tza": ["2024-01-02T01:04:05Z"],
            "jb": [[1]], "dj": [[1]], "dja": [[[1]]],
        },
        {
            "id": 2, "ia": "[0:1]={1,2}", "d": "[0:1]={1,2}", "da": ["[0:1]={1,2}", [3]],
            "ta": '[0:1]={"a\\"b",NULL}', "tza": '[0:0]={"2024-01-02 01:04:05+00"}',
            "jb": '[2:2]={"{\\"a\\": 1}"}', "dj": "[0:0]={[1]}", "dja": ["[0:0]={[1]}"],
        },
        {
            "id": 3, "ia": "[-5:-4][2:3]={{1,2},{3,4}}", "d": "[1:1][0:0]={{7}}", "da": '[0:0]={"{1}"}',
            "ta": [], "tza": [], "jb": [], "dj": [], "dja": [],
        },
    ]  # fmt: skip
    # What a check comparing with PostgreSQL's own text sees (the session's time zone aside).
    texts = pg.rows("SELECT ia::text, d::text FROM {s}.bounds WHERE id > 1 ORDER BY id")
    assert [(row["ia"], row["d"]) for row in map(orjson.loads, lines[1:])] == texts


PG_SQL_ASCII = b"""
CREATE TYPE mood AS ENUM ('caf\xe9');
CREATE TABLE t (
    id int PRIMARY KEY, v text, vc varchar(10), c char(5), j json, jb jsonb, ta text[], m mood,
    "k\xc3\xa9" text, bounded text[]
);
INSERT INTO t VALUES
    (1, 'caf\xe9', 'caf\xe9', 'x\xff', '{"caf\xe9": "\xe9t\xc3\xa9",
 "n": 1.50}', '{"caf\xe9": 1}',
     '{"a\xe9",b}', 'caf\xe9', '\xc3\xa9t\xc3\xa9', '[0:0]={"\xe9"}'),
    (2, '\xc3\xa9t\xc3\xa9 \xc3', NULL, NULL, NULL, NULL, NULL, NULL, 'x', '{}');
CREATE DOMAIN "st\xe9" AS timestamptz;
CREATE TABLE "n\xe9" ("c\xe8" int, "d\xe9" "st\xe9");
INSERT INTO "n\xe9" VALUES (7, '2024-01-02 03:04:05+00');
CREATE VIEW "v\xe9" AS SELECT * FROM t;
"""


def test_postgres_sql_ascii_bytes_that_are_not_utf8_are_u_fffd(pg: PG) -> None:
    """A SQL_ASCII database stores text unchecked: its bytes that are not UTF-8 (values, names,
    JSON, enum labels, array elements) export as U+FFFD, as SQLite's do, on both paths."""
    database = f"{NAME}_ascii"
    pg.run(f"CREATE DATABASE \"{database}\" ENCODING 'SQL_ASCII' TEMPLATE template0 LOCALE 'C'")
    try:
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{database}", autocommit=True) as conn:
            conn.execute(PG_SQL_ASCII)  # bytes: the session sends them as they are
        url = f"postgresql://postgres@127.0.0.1:5432/{database}"
        exported = {}
        for server_json in (True, False):
            with open_source(url) as source:
                source.server_json = server_json  # type: ignore[attr-defined]
                assert source.names() == ["n\ufffd", "t", "v\ufffd"]
                exported[server_json] = {name: export(source, name) for name in source.names()}
                assert source.count("t", {"k\u00e9": "\u00e9t\u00e9", "v": "caf\ufffd"}) == 0
                assert (
                    source.count("t", {"k\u00e9": "\u00e9t\u00e9"}) == 1
                )  # a filter's names and values: UTF-8
                described = source.describe(["n\ufffd", "t"])
        assert exported[True] == exported[False]
        rows = [orjson.loads(line) for line in exported[True]["t"]]
        assert rows == [
            {
                "id": 1, "v": "caf\ufffd", "vc": "caf\ufffd", "c": "x\ufffd   ",
                "j": {"caf\ufffd": "\ufffdt\u00e9", "n": 1.5}, "jb": {"caf\ufffd": 1},
                "ta": ["a\ufffd", "b"], "m": "caf\ufffd", "k\u00e9": "\u00e9t\u00e9",
                "bounded": "[0:0]={\ufffd}",
            },
            {
                "id": 2, "v": "\u00e9t\u00e9 \ufffd", "vc": None, "c": None, "j": None, "jb": None,
                "ta": None, "m": None, "k\u00e9": "x", "bounded": [],
            },
        ]  # fmt: skip
        assert b'"n":1.50}' in exported[True]["t"][0]  # JSON still copied, digits and all
        assert exported[True]["v\ufffd"] == exported[True]["t"]
        assert [orjson.loads(line) for line in exported[True]["n\ufffd"]] == [
            {"c\ufffd": 7, "d\ufffd": "2024-01-02T03:04:05Z"}
        ]
        assert {name: column["type"] for name, column in described["n\ufffd"]["columns"].items()} == {
            "c\ufffd": "integer",
            "d\ufffd": '"st\ufffd"',
        }
        assert list(described["t"]["columns"])[-2:] == ["k\u00e9", "bounded"]
    finally:
        pg.run(f'DROP DATABASE "{database}" WITH (FORCE)')


# ---------------------------------------------------------------- MySQL type fidelity

MY_EVERY_TYPE = """
CREATE TABLE every_type (
    id INT PRIMARY KEY, ti TINYINT, bo BOOLEAN, si SMALLINT, mi MEDIUMINT, i INT, bi BIGINT,
    ubi BIGINT UNSIGNED, de DECIMAL(30,10), f FLOAT, dbl DOUBLE, bt BIT(10), bt1 BIT(1), y YEAR,
    d DATE, dt DATETIME(6), ts TIMESTAMP(6) NULL DEFAULT NULL, tm TIME(3), c CHAR(5),
    vc VARCHAR(50), tx TEXT, e ENUM('a','b','c'), st SET('x','y','z'), bn BINARY(4),
    vb VARBINARY(10), bl BLOB, j JSON, g POINT
) ENGINE=InnoDB
"""


def test_mysql_every_type_matches_what_the_database_returns(my: My) -> None:
    my.run(MY_EVERY_TYPE)
    my.run(
        "INSERT INTO every_type VALUES (1, -128, 1, -32768, 8388607, 2147483647,"
        " -9223372036854775808, 18446744073709551615, '-12345678901234567890.0123456789', 1.5,"
        " 0.1, b'1000000001', b'1', 2024, '2024-02-29', '2024-01-02 03:04:05.123456',"
        " '2024-01-02 03:04:05.5', '-838:59:59.000', 'ab', 'varchar ✓', %s, 'b', 'x,z', 'ab',"
        " x'00ff', x'0010ff', '{\"k\": [1, \"x\", null]}', POINT(1, 2))",
        ('Ünïcödé 🎉 "quoted" \\ \n tab\t',),
    )
    my.run("INSERT INTO every_type (id) VALUES (2)")
    with my.connect() as conn, conn.cursor(pymysql.cursors.DictCursor) as cursor:
        cursor.execute("SELECT * FROM every_type ORDER BY id")
        db_rows = list(cursor.fetchall())

    with open_source(my.url) as source:
        lines = export(source, "every_type")
    exported = sorted((orjson.loads(line) for line in lines), key=lambda row: row["id"])

    assert_same_row(
        db_rows[0], exported[0],
        bt=lambda db, out: out == int.from_bytes(db, "big") == 513,
        bt1=lambda db, out: out == 1,
        ts=lambda db, out: out == db.isoformat() + "Z",  # TIMESTAMP is an instant: UTC
        tm=lambda db, out: out == "-838:59:59.000" and mysql_time(out) == db,
        j=lambda db, out: out == orjson.loads(db),
    )  # fmt: skip
    assert exported[0]["bn"] == base64.b64encode(b"ab\x00\x00").decode()  # BINARY keeps padding
    assert exported[0]["ubi"] == 2**64 - 1 and exported[0]["bo"] == 1
    assert exported[1] == {column: (2 if column == "id" else None) for column in db_rows[1]}


def test_mysql_zero_dates_booleans_and_json_text(my: My) -> None:
    my.run(
        "CREATE TABLE edges (id INT PRIMARY KEY, d DATE, dt DATETIME, ts TIMESTAMP NULL,"
        " bo BOOLEAN, j JSON, tm TIME)"
    )
    with my.connect() as conn, conn.cursor() as cursor:
        cursor.execute("SET SESSION sql_mode = ''")  # lets zero dates in, as old applications do
        cursor.execute(
            "INSERT INTO edges VALUES"
            " (1, '0000-00-00', '0000-00-00 00:00:00', '0000-00-00 00:00:00', 2,"
            '  \'{"b": 1,\n  "a": [1.00000000000000000001, 123456789012345678901234567890]}\','
            "  '838:59:59'),"
            " (2, '2024-00-15', '2024-05-00 10:00:00', NULL, 0, '[]', '-00:00:01')"
        )
    with open_source(my.url) as source:
        lines = export(source, "edges")
    by_id = {orjson.loads(line)["id"]: line for line in lines}
    assert orjson.loads(by_id[1]) == {
        "id": 1, "d": "0000-00-00", "dt": "0000-00-00 00:00:00", "ts": "0000-00-00 00:00:00",
        "bo": 2, "j": {"b": 1, "a": [1.0, 1.2345678901234568e29]}, "tm": "838:59:59",
    }  # fmt: skip
    assert b'"j":{"b":1,"a":[1.00000000000000000001,123456789012345678901234567890]}' in by_id[1]
    assert orjson.loads(by_id[2]) == {
        "id": 2, "d": "2024-00-15", "dt": "2024-05-00 10:00:00", "ts": None, "bo": 0, "j": [],
        "tm": "-00:00:01",
    }  # fmt: skip


def float32(value: float) -> float:
    return struct.unpack("<f", struct.pack("<f", value))[0]


FLT_MIN, FLT_MAX = 1.1754943508222875e-38, 3.4028234663852886e38


def test_mysql_float_gives_the_digits_postgresql_gives_a_real(pg: PG, my: My) -> None:
    """A FLOAT is a float32: the shortest decimal that reads back as it, as PostgreSQL's real."""
    edges = [16777216, 1234567, 3.1415927, FLT_MIN, FLT_MAX, 1e-45, 0.1, -0.0, 123456.7]
    generator = random.Random(12)
    values = [float32(v) for v in edges] + [sign * 2.0**e for e in range(-149, 128) for sign in (1, -1)]
    while len(values) < 3000:  # any finite float32, denormals included
        bits = generator.getrandbits(32)
        if bits & 0x7F800000 != 0x7F800000:
            values.append(struct.unpack("<f", struct.pack("<I", bits))[0])
    my.run("CREATE TABLE floats (id INT PRIMARY KEY, f FLOAT, fu FLOAT UNSIGNED)")
    with my.admin.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO floats VALUES (%s, %s, %s)",
            [(i, repr(v), repr(abs(v))) for i, v in enumerate(values)],
        )
    stored = my.rows("SELECT id, CAST(f AS DOUBLE), CAST(fu AS DOUBLE) FROM floats ORDER BY id")
    assert [row[1] for row in stored] == values  # (MariaDB keeps no -0: it stores 0, equal to -0)
    pg.run("CREATE TABLE {s}.reals (id integer PRIMARY KEY, f real, fu real)")
    with pg.admin.cursor() as cursor:
        cursor.executemany(f"INSERT INTO {pg.sql('reals')} VALUES (%s, %s::float8, %s::float8)", stored)

    def numbers(lines: list[bytes]) -> dict[int, tuple[bytes, bytes]]:
        found = (re.fullmatch(rb'\{"id":(\d+),"f":([^,]+),"fu":([^}]+)\}', line) for line in lines)
        return {int(match[1]): (match[2], match[3]) for match in found if match}

    with open_source(my.url) as source:
        from_mysql = numbers(export(source, "floats", batch_size=500))
    with open_source(pg.url) as source:
        from_postgres = numbers(export(source, pg.name("reals"), batch_size=500))
    assert len(from_mysql) == len(from_postgres) == len(values)
    assert from_mysql == from_postgres
    assert [from_mysql[i][0] for i in range(9)] == [
        b"16777216.0", b"1234567.0", b"3.1415927", b"1.1754944e-38", b"3.4028235e+38", b"1e-45",
        b"0.1", b"0.0", b"123456.7",
    ]  # fmt: skip
    assert all(float32(float(from_mysql[i][0])) == value for i, value in enumerate(values))


def test_mysql_display_widths_and_two_digit_years_do_not_change_values(my: My) -> None:
    my.run(
        "CREATE TABLE widths (id INT PRIMARY KEY, fmd FLOAT(7,2), dmd DOUBLE, d DOUBLE,"
        " f53 FLOAT(53), y2 YEAR(2), hidden INT INVISIBLE)"
    )
    doubles = [0.1 + 0.2, 5e-324, 1.7976931348623157e308, float(2**53 + 1), -1.5e-310, 1 / 3]
    with my.admin.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO widths (id, fmd, dmd, d, f53, y2, hidden) VALUES (%s, %s, %s, %s, %s, %s, 7)",
            [(1, 12345.678, 0.123456789, repr(doubles[0]), repr(doubles[0]), 2024)]
            + [(i, None, None, repr(v), repr(v), None) for i, v in enumerate(doubles[1:], 2)],
        )
    # Values keep their digits when the column's display width changes afterwards.
    my.run("ALTER TABLE widths MODIFY dmd DOUBLE(10,2)")
    assert my.rows("SELECT dmd, CAST(dmd AS DOUBLE), y2 FROM widths WHERE id = 1") == [
        (0.12, 0.123456789, 24)
    ]  # the text protocol's view
    with open_source(my.url) as source:
        rows = [orjson.loads(line) for line in export(source, "widths")]
    rows.sort(key=lambda row: row["id"])
    assert rows[0] == {
        "id": 1,
        "fmd": 12345.68,
        "dmd": 0.123456789,
        "d": doubles[0],
        "f53": doubles[0],
        "y2": 2024,
        "hidden": 7,
    }
    assert [row["d"] for row in rows] == [row["f53"] for row in rows] == doubles


def export_both_ways(source: Source, name: str) -> list[bytes]:
    """The rows as the server builds them and as the row-by-row path does: the same bytes."""
    lines = export(source, name)
    source.server_json = False  # type: ignore[attr-defined]
    try:
        assert export(source, name) == lines
    finally:
        source.server_json = True  # type: ignore[attr-defined]
    return lines


def test_mysql_zerofill_pads_no_number(my: My) -> None:
    """ZEROFILL is a display attribute, as a display width: the server's text ``00042`` is no JSON,
    and a DECIMAL's ``"0000001.500"`` holds digits its value does not have."""
    my.run(
        "CREATE TABLE zf (id INT(4) ZEROFILL PRIMARY KEY, ti TINYINT ZEROFILL, si SMALLINT ZEROFILL,"
        " mi MEDIUMINT ZEROFILL, i INT(5) ZEROFILL, bi BIGINT UNSIGNED ZEROFILL, f FLOAT ZEROFILL,"
        " fmd FLOAT(7,2) ZEROFILL, d DOUBLE ZEROFILL, dmd DOUBLE(10,2) ZEROFILL,"
        " de DECIMAL(10,3) ZEROFILL, dw DECIMAL(65,30) ZEROFILL, df DECIMAL(5,5) ZEROFILL)"
    )
    my.run(
        "INSERT INTO zf VALUES (1, 1, 2, 3, 42, 7, 1.25, 3.5, 1.5, 2.25, 1.5, 1.5, 0.5),"
        " (2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),"
        " (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),"
        " (4, 255, 65535, 16777215, 4294967295, 18446744073709551615, 3.4e38, 99999.99, 1e300,"
        "  12345678.9, 9999999.999, 12345678901234567890123456789012345.123456789012345678901234567891,"
        "  0.99999)"
    )
    my.run("CREATE TABLE zf_heap SELECT * FROM zf")  # no primary key
    expected = [
        b'{"id":1,"ti":1,"si":2,"mi":3,"i":42,"bi":7,"f":1.25,"fmd":3.5,"d":1.5,"dmd":2.25,"de":"1.500",'
        b'"dw":"1.500000000000000000000000000000","df":"0.50000"}',
        b'{"id":2,"ti":0,"si":0,"mi":0,"i":0,"bi":0,"f":0.0,"fmd":0.0,"d":0.0,"dmd":0.0,"de":"0.000",'
        b'"dw":"0.000000000000000000000000000000","df":"0.00000"}',
        b'{"id":3,"ti":null,"si":null,"mi":null,"i":null,"bi":null,"f":null,"fmd":null,"d":null,"dmd":null,'
        b'"de":null,"dw":null,"df":null}',
        b'{"id":4,"ti":255,"si":65535,"mi":16777215,"i":4294967295,"bi":18446744073709551615,'
        b'"f":3.4e+38,"fmd":99999.99,"d":1e+300,"dmd":12345678.9,"de":"9999999.999",'
        b'"dw":"12345678901234567890123456789012345.123456789012345678901234567891","df":"0.99999"}',
    ]
    with open_source(my.url) as source:
        assert sorted(export_both_ways(source, "zf")) == expected
        assert sorted(export_both_ways(source, "zf_heap")) == expected


def test_mysql_invisible_columns_are_exported_as_describe_lists_them(my: My) -> None:
    """SELECT * leaves INVISIBLE columns out; an export has every column describe.yaml lists."""
    my.run("CREATE TABLE inv (id INT PRIMARY KEY, a INT, h INT INVISIBLE, t TEXT INVISIBLE, b INT)")
    my.run("INSERT INTO inv (id, a, h, t, b) VALUES (1, 2, 3, 'x', 4), (2, 5, NULL, NULL, 6)")
    my.run("CREATE TABLE inv_heap (a INT, h INT INVISIBLE, d DOUBLE(10,2) INVISIBLE)")  # no key
    my.run("INSERT INTO inv_heap (a, h, d) VALUES (1, 2, 0.125)")
    my.run(
        "CREATE TABLE inv_versioned (id INT PRIMARY KEY, a INT,"
        " rs TIMESTAMP(6) GENERATED ALWAYS AS ROW START INVISIBLE,"
        " re TIMESTAMP(6) GENERATED ALWAYS AS ROW END INVISIBLE,"
        " PERIOD FOR SYSTEM_TIME (rs, re)) WITH SYSTEM VERSIONING"
    )
    my.run("INSERT INTO inv_versioned (id, a) VALUES (1, 2)")
    with open_source(my.url) as source:
        described = source.describe(["inv", "inv_heap", "inv_versioned"])
        assert list(described["inv"]["columns"]) == ["id", "a", "h", "t", "b"]
        assert sorted(export_both_ways(source, "inv")) == [
            b'{"id":1,"a":2,"h":3,"t":"x","b":4}',
            b'{"id":2,"a":5,"h":null,"t":null,"b":6}',
        ]
        assert export(source, "inv", {"h": {"$gt": 0}}) == [b'{"id":1,"a":2,"h":3,"t":"x","b":4}']
        assert export_both_ways(source, "inv_heap") == [b'{"a":1,"h":2,"d":0.12}']
        [row] = map(orjson.loads, export_both_ways(source, "inv_versioned"))
        assert list(row) == list(described["inv_versioned"]["columns"]) == ["id", "a", "rs", "re"]
        assert row["re"].startswith("2038-01-19T03:14:07.999999")  # a current row's end: the maximum


# (text in the column, its JSON in the export): MariaDB's json_valid accepts the first ones.
MARIADB_JSON = [
    ("[1.]", b'"[1.]"'),
    ('"\\x"', b'"\\"\\\\x\\""'),
    ("[1e+]", b'"[1e+]"'),
    ('"\\U00e9"', b'"\\"\\\\U00e9\\""'),
    ("[1.5e]", b'"[1.5e]"'),
    ('["\\\'"]', b'"[\\"\\\\\'\\"]"'),
    ("[-]", b'"[-]"'),
    ("[1e400]", b"[1e400]"),  # JSON, though no double holds it
    ('"\\u001F"', b'"\\u001F"'),  # escapes as written, on both paths
    (' {"a" : [1, 2.5],\n "b": "x y"} ', b'{"a":[1,2.5],"b":"x y"}'),
    ("[1" + "0" * 4400 + "]", b"[1" + b"0" * 4400 + b"]"),  # beyond int()'s 4,300 digits
    ("null", b"null"),
    (None, b"null"),
]
# Let in only with check_constraint_checks = 0 (as a bulk load may).
UNCHECKED_JSON = [
    ('"\\ud800"', b'"\\ud800"'),  # a lone surrogate escape is JSON's grammar: kept
    ('"a\tb"', b'"\\"a\\tb\\""'),
    ("not json", b'"not json"'),
]


def _leading_id(line: bytes) -> int:
    return int(line[len(b'{"id":') : line.index(b",")])


@contextlib.contextmanager
def private_mariadb(tmp_path: Path, sql_mode: str) -> Iterator[str]:
    """A MariaDB server of the test's own whose global sql_mode is ``sql_mode``; its URL's base.

    The shared server's global sql_mode is not the test's to change: every other session
    (other test processes) would start with it.
    """
    data, socket_path, port = tmp_path / "mariadb", tmp_path / "mariadb.sock", free_port()
    # Its own temporary directory: a mariadbd starting (its bootstrap too) deletes every "#sql*"
    # file in its tmpdir, left over as it takes them to be; in /tmp those were the shared
    # server's live temporary tables, and another test process's query failed ("Error on
    # delete of '/tmp/#sql-temptable-….MAI'").
    scratch = tmp_path / "mariadb-tmp"
    scratch.mkdir(exist_ok=True)
    subprocess.run(
        ["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--skip-test-db",
         "--auth-root-authentication-method=normal", f"--tmpdir={scratch}"],
        check=True, capture_output=True,
    )  # fmt: skip
    server = subprocess.Popen(
        ["/usr/sbin/mariadbd", "--no-defaults", f"--datadir={data}", f"--socket={socket_path}",
         f"--port={port}", "--bind-address=127.0.0.1", "--user=root", "--skip-log-bin",
         "--innodb-buffer-pool-size=8M", f"--sql-mode={sql_mode}", f"--tmpdir={scratch}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip

    def up() -> bool:
        with contextlib.suppress(pymysql.err.OperationalError):
            pymysql.connect(host="127.0.0.1", port=port, user="root").close()
            return True
        return False

    try:
        wait_for(up, timeout=30, what="the private MariaDB server")
        yield f"mysql://root@127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(data, ignore_errors=True)


@pytest.mark.slow
def test_mysql_values_do_not_depend_on_the_servers_sql_mode(tmp_path: Path) -> None:
    """Under a global NO_BACKSLASH_ESCAPES the row SQL's '\\n' was two characters: a blob's base64
    kept its line breaks (a line of JSON cut in two); under EMPTY_STRING_IS_NULL its '' was NULL
    and every blob of a table without an integer key was exported as null."""
    blob = bytes(range(256))
    text = 'back\\slash "quoted" \t tab'
    expected = {"id": 1, "b": base64.b64encode(blob).decode(), "t": text, "e": ""}
    for sql_mode in ("NO_BACKSLASH_ESCAPES,STRICT_TRANS_TABLES", "EMPTY_STRING_IS_NULL", "ORACLE"):
        with private_mariadb(tmp_path, sql_mode) as base:
            admin = pymysql.connect(host="127.0.0.1", port=int(base.rsplit(":", 1)[1]), user="root")
            with admin.cursor() as cursor:
                cursor.execute("SET SESSION sql_mode = ''")
                cursor.execute("CREATE DATABASE d")
                for table, key in (("keyed", "PRIMARY KEY"), ("unkeyed", "")):
                    cursor.execute(f"CREATE TABLE d.{table} (id int {key}, b blob, t text, e varchar(5))")
                    cursor.execute(f"INSERT INTO d.{table} VALUES (1, %s, %s, '')", (blob, text))
                cursor.execute("CREATE VIEW d.seen AS SELECT * FROM d.keyed")
            admin.close()
            with open_source(f"{base}/d") as source:
                for name in ("keyed", "unkeyed", "seen"):
                    assert [orjson.loads(line) for line in export(source, name)] == [expected], (
                        sql_mode, name)  # fmt: skip


@pytest.mark.slow
def test_mysql_values_whose_json_passes_max_allowed_packet_are_exported(my: My) -> None:
    """TO_BASE64, JSON_QUOTE and CONCAT give NULL (and a warning) for a result over the server's
    max_allowed_packet (16 MiB here): a 13 MB blob (17 MB of base64) was exported as null."""
    limit = my.rows("SELECT @@max_allowed_packet")[0][0]
    blob = b"0123456789abcdef" * (limit // 20)  # 4/5 of the limit: its base64 passes it
    text = "\x01" * (limit // 6 + 1)  # JSON_QUOTE writes six bytes for each: \u0001
    my.run("CREATE TABLE big_keyed (id int PRIMARY KEY, b longblob, t longtext)")
    my.run("CREATE TABLE big_unkeyed (b longblob, t longtext NOT NULL)")
    my.run(  # built by the server: a statement this big would pass the limit itself
        "INSERT INTO big_keyed VALUES (1, REPEAT('0123456789abcdef', %s), 'x'),"
        " (2, 'small', REPEAT(CHAR(1), %s)), (3, NULL, '')",
        (limit // 20, limit // 6 + 1),
    )
    my.run("INSERT INTO big_unkeyed SELECT b, t FROM big_keyed ORDER BY id")
    my.run("CREATE VIEW big_seen AS SELECT * FROM big_keyed")
    expected = [
        {"b": base64.b64encode(blob).decode(), "t": "x"},
        {"b": base64.b64encode(b"small").decode(), "t": text},
        {"b": None, "t": ""},
    ]
    with open_source(my.url) as source:
        for name in ("big_keyed", "big_unkeyed", "big_seen"):
            rows = [orjson.loads(line) for line in export(source, name, batch_size=2)]
            assert [{"b": row["b"], "t": row["t"]} for row in rows] == expected, name


def test_mariadb_json_that_is_no_json_is_exported_as_its_text(my: My) -> None:
    """MariaDB's JSON is LONGTEXT CHECK (json_valid(j)), and json_valid is lenient: a value that
    is not JSON (RFC 8259) becomes a JSON string holding its text, on every read path."""
    values = MARIADB_JSON + UNCHECKED_JSON
    my.run("CREATE TABLE lenient (id INT PRIMARY KEY, j JSON)")
    my.run("CREATE TABLE lenient_heap (id INT, j JSON)")  # no key: one row at a time
    with my.connect() as conn, conn.cursor() as cursor:
        for table in ("lenient", "lenient_heap"):
            for i, (text, _) in enumerate(MARIADB_JSON):
                cursor.execute(f"INSERT INTO {table} VALUES (%s, %s)", (i, text))
        cursor.execute("SELECT COUNT(*) FROM lenient WHERE NOT json_valid(j)")
        assert cursor.fetchone() == (0,)
        with pytest.raises(pymysql.err.OperationalError, match="CONSTRAINT"):
            cursor.execute("INSERT INTO lenient VALUES (99, 'not json')")
        cursor.execute("SET SESSION check_constraint_checks = 0")
        for table in ("lenient", "lenient_heap"):
            for i, (text, _) in enumerate(UNCHECKED_JSON, len(MARIADB_JSON)):
                cursor.execute(f"INSERT INTO {table} VALUES (%s, %s)", (i, text))
    my.run("CREATE VIEW lenient_view AS SELECT id, j FROM lenient")
    expected = [b'{"id":%d,"j":%s}' % (i, out) for i, (_, out) in enumerate(values)]
    with open_source(my.url) as source:
        described = source.describe(["lenient", "lenient_view"])
        assert [described[name]["columns"]["j"]["type"] for name in described] == ["json", "longtext"]
        for table in ("lenient", "lenient_heap"):
            assert sorted(export_both_ways(source, table), key=_leading_id) == expected
        # Through a view the column is LONGTEXT without its CHECK: every value is its text.
        view = sorted(export_both_ways(source, "lenient_view"), key=_leading_id)
    assert [orjson.loads(line)["j"] for line in view] == [text for text, _ in values]


# ---------------------------------------------------------------- describe

PG_SHOP = '''
CREATE TABLE {s}.users (id bigserial PRIMARY KEY, email varchar(200) NOT NULL UNIQUE,
                        name text, age integer, created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE {s}.orders (id integer PRIMARY KEY,
                         user_id bigint NOT NULL REFERENCES {s}.users (id) ON DELETE CASCADE,
                         total numeric(10,2) NOT NULL DEFAULT 0, note text);
CREATE INDEX orders_user ON {s}.orders (user_id);
CREATE TABLE {s}."order items" (order_id integer NOT NULL, line smallint NOT NULL,
                                "sku ""quoted""" text, "rate %" numeric, PRIMARY KEY (order_id, line),
                                FOREIGN KEY (order_id) REFERENCES {s}.orders (id) ON UPDATE CASCADE);
CREATE VIEW {s}.adults AS SELECT id, name FROM {s}.users WHERE age >= 18;
'''

MY_SHOP = [
    """CREATE TABLE users (id BIGINT AUTO_INCREMENT PRIMARY KEY, email VARCHAR(200) NOT NULL UNIQUE,
                           name TEXT, age INT, created_at DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP)
       ENGINE=InnoDB""",
    """CREATE TABLE orders (id INT PRIMARY KEY, user_id BIGINT NOT NULL,
                            total DECIMAL(10,2) NOT NULL DEFAULT 0, note TEXT,
                            INDEX orders_user (user_id),
                            CONSTRAINT orders_user_fk FOREIGN KEY (user_id) REFERENCES users (id)
                              ON DELETE CASCADE) ENGINE=InnoDB""",
    """CREATE TABLE `order items` (order_id INT NOT NULL, line SMALLINT NOT NULL,
                                   `sku "quoted"` TEXT, `rate %` DECIMAL(5,2),
                                   PRIMARY KEY (order_id, line),
                                   CONSTRAINT items_order_fk FOREIGN KEY (order_id)
                                     REFERENCES orders (id) ON UPDATE CASCADE) ENGINE=InnoDB""",
    "CREATE VIEW adults AS SELECT id, name FROM users WHERE age >= 18",
]


def make_shop(db: PG | My) -> None:
    """users, orders, "order items" and the adults view, with rows."""
    if isinstance(db, PG):
        db.run(PG_SHOP)
        db.run("SELECT setval(pg_get_serial_sequence(%s, 'id'), 3)", (db.sql("users"),))
    else:
        for statement in MY_SHOP:
            db.run(statement)
    db.run(
        f"INSERT INTO {db.sql('users')} (id, email, name, age) VALUES"
        " (1, 'ana@example.com', 'Ana', 34), (2, 'bo@example.com', 'Bo', 17),"
        " (3, 'cy@example.com', NULL, 70)"
    )
    db.run(
        f"INSERT INTO {db.sql('orders')} VALUES "
        + ", ".join(f"({i}, {1 + i % 3}, {i}.25, NULL)" for i in range(1, 21))
    )
    db.run(
        f"INSERT INTO {db.sql('order items')} VALUES "
        + ", ".join(f"({o}, {n}, 'SKU-{o}-{n}', {n}.5)" for o in range(1, 6) for n in (1, 2))
    )


@pytest.fixture(scope="module")
def pg_shop(pg: PG) -> PG:
    make_shop(pg)
    return pg


@pytest.fixture(scope="module")
def my_shop(my: My) -> My:
    make_shop(my)
    return my


@pytest.fixture(scope="module", params=["postgresql", "mysql"])
def shop(request: pytest.FixtureRequest) -> PG | My:
    return request.getfixturevalue("pg_shop" if request.param == "postgresql" else "my_shop")


def test_postgres_describe(pg_shop: PG) -> None:
    pg = pg_shop
    names = [pg.name(t) for t in ("users", "orders", "order items", "adults")]
    with open_source(pg.url) as source:
        described = source.describe(names)
    s = pg.schema
    assert described[pg.name("users")] == {
        "type": "table",
        "columns": {
            "id": {"type": "bigint", "required": True,
                   "default": f"nextval('{s}.users_id_seq'::regclass)", "primary_key": True},
            "email": {"type": "character varying(200)", "required": True, "default": None,
                      "primary_key": False},
            "name": {"type": "text", "required": False, "default": None, "primary_key": False},
            "age": {"type": "integer", "required": False, "default": None, "primary_key": False},
            "created_at": {"type": "timestamp with time zone", "required": True,
                           "default": "now()", "primary_key": False},
        },
        "primary_key": ["id"],
        "foreign_keys": [],
        "indexes": [{"name": "users_email_key", "columns": ["email"], "unique": True}],
        "row_count": 3,
    }  # fmt: skip
    assert described[pg.name("orders")] == {
        "type": "table",
        "columns": {
            "id": {"type": "integer", "required": True, "default": None, "primary_key": True},
            "user_id": {"type": "bigint", "required": True, "default": None,
                        "primary_key": False},
            "total": {"type": "numeric(10,2)", "required": True, "default": "0",
                      "primary_key": False, "precision": 10, "scale": 2},
            "note": {"type": "text", "required": False, "default": None, "primary_key": False},
        },
        "primary_key": ["id"],
        "foreign_keys": [{"columns": ["user_id"],
                          "references": {"table": pg.name("users"), "columns": ["id"]},
                          "on_update": "NO ACTION", "on_delete": "CASCADE"}],
        "indexes": [{"name": "orders_user", "columns": ["user_id"], "unique": False}],
        "row_count": 20,
    }  # fmt: skip
    items = described[pg.name("order items")]
    assert items["primary_key"] == ["order_id", "line"]
    assert items["columns"]["rate %"] == {
        "type": "numeric",
        "required": False,
        "default": None,
        "primary_key": False,
        "precision": None,
        "scale": None,
    }
    assert list(items["columns"]) == ["order_id", "line", 'sku "quoted"', "rate %"]
    assert items["foreign_keys"] == [
        {"columns": ["order_id"], "references": {"table": pg.name("orders"), "columns": ["id"]},
         "on_update": "CASCADE", "on_delete": "NO ACTION"}
    ]  # fmt: skip
    assert items["row_count"] == 10
    assert described[pg.name("adults")] == {
        "type": "view",
        "columns": {
            "id": {"type": "bigint", "required": False, "default": None, "primary_key": False},
            "name": {"type": "text", "required": False, "default": None, "primary_key": False},
        },
        "primary_key": [], "foreign_keys": [], "indexes": [], "row_count": None,
    }  # fmt: skip


def test_mysql_tls_is_settled_by_the_first_connection(my: My, monkeypatch: pytest.MonkeyPatch) -> None:
    """PREFERRED mode's choice, found once: the later connections build no SSL context (myconnect)."""
    built = []
    default_context = ssl.create_default_context
    monkeypatch.setattr(
        ssl, "create_default_context", lambda *a, **k: built.append(1) or default_context(*a, **k)
    )
    connector = Connector({"host": "127.0.0.1", "user": "root", "password": ""})
    first = connector.connect()
    offered = bool(first.server_capabilities & CLIENT.SSL)
    first.close()
    for conn in (connector.session(), connector.session(), connector.connect(connect_timeout=5)):
        conn.close()
    assert len(built) == 1  # PyMySQL's own, for the first connection only
    assert connector.args == {
        "host": "127.0.0.1", "user": "root", "password": "", **tls_as_offered(CLIENT.SSL if offered else 0)
    }  # fmt: skip
    # Offered: one context, which checks nothing, as PREFERRED mode's. Not offered: none asked for.
    context = tls_as_offered(CLIENT.SSL)["ssl"]
    assert tls_as_offered(CLIENT.SSL)["ssl"] is context
    assert (context.verify_mode, context.check_hostname) == (ssl.CERT_NONE, False)
    assert tls_as_offered(0) == {"ssl_disabled": True}
    # A TLS option given: the user's choice is kept (here TLS required, the server has none).
    required = Connector({"host": "127.0.0.1", "user": "root", "password": "", "ssl_verify_cert": True})
    if offered:  # the certificate is checked against the system's CAs: a self-signed one fails
        with contextlib.suppress(pymysql.err.OperationalError):
            required.connect().close()
    else:
        with pytest.raises(SourceError, match="^Cannot connect to MySQL .*: SSL is required but the server"):
            open_source(my.url + "?ssl_verify_cert=true")
        with pytest.raises(pymysql.err.OperationalError):
            required.connect()
    assert required.args == {"host": "127.0.0.1", "user": "root", "password": "", "ssl_verify_cert": True}


def test_mysql_sessions_read_todays_table_statistics(my: My, monkeypatch: pytest.MonkeyPatch) -> None:
    """MySQL 8 caches information_schema's statistics for a day; MariaDB has neither cache nor setting."""
    cached = "SET SESSION information_schema_stats_expiry = 0"
    assert cached in session_settings("8.0.36-0ubuntu0.22.04.1")
    assert cached in session_settings("9.1.0")
    for other in ("5.7.44-log", "10.11.19-MariaDB-0+deb12u1", "5.5.5-10.6.12-MariaDB", "11.4.2-MariaDB"):
        assert session_settings(other) == SESSION_SETTINGS
    # A server that calls itself MySQL 8 but has no such setting (TiDB says "8.0.11-TiDB-v7.5.0"):
    # the statement is left out, the session is read-only all the same.
    monkeypatch.setattr(pymysql.connections.Connection, "get_server_info", lambda self: "8.0.11-TiDB-v7.5.0")
    connector = Connector({"host": "127.0.0.1", "user": "root", "password": ""})
    conn = connector.session()
    with conn.cursor() as cursor:
        cursor.execute("SELECT @@session.tx_read_only, @@session.time_zone")
        assert cursor.fetchone() == (1, "+00:00")
    conn.close()


def test_mysql_describe(my_shop: My) -> None:
    my = my_shop
    with open_source(my.url) as source:
        described = source.describe(["users", "orders", "order items", "adults"])
    assert described["users"] == {
        "type": "table",
        "columns": {
            "id": {"type": "bigint(20)", "required": True, "default": None, "primary_key": True,
                   "auto_increment": True},
            "email": {"type": "varchar(200)", "required": True, "default": None,
                      "primary_key": False},
            "name": {"type": "text", "required": False, "default": None, "primary_key": False},
            "age": {"type": "int(11)", "required": False, "default": None, "primary_key": False},
            "created_at": {"type": "datetime", "required": True, "default": "current_timestamp()",
                           "primary_key": False},
        },
        "primary_key": ["id"],
        "foreign_keys": [],
        "indexes": [{"name": "email", "columns": ["email"], "unique": True}],
        "row_count": 3,
    }  # fmt: skip
    assert described["orders"] == {
        "type": "table",
        "columns": {
            "id": {"type": "int(11)", "required": True, "default": None, "primary_key": True},
            "user_id": {"type": "bigint(20)", "required": True, "default": None,
                        "primary_key": False},
            "total": {"type": "decimal(10,2)", "required": True, "default": "0.00",
                      "primary_key": False, "precision": 10, "scale": 2},
            "note": {"type": "text", "required": False, "default": None, "primary_key": False},
        },
        "primary_key": ["id"],
        "foreign_keys": [{"columns": ["user_id"], "references": {"table": "users", "columns": ["id"]},
                          "on_update": "RESTRICT", "on_delete": "CASCADE"}],
        "indexes": [{"name": "orders_user", "columns": ["user_id"], "unique": False}],
        "row_count": 20,
    }  # fmt: skip
    items = described["order items"]
    assert items["primary_key"] == ["order_id", "line"]
    assert list(items["columns"]) == ["order_id", "line", 'sku "quoted"', "rate %"]
    assert items["columns"]["rate %"]["precision"] == 5 and items["columns"]["rate %"]["scale"] == 2
    assert items["foreign_keys"] == [
        {"columns": ["order_id"], "references": {"table": "orders", "columns": ["id"]},
         "on_update": "CASCADE", "on_delete": "RESTRICT"}
    ]  # fmt: skip
    assert described["adults"]["type"] == "view" and described["adults"]["row_count"] is None
    assert list(described["adults"]["columns"]) == ["id", "name"]


def test_schemas_lists_tables_and_views_by_their_names(shop: PG | My) -> None:
    with open_source(shop.url) as source:
        listed = {s["name"]: s for s in source.schemas()}
        assert all(not name.startswith(("pg_", "information_schema")) for name in listed)
        names = [s["name"] for s in source.schemas()]
        assert source.names() == names
        assert source.tables() == [s["name"] for s in source.schemas() if s["type"] == "table"]
        assert shop.name("adults") not in source.tables()
    assert names == sorted(names)
    assert listed[shop.name("users")] == {
        "name": shop.name("users"), "type": "table", "columns": 5, "row_count": 3,
    }  # fmt: skip
    assert listed[shop.name("order items")]["row_count"] == 10
    assert listed[shop.name("adults")] == {
        "name": shop.name("adults"), "type": "view", "columns": 2, "row_count": None,
    }  # fmt: skip


def test_postgres_names_namespaces_partitions_and_materialized_views(pg: PG) -> None:
    public = f"{NAME}_public"
    pg.run(
        "CREATE TABLE {s}.measures (at date NOT NULL, v int) PARTITION BY RANGE (at);"
        " CREATE TABLE {s}.measures_2024 PARTITION OF {s}.measures"
        "   FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');"
        " INSERT INTO {s}.measures VALUES ('2024-05-01', 1), ('2024-06-01', 2);"
        " CREATE MATERIALIZED VIEW {s}.measure_totals AS SELECT sum(v) AS total FROM {s}.measures;"
        f' CREATE TABLE public."{public}" (x int); INSERT INTO public."{public}" VALUES (7)'
    )
    try:
        with open_source(pg.url) as source:
            listed = {s["name"]: s for s in source.schemas()}
            assert listed[public] == {"name": public, "type": "table", "columns": 1, "row_count": 1}
            assert [orjson.loads(line) for line in export(source, public)] == [{"x": 7}]
            assert listed[pg.name("measures")]["type"] == "table"
            assert listed[pg.name("measures")]["row_count"] == 2
            assert pg.name("measures_2024") not in listed  # its rows come through measures
            assert listed[pg.name("measure_totals")]["type"] == "view"
            assert [orjson.loads(line) for line in export(source, pg.name("measure_totals"))] == [
                {"total": 3}
            ]
            with pytest.raises(UnknownSchema):
                source.columns(f"public.{public}")  # public tables are named without 'public.'
    finally:
        pg.run(f'DROP TABLE public."{public}"')


def test_postgres_lists_once_a_name_that_could_mean_two_relations(pg: PG) -> None:
    """``public."<ns>.t"`` and ``<ns>.t`` share the name ``<ns>.t``, which means the public one.
    Both were listed: /api/describe showed the name twice, and a run of every table failed
    ("Two files of this run would be named …"). Only the relation the name reaches is listed."""
    shadowing = pg.name("shadowed")
    pg.run(
        "CREATE TABLE {s}.shadowed (from_namespace int); INSERT INTO {s}.shadowed VALUES (1);"
        f' CREATE TABLE public."{shadowing}" (from_public int); INSERT INTO public."{shadowing}" VALUES (2)'
    )
    try:
        with open_source(pg.url) as source:
            names = [s["name"] for s in source.schemas()]
            assert names.count(shadowing) == 1 and names == sorted(names)
            assert source.names().count(shadowing) == 1 and source.tables().count(shadowing) == 1
            assert [s for s in source.schemas() if s["name"] == shadowing] == [
                {"name": shadowing, "type": "table", "columns": 1, "row_count": 1}
            ]
            assert [orjson.loads(line) for line in export(source, shadowing)] == [{"from_public": 2}]
    finally:
        pg.run(f'DROP TABLE public."{shadowing}"; DROP TABLE {{s}}.shadowed')


# ---------------------------------------------------------------- filters and counts


@pytest.mark.parametrize(
    ("where", "ids"),
    [
        (None, [1, 2, 3]),
        ({"age": {"$gte": 18}}, [1, 3]),
        ({"name": {"$like": "A%"}}, [1]),
        ({"id": {"$in": [1, 3, 99]}}, [1, 3]),
        ({"name": {"$null": True}}, [3]),
        ({"age": {"$lt": 50}, "email": {"$ne": "ana@example.com"}}, [2]),
        # The ends of the integers validation lets through bind here too.
        ({"id": {"$gt": -(2**63), "$nin": [2**63 - 1, 2]}}, [1, 3]),
    ],
)
def test_filters_count_and_export_the_same_rows(shop: PG | My, where: dict | None, ids: list[int]) -> None:
    with open_source(shop.url) as source, source.snapshot():
        count = source.count(shop.name("users"), where)
        rows = [orjson.loads(line) for line in export(source, shop.name("users"), where)]
    assert count == len(ids)
    assert sorted(row["id"] for row in rows) == ids


def test_a_filter_value_with_nul_is_refused_where_postgresql_cannot_bind_it(
    pg_shop: PG, tmp_path: Path
) -> None:
    """psycopg cannot send NUL in text: such an extract was stored, and every run of it failed."""
    users = pg_shop.name("users")
    svc = start_service(tmp_path, pg_shop.url)  # its own process: the module's manager stays up
    try:
        nul = "a string with NUL (\\u0000) is not a value this source can bind: its text cannot hold NUL"
        for where, field, message in [
            ({"name": "Ana\x00"}, "name", nul),
            ({"name": {"$like": "%\x00%"}}, "name.$like", f"$like: {nul}"),
            ({"email": {"$nin": ["x", "\x00"]}}, "email.$nin", f"$nin item 1: {nul}"),
        ]:
            r = svc.client.post(
                "/api/data/extracts", json={"name": "NUL", "filter": {users: {"where": where}}}
            )
            assert r.status_code == 400, r.text
            assert r.json()["details"] == [{"field": f"filter.{users}.where.{field}", "message": message}]
        extract = svc.create_extract(
            name="No NUL", schemas=[users], filter={users: {"where": {"name": {"$in": ["Ana", "Bo"]}}}}
        )
        run = svc.wait_run(svc.run(extract["id"]))
        assert (run["status"], run["records_exported"]) == ("completed", 2), run
    finally:
        svc.stop()


def test_awkward_identifiers_are_quoted(shop: PG | My) -> None:
    items = shop.name("order items")
    where = {"rate %": {"$gt": 2}, 'sku "quoted"': {"$like": "SKU-1-%"}}
    with open_source(shop.url) as source:
        assert source.columns(items) == ["order_id", "line", 'sku "quoted"', "rate %"]
        assert source.count(items, where) == 1
        assert [orjson.loads(line) for line in export(source, items, where)] == [
            {"order_id": 1, "line": 2, 'sku "quoted"': "SKU-1-2", "rate %": "2.50"}
            if isinstance(shop, My)
            else {"order_id": 1, "line": 2, 'sku "quoted"': "SKU-1-2", "rate %": "2.5"}
        ]


def test_tables_and_views_named_with_percent_signs_export(db: PG | My) -> None:
    """A '%' in a schema's name (doubled for statements sent with parameters) reached PostgreSQL
    doubled in the statement that reads the columns: every run failed, 'no longer exists'."""
    plain, view = "rate %s 100%", "v %% %"
    db.run(f"CREATE TABLE {db.sql(plain)} (id int PRIMARY KEY, pct text)")
    db.run(f"INSERT INTO {db.sql(plain)} VALUES (1, '5%')")  # no parameters: nothing doubled
    db.run(f"CREATE VIEW {db.sql(view)} AS SELECT id FROM {db.sql(plain)}")
    expected = {plain: [{"id": 1, "pct": "5%"}], view: [{"id": 1}]}
    if isinstance(db, PG):  # an array column: the row-by-row path
        db.run(f"CREATE TABLE {db.sql('arrays %')} (id int, a int[])")
        db.run(f"INSERT INTO {db.sql('arrays %')} VALUES (1, '{{1,2}}')")
        expected["arrays %"] = [{"id": 1, "a": [1, 2]}]
    with open_source(db.url) as source, source.snapshot():
        for name, rows in expected.items():
            assert source.count(db.name(name), None) == len(rows)
            assert [orjson.loads(line) for line in export(source, db.name(name))] == rows


def test_unknown_and_dropped_schemas(db: PG | My) -> None:
    db.run(f"CREATE TABLE {db.sql('doomed')} (x int)")
    with open_source(db.url) as source:
        for call in (
            lambda: source.count(db.name("nope"), None),
            lambda: source.columns(db.name("nope")),
            lambda: source.describe([db.name("nope")]),
            lambda: list(source.json_batches(db.name("nope"), None, 10)),
        ):
            with pytest.raises(UnknownSchema, match="does not exist"):
                call()
        assert source.count(db.name("doomed"), None) == 0
        db.run(f"DROP TABLE {db.sql('doomed')}")  # after the configuration named it
        with pytest.raises(UnknownSchema):
            list(source.json_batches(db.name("doomed"), None, 10))


# ---------------------------------------------------------------- read-only, snapshot


def test_the_source_cannot_write(db: PG | My) -> None:
    """A view whose function writes: reading it must fail, inside a snapshot and outside."""
    if isinstance(db, PG):
        db.run(
            "CREATE TABLE {s}.written (x int);"
            " CREATE FUNCTION {s}.sneaky() RETURNS int LANGUAGE plpgsql AS"
            " $$ BEGIN INSERT INTO " + f'"{db.schema}"' + ".written VALUES (1); RETURN 1; END $$;"
            " CREATE VIEW {s}.sneaky_view AS SELECT {s}.sneaky() AS x"
        )
        expected = "read-only transaction"
    else:
        db.run("CREATE TABLE written (x INT) ENGINE=InnoDB")
        db.run(
            "CREATE FUNCTION sneaky() RETURNS INT MODIFIES SQL DATA"
            " BEGIN INSERT INTO written VALUES (1); RETURN 1; END"
        )
        db.run("CREATE VIEW sneaky_view AS SELECT sneaky() AS x")
        expected = "READ ONLY transaction"
    with open_source(db.url) as source, pytest.raises(SourceError, match=expected):
        export(source, db.name("sneaky_view"))
    with open_source(db.url) as source, source.snapshot(), pytest.raises(SourceError, match=expected):
        export(source, db.name("sneaky_view"))
    assert db.rows(f"SELECT count(*) FROM {db.sql('written')}") == [(0,)]


def test_one_snapshot_never_sees_an_orphan_order(db: PG | My) -> None:
    """Another connection keeps adding a user and an order for it in one transaction."""
    table_users, table_orders = db.sql("s_users"), db.sql("s_orders")
    db.run(f"CREATE TABLE {table_users} (id int PRIMARY KEY, name varchar(50))")
    db.run(
        f"CREATE TABLE {table_orders} (id int PRIMARY KEY, user_id int NOT NULL,"
        f" FOREIGN KEY (user_id) REFERENCES {table_users} (id))"
    )
    committed = 0
    stop = threading.Event()
    failure: list[BaseException] = []

    def writer() -> None:
        nonlocal committed
        conn = db.connect()
        try:
            for i in range(1, 1_000_000):
                if stop.is_set():
                    return
                if isinstance(db, PG):
                    with conn.transaction():
                        conn.execute(f"INSERT INTO {table_users} VALUES (%s, %s)", (i, f"u{i}"))
                        conn.execute(f"INSERT INTO {table_orders} VALUES (%s, %s)", (i, i))
                else:
                    conn.begin()
                    with conn.cursor() as cursor:
                        cursor.execute(f"INSERT INTO {table_users} VALUES (%s, %s)", (i, f"u{i}"))
                        cursor.execute(f"INSERT INTO {table_orders} VALUES (%s, %s)", (i, i))
                    conn.commit()
                committed = i
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            failure.append(exc)
        finally:
            conn.close()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while committed < 50 and time.monotonic() < deadline:
            time.sleep(0.01)
        with open_source(db.url) as source, source.snapshot():
            counted = source.count(db.name("s_users"), None)
            users = {orjson.loads(line)["id"] for line in export(source, db.name("s_users"), None, 10)}
            seen_at_users = committed
            while committed < seen_at_users + 50 and time.monotonic() < deadline + 10:
                time.sleep(0.01)  # the writer moves on while the snapshot holds still
            orders = [orjson.loads(line) for line in export(source, db.name("s_orders"), None, 10)]
            assert source.count(db.name("s_orders"), None) == counted
    finally:
        stop.set()
        thread.join()
    assert not failure, failure
    assert committed >= seen_at_users + 50, "the writer did not write during the read"
    assert len(users) == counted == len(orders)
    assert {order["user_id"] for order in orders} <= users
    assert db.rows(f"SELECT count(*) FROM {table_users}")[0][0] > counted  # it really did write


# ---------------------------------------------------------------- failures


def test_connection_failures_are_one_line_without_the_password(db: PG | My) -> None:
    password = "S3cr3t-p4ssw0rd"
    if isinstance(db, PG):
        refused = f"postgresql://postgres:{password}@127.0.0.1:1/test"
        cases = [
            (
                refused,
                r"^Cannot connect to PostgreSQL at 127\.0\.0\.1:1 database 'test': "
                r"connection refused$",
            ),
            (
                f"postgresql://postgres:{password}@127.0.0.1:5432/no_such_db",
                r"^Cannot connect to PostgreSQL at 127\.0\.0\.1:5432 database 'no_such_db': "
                r'database "no_such_db" does not exist$',
            ),
            (
                f"postgres://postgres:{password}@127.0.0.1:5432/test?bogus=1",
                r"^(Invalid PostgreSQL URL|Cannot connect to PostgreSQL).*",
            ),
            (
                f"postgresql://postgres:{password}@127.0.0.1:abc/test",
                r'^Cannot connect to PostgreSQL at 127\.0\.0\.1:abc .*invalid integer value "abc"',
            ),
            (f"postgresql://postgres:{password}/x@127.0.0.1/test", r"URL is ambiguous"),
        ]
    else:
        cases = [
            (
                f"mysql://root:{password}@127.0.0.1:1/test",
                r"^Cannot connect to MySQL at 127\.0\.0\.1:1 database 'test': connection refused$",
            ),
            (
                f"mariadb://root:{password}@127.0.0.1:3306/{NAME}",
                r"^Cannot connect to MariaDB at 127\.0\.0\.1:3306 database '.*': access denied .*",
            ),
            (f"mysql://root:{password}@127.0.0.1:3306", r"must name one database"),
            (f"mysql://root:{password}@127.0.0.1:3306/x?password={password}", r"Unknown option"),
            (f"mysql://root:{password}/x@127.0.0.1:3306/x", r"URL is ambiguous"),
            (f"mysql://root:{password}@127.0.0.1:abc/x", r"^Invalid MySQL URL: Port could not be cast"),
        ]
    for url, message in cases:
        with pytest.raises(SourceError) as raised:
            open_source(url)
        text = str(raised.value)
        assert re.search(message, text, flags=re.IGNORECASE), text
        assert password not in text and "\n" not in text
        assert raised.value.__cause__ is None  # no driver error (it may echo the URL)


def test_location_names_no_credentials(db: PG | My) -> None:
    with open_source(db.url) as source:
        location = source.location()
    assert location == {
        "dialect": "postgresql" if isinstance(db, PG) else "mysql",
        "host": "127.0.0.1", "port": 5432 if isinstance(db, PG) else 3306,
        "database": "test" if isinstance(db, PG) else NAME,
    }  # fmt: skip


def _fill_big(db: PG | My, table: str, rows: int) -> None:
    """A table of ``rows`` rows (id, a 32-character text, a number), made inside the server."""
    if isinstance(db, PG):
        db.run(
            f"CREATE TABLE {{s}}.{table} AS SELECT g AS id, md5(g::text) AS h,"
            f" (g * 1.5)::numeric(14,2) AS n FROM generate_series(1, {rows}) g"
        )
    else:
        db.run(f"CREATE TABLE {table} (id INT PRIMARY KEY, h CHAR(32), n DECIMAL(14,2)) ENGINE=InnoDB")
        db.run("CREATE TABLE IF NOT EXISTS digits (d INT)")
        if not db.rows("SELECT 1 FROM digits LIMIT 1"):
            db.run("INSERT INTO digits VALUES (0),(1),(2),(3),(4),(5),(6),(7),(8),(9)")
        db.run(
            f"INSERT INTO {table} SELECT g, MD5(g), g * 1.5 FROM (SELECT 1 + a.d + 10 * b.d"
            " + 100 * c.d + 1000 * e.d + 10000 * f.d + 100000 * h.d AS g FROM digits a, digits b,"
            " digits c, digits e, digits f, digits h) numbers WHERE g <= %s",
            (rows,),
        )


def cut_off(db: PG | My, tag: str) -> None:
    """Kill, from the server's side, the connections reading the table ``gone``."""
    if isinstance(db, PG):
        db.run("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s", (tag,))
    else:
        # The source's connections: the only others in the module's database (between two
        # chunk queries they run no statement to be found by).
        victims = db.rows(
            "SELECT ID FROM information_schema.PROCESSLIST WHERE DB = %s AND ID <> CONNECTION_ID()",
            (NAME,),  # this module's database: other test processes may read a table of that name
        )
        assert victims
        for (victim,) in victims:
            try:
                db.run(f"KILL {int(victim)}")
            except pymysql.err.OperationalError as exc:  # it closed meanwhile: "Unknown thread id"
                if exc.args[0] != ER.NO_SUCH_THREAD:
                    raise


@pytest.mark.slow
def test_the_source_going_away_mid_read_is_a_source_error(db: PG | My) -> None:
    _fill_big(db, "gone", 300_000)
    tag = f"extracts-gone-{secrets.token_hex(3)}"
    url = db.url + (f"?application_name={tag}" if isinstance(db, PG) else "")
    lost = "^Lost the connection to (PostgreSQL|MariaDB|MySQL) at 127.0.0.1"
    with open_source(url) as source:
        with pytest.raises(SourceError, match=lost), source.snapshot():
            for number, _batch in enumerate(source.json_batches(db.name("gone"), None, 1000)):
                if number == 0:
                    cut_off(db, tag)
        # Outside a snapshot, a long-lived source (the service's) connects again.
        assert source.count(db.name("gone"), None) == 300_000
    gc.collect()  # the driver's objects of the lost read must not complain later


@pytest.mark.slow
def test_stopping_a_read_early_leaves_no_trouble(db: PG | My) -> None:
    # More rows than the socket buffers hold: MySQL is still sending when the read stops.
    _fill_big(db, "early", 300_000)
    with open_source(db.url) as source:
        started = time.monotonic()
        with source.snapshot():
            batches = source.json_batches(db.name("early"), None, 100)
            next(batches)
            batches.close()  # a cancelled run
            assert source.count(db.name("early"), None) == 300_000  # the snapshot goes on
        took = time.monotonic() - started
        if took >= 2:  # a loaded machine: not draining means well under what reading it all takes
            started = time.monotonic()
            with source.snapshot():
                assert sum(map(len, source.json_batches(db.name("early"), None, 100))) == 300_000
            whole = time.monotonic() - started
            started = time.monotonic()  # and the early stop again, under the same load
            with source.snapshot():
                batches = source.json_batches(db.name("early"), None, 100)
                next(batches)
                batches.close()
            took = min(took, time.monotonic() - started)
            assert took < whole / 2, (took, whole)
        assert source.count(db.name("early"), None) == 300_000
    gc.collect()  # a driver object left half-read would complain now, inside this test


@pytest.mark.slow
def test_stopping_a_read_early_when_mysql_refuses_a_second_connection(my: My) -> None:
    """No connection left for KILL QUERY: the read's own connection is closed, and its snapshot lost."""
    _fill_big(my, "early_alone", 50_000)
    # No primary key: the rows stream through one statement (a keyed table is read a range per
    # statement, and a read stops between two of them, with nothing to kill).
    my.run("ALTER TABLE early_alone DROP PRIMARY KEY")
    user = f"extracts_one_{secrets.token_hex(3)}"
    my.run(f"CREATE USER '{user}'@'%' WITH MAX_USER_CONNECTIONS 1")
    my.run(f"GRANT SELECT ON `{NAME}`.* TO '{user}'@'%'")
    try:
        with open_source(f"mysql://{user}@127.0.0.1:3306/{NAME}") as source:
            with source.snapshot():
                batches = source.json_batches("early_alone", None, 100)
                next(batches)
                started = time.monotonic()
                batches.close()
                assert time.monotonic() - started < 2
                with pytest.raises(
                    SourceError, match="closed when a read stopped early; the snapshot is lost"
                ):
                    source.count("early_alone", None)
            # The server lets the closed connection go a moment later: only then may the user connect.
            deadline = time.monotonic() + 10
            while my.rows("SELECT 1 FROM information_schema.PROCESSLIST WHERE USER = %s", (user,)):
                assert time.monotonic() < deadline, "the server kept the closed connection"
                time.sleep(0.05)
            assert source.count("early_alone", None) == 50_000  # on a new connection
        gc.collect()  # PyMySQL's half-read result, were it still waiting for rows, would raise now
    finally:
        my.run(f"DROP USER '{user}'@'%'")


@pytest.mark.slow
def test_a_million_rows_stream_in_flat_memory(db: PG | My) -> None:
    _fill_big(db, "million", 1_000_000)
    exported = 0
    size = 0
    with open_source(db.url) as source, source.snapshot():
        assert source.count(db.name("million"), None) == 1_000_000
        baseline = peak = 0
        for number, batch in enumerate(source.json_batches(db.name("million"), None, 10_000)):
            exported += len(batch)
            size += sum(map(len, batch))
            if number == 10:  # warmed up: the driver's and the allocator's buffers are in place
                baseline = peak = rss_bytes()
            peak = max(peak, rss_bytes())
    assert exported == 1_000_000
    assert size > 60_000_000  # the data really went through (≈ 70 bytes a row)
    # Flat: the other 90% of the rows add (almost) nothing to what the first 10% took.
    assert peak - baseline < 32 * 1024 * 1024, f"RSS grew by {(peak - baseline) >> 20} MiB"


def test_interrupt_stops_a_long_statement(db: PG | My) -> None:
    """What the worker calls when a run is cancelled during a long count or query."""
    if isinstance(db, PG):
        db.run("CREATE VIEW {s}.slow AS SELECT 1 AS x FROM pg_sleep(30)")
    else:
        db.run("CREATE VIEW slow AS SELECT SLEEP(30) AS x")
    with open_source(db.url) as source:
        timer = threading.Timer(0.5, source.interrupt)
        timer.start()
        started = time.monotonic()
        with pytest.raises(SourceError, match="(canceling statement|interrupted)"):
            source.count(db.name("slow"), None)
        assert time.monotonic() - started < 3
        timer.join()
        assert source.columns(db.name("slow")) == ["x"]  # the source goes on working


# ---------------------------------------------------------------- the worker, end to end


@pytest.fixture(scope="module")
def manager() -> Iterator[Any]:
    with multiprocessing.Manager() as manager:
        yield manager


def drain(queue: Any) -> list[tuple[Any, ...]]:
    messages = []
    while not queue.empty():
        messages.append(queue.get())
    return messages


def make_job(shop: PG | My, run_dir: str, **config: Any) -> dict[str, Any]:
    """A job whose files land in ``run_dir`` (its storage is the parent directory)."""
    return {
        "run_id": Path(run_dir).name,
        "extract_id": "extract_sql",
        "extract_name": "SQL export",
        "source": shop.url,
        "storage": str(Path(run_dir).parent),
        "min_free_bytes": 1,
        "created_at": "2026-11-28T17:00:00.000Z",
        "config": {
            "format": "jsonl",
            "include": ["describe", "data"],
            "schemas": None,
            "filter": None,
            "compress": False,
            "split_files": False,
            "split_max_records": 1_000_000,
        }
        | config,
    }


@pytest.mark.slow
def test_run_extract_exports_a_server_database(shop: PG | My, tmp_path: Any, manager: Any) -> None:
    names = [shop.name(table) for table in ("users", "orders", "order items", "adults")]
    adults_filter = {"age": {"$gte": 18}}
    job = make_job(
        shop, str(tmp_path / "run"), schemas=names, compress=True,
        filter={shop.name("users"): {"where": adults_filter}},
    )  # fmt: skip
    queue, cancelled = manager.Queue(), manager.dict()

    result = run_extract(job, queue, cancelled)

    assert result == {
        "status": "completed", "records_exported": 2 + 20 + 10 + 2, "schemas_exported": 4,
        "records_total": 34, "error": None, "error_detail": None,
    }  # fmt: skip
    run_dir = tmp_path / "run"
    data_files = {name: f"{safe_file_name(name)}.jsonl.gz" for name in names}
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(
        ["describe.yaml", "manifest.json", *data_files.values()]
    )
    with open_source(shop.url) as source:
        assert yaml.safe_load((run_dir / "describe.yaml").read_bytes()) == source.describe(names)
        for name, file_name in data_files.items():
            where = adults_filter if name == shop.name("users") else None
            written = gzip.decompress((run_dir / file_name).read_bytes()).splitlines()
            assert sorted(written) == sorted(export(source, name, where)), name
        location = source.location()
    manifest = orjson.loads((run_dir / "manifest.json").read_bytes())
    assert manifest["source"] == location and "password" not in str(manifest)
    assert manifest["schemas"] == names
    assert {entry["name"]: entry["records"] for entry in manifest["artifacts"]} == {
        "describe.yaml": None,
        **{data_files[name]: count for name, count in zip(names, (2, 20, 10, 2), strict=True)},
    }

    messages = drain(queue)
    progress = [body["progress"] for kind, _run, body in messages if kind == "progress"]
    assert progress == sorted(progress) and progress[-1] == 99
    artifacts = [body["artifact_type"] for kind, _run, body in messages if kind == "artifact"]
    assert artifacts == ["describe", *(f"data-{name}" for name in names), "manifest"]


def test_run_extract_fails_cleanly_when_a_schema_was_dropped(
    shop: PG | My, tmp_path: Any, manager: Any
) -> None:
    shop.run(f"CREATE TABLE {shop.sql('short_lived')} (x int)")
    job = make_job(shop, str(tmp_path / "run"), schemas=[shop.name("users"), shop.name("short_lived")])
    shop.run(f"DROP TABLE {shop.sql('short_lived')}")  # after the extract was configured

    result = run_extract(job, manager.Queue(), manager.dict())

    assert result["status"] == "failed"
    assert result["error"].startswith(f"Schema '{shop.name('short_lived')}' no longer exists")
    assert result["error_detail"]["type"] == "UnknownSchema"


@pytest.mark.slow
def test_run_extract_cancelled_mid_table_stops_within_two_seconds(
    db: PG | My, tmp_path: Any, manager: Any
) -> None:
    _fill_big(db, "cancel_me", 300_000)
    job = make_job(db, str(tmp_path / "run"), schemas=[db.name("cancel_me")], include=["data"])
    queue, cancelled = manager.Queue(), manager.dict()
    cancelled_at: list[float] = []

    def cancel_when_exporting() -> None:
        while not any(m[0] == "progress" and m[2]["progress_detail"]["phase"] == "exporting_data"
                      for m in drain_into(queue, seen)):  # fmt: skip
            time.sleep(0.01)
        cancelled[job["run_id"]] = True
        cancelled_at.append(time.monotonic())

    seen: list[tuple[Any, ...]] = []
    thread = threading.Thread(target=cancel_when_exporting)
    thread.start()
    result = run_extract(job, queue, cancelled)
    finished = time.monotonic()
    thread.join()

    assert result["status"] == "cancelled", result
    assert finished - cancelled_at[0] < 2
    assert not list((tmp_path / "run").glob(".*.tmp"))  # the half-written file is gone


def drain_into(queue: Any, seen: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    seen.extend(drain(queue))
    return seen
