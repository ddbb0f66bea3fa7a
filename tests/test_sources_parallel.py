"""The fast reading paths: JSON built by the server, several connections on one snapshot.

Every fast path must write the very bytes the row-by-row path writes (the
README's value mapping), and a read by several connections the very bytes of
a read by one. Against the real servers of this machine (PostgreSQL at
127.0.0.1:5432 database ``test``, MariaDB at 127.0.0.1:3306 user ``root``) and
real SQLite files; each module works in its own schema / database.
"""

from __future__ import annotations

import os
import random
import secrets
import signal
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pymysql
import pytest

from executor.sources import Source, myread, mysnap, open_source
from executor.sources import sqlite as sqlite_module
from executor.sources.mysql import MySQLSource
from executor.sources.postgres import PostgresSource
from executor.sources.sqlite import SQLiteSource

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
NAME = f"extracts_fast_{os.getpid()}_{secrets.token_hex(3)}"


def export(source: Source, name: str, where: dict | None = None, batch_size: int = 10_000) -> bytes:
    """The JSON lines the worker would write for one schema, inside one snapshot."""
    with source.snapshot():
        source.count(name, where)  # as the worker does: a SQLite read plans its ranges with it
        return b"\n".join(chunk for chunk, _ in source.json_lines(name, where, batch_size))


def threads(name: str) -> int:
    return sum(1 for thread in threading.enumerate() if thread.name == name)


def random_double(rng: random.Random) -> float:
    while True:
        value = struct.unpack("<d", struct.pack("<Q", rng.getrandbits(64)))[0]
        if value - value == 0:
            return value


def random_float32(rng: random.Random) -> float:
    while True:
        value = struct.unpack("<f", struct.pack("<I", rng.getrandbits(32)))[0]
        if value - value == 0:
            return value


DOUBLES = [
    0.0, -0.0, 1.0, -1.0, 100.0, 0.1, 1e15, 1e16, 9.999999999999998e15, 1e-5, 1e-4, 9.999e-5, 1.5e-5,
    1e-7, 2.0**53, 2.0**53 + 2, 2.2550582e20, 123456789012345678.0, 5e-324, 1.7976931348623157e308,
    1e21, 1e22, 1e-6, 99999999999999.9, 999999999999999.9, 1234567890123456.8,
]  # fmt: skip
TEXT = "".join(chr(i) for i in range(1, 128)) + "é€😀\u2028\u2029\ufeff"


def random_text(rng: random.Random, longest: int = 24) -> str:
    return "".join(rng.choice(TEXT) for _ in range(rng.randint(0, longest)))


# ---------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="module")
def pg() -> Iterator[psycopg.Connection[Any]]:
    admin = psycopg.connect(PG_URL, autocommit=True)
    admin.execute(f'CREATE SCHEMA "{NAME}"')
    admin.execute(f'SET search_path = "{NAME}"')
    yield admin
    admin.execute(f'DROP SCHEMA "{NAME}" CASCADE')
    admin.close()


def pg_source(url: str = PG_URL, *, server_json: bool = True, connections: int = 4) -> PostgresSource:
    source = open_source(url)
    assert isinstance(source, PostgresSource)
    source.server_json, source.read_connections = server_json, connections
    return source


PG_TYPES = """
CREATE TYPE mood AS ENUM ('happy', 'sad', 'it''s');
CREATE TYPE pair AS (x integer, label text);
CREATE DOMAIN stamp AS timestamptz;
CREATE DOMAIN amount AS float8;
CREATE TABLE every (
    id int PRIMARY KEY, f8 float8, f4 real, f8n float8 NOT NULL, i2 smallint, i8 bigint, n numeric,
    b boolean, t text, vc varchar(30), c char(5), nm name, ch "char", by bytea, u uuid, j json,
    jb jsonb, d date, ts timestamp, tz timestamptz, tm time, ttz timetz, iv interval, m mood,
    p pair, ip inet, rng int4range, mo money, x xml, ds stamp, da amount, o oid, vb bit varying,
    pt point, "we""ird %s key" text NOT NULL
)
"""


def pg_every_row(rng: random.Random, i: int) -> tuple[Any, ...]:
    f8 = DOUBLES[i] if i < len(DOUBLES) else random_double(rng)
    f4 = random_float32(rng)
    if i % 17 == 5:
        f8 = None
    year = rng.randint(-4000, 9999)
    era = " BC" if year <= 0 else ""
    shown = f"{year if year > 0 else 1 - year:04d}"
    date = f"{shown}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    hours, minutes, seconds = rng.randint(0, 23), rng.randint(0, 59), rng.randint(0, 59)
    clock = f"{hours:02d}:{minutes:02d}:{seconds:02d}.{rng.randint(0, 10**6 - 1):06d}"
    stamp, zoned = f"{date} {clock}{era}", f"{date} {clock}{rng.choice(['+00', '+05:30', '-08'])}{era}"
    date += era
    if i % 50 == 1:
        date, stamp, zoned = "infinity", "-infinity", "infinity"
    j = rng.choice(
        ['{"b": 1,\n  "a": [1.00000000000000000001, 12345678901234567890]}', "[]", '"x\\ty"', "null"]
    )
    text = random_text(rng)
    return (
        i, f8, f4, f8 if f8 is not None else 0.5, rng.randint(-32768, 32767),
        rng.randint(-(2**63), 2**63 - 1),
        rng.choice(["NaN", "Infinity", "-12.500", "123456789012345678901234567890.000000000000000000001"]),
        rng.choice([True, False, None]), text, text[:30], text[:5], text[:20], text[:1] or None,
        rng.randbytes(rng.randint(0, 100)), f"{rng.getrandbits(128):032x}", j, j, date, stamp, zoned,
        clock, rng.choice(["03:04:05+02", "03:04:05+05:30", "23:59:59.999999-08"]),
        rng.choice(["1 day 02:03:04.5", "-1 year -2 months +3 days -04:05:06.5", "0"]),
        rng.choice(["happy", "it's", None]), rng.choice(['(1,"a ""b""")', "(,)", None]),
        rng.choice(["192.168.0.1", "10.0.0.0/8", "::1"]), rng.choice(["[1,5)", "empty", None]),
        rng.choice(["12.34", "-0.5", None]), rng.choice(["<a>x</a>", None]), zoned, f8,
        rng.randint(0, 2**32 - 1), rng.choice(["101", "", None]), rng.choice(["(1,2)", None]), text,
    )  # fmt: skip


def test_postgres_server_json_is_byte_for_byte_the_row_by_row_json(pg: psycopg.Connection[Any]) -> None:
    """Every type the server writes (arrays aside), edge values and random ones, NULLs."""
    pg.execute(PG_TYPES)
    rng = random.Random(19)
    with pg.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO every VALUES (" + ", ".join(["%s"] * 35) + ")",
            [pg_every_row(rng, i) for i in range(3000)],
        )
    name = f"{NAME}.every"
    with pg_source(server_json=False) as source:
        by_row = export(source, name)
    with pg_source() as source:
        assert export(source, name) == by_row
        where = {"b": True, "i2": {"$gt": 0}}
        assert export(source, name, where) == b"\n".join(
            line
            for line in by_row.split(b"\n")
            if orjson.loads(line)["b"] is True and orjson.loads(line)["i2"] > 0
        )
    assert len(by_row.split(b"\n")) == 3000
    # Rows are not all alike: the float edges went through Python, the BC dates through SQL.
    assert b'"f8":1e+16' in by_row and b'"f8":1000000000000000.0' in by_row and b'"d":"-' in by_row


def test_postgres_keys_joined_into_their_neighbours_keep_every_byte(pg: psycopg.Connection[Any]) -> None:
    """A key joins the CASE beside it (``pgjson._joined``): odd names (quotes, backslashes, ``%s``,
    control characters) beside marked floats and JSON, NULLs, BC and infinite times."""
    pg.execute(
        'CREATE TABLE joined (id int PRIMARY KEY, "a\\b\'%s" float8, "q""\x01" boolean, j json,'
        ' "z\\" timestamptz, d date, ts timestamp, "\x7f%" real NOT NULL, t text, "\n" bigint)'
    )
    rng = random.Random(7)
    bc, odd = ["0044-03-15 12:00:00+00 BC", "0001-01-01 00:00:00+00 BC"], ["12345-06-07 08:09:10.5+00"]
    stamps = [*bc, *odd, "infinity", "-infinity", None, "2024-02-29 23:59:59.999999+05:30", "0001-01-01Z"]
    rows = [
        (i, rng.choice([1e20, -0.0, 0.0, 5.0, 1.5, 1e-5, float("nan"), float("-inf"), None]),
         rng.choice([True, False, None]), rng.choice(['{"k" : [1, "\\u0001"]}', None]),
         stamp := rng.choice(stamps), stamp, stamp, rng.choice([1e7, 0.5, -0.0, 3.0]),
         rng.choice([random_text(rng), "\x01f1\x01", None]), rng.choice([None, -(2**63)]))
        for i in range(400)
    ]  # fmt: skip
    with pg.cursor() as cursor:
        values = "%s, %s, %s, %s, %s, %s::timestamptz::date, %s::timestamptz::timestamp, %s, %s, %s"
        cursor.executemany(f"INSERT INTO joined VALUES ({values})", rows)
    with pg_source(server_json=False) as source:
        by_row = export(source, f"{NAME}.joined")
    with pg_source() as source:
        assert export(source, f"{NAME}.joined") == by_row
    for shown in (b'"-0043-03-15T12:00:00Z"', b'"12345-06-07T08:09:10.5Z"', b'"-infinity"', b":1e+20,"):
        assert shown in by_row


@pytest.fixture(scope="module")
def pg_big(pg: psycopg.Connection[Any]) -> str:
    """About 40 MiB of heap: read by four connections (one more per 8 MiB)."""
    pg.execute(
        "CREATE TABLE big AS SELECT g AS id, md5(g::text) AS h, (g * 1.5)::numeric(14,2) AS n,"
        " g / 7.0::float8 AS f, now() - g * interval '1 minute' AS at FROM generate_series(1, 400000) g"
    )
    pg.execute("ALTER TABLE big ADD PRIMARY KEY (id)")
    return f"{NAME}.big"


@pytest.mark.slow
def test_postgres_parallel_parts_in_order_are_the_single_stream(pg_big: str) -> None:
    with pg_source(server_json=False) as source:
        by_row = export(source, pg_big)
    with pg_source(connections=1) as source:
        single = export(source, pg_big)
    with pg_source(connections=4) as source:
        parallel = export(source, pg_big)
        where = {"id": {"$gte": 1000, "$lt": 300_000}, "h": {"$like": "a%"}}
        filtered = export(source, pg_big, where)
    with pg_source(connections=1) as source:
        assert filtered == export(source, pg_big, where)
    assert parallel == single == by_row
    assert len(single.split(b"\n")) == 400_000


@pytest.mark.slow
def test_postgres_parallel_read_never_sees_a_commit_made_after_the_snapshot(
    pg: psycopg.Connection[Any], pg_big: str
) -> None:
    pg.execute("CREATE TABLE moving AS SELECT * FROM big")
    tag = f"extracts-fast-{secrets.token_hex(3)}"
    with pg_source(f"{PG_URL}?application_name={tag}", connections=4) as source, source.snapshot():
        before = source.count(f"{NAME}.moving", None)
        # After the snapshot began, before any row was read (the helpers start only now):
        pg.execute("UPDATE moving SET h = 'changed' WHERE id % 2 = 0")
        pg.execute("DELETE FROM moving WHERE id > 390000")
        pg.execute("INSERT INTO moving (id, h) SELECT g, 'new' FROM generate_series(400001, 410000) g")
        lines = source.json_lines(f"{NAME}.moving", None, 10_000)
        chunks = [next(lines)]
        readers = pg.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (tag,)
        ).fetchone()
        chunks += list(lines)
    assert readers == (4,)  # the snapshot's connection and three helpers
    rows = [orjson.loads(line) for chunk, _ in chunks for line in chunk.split(b"\n")]
    assert len(rows) == before == 400_000
    assert not any(row["h"] in ("changed", "new") for row in rows)
    assert [row["id"] for row in rows] == list(range(1, 400_001))


# ---------------------------------------------------------------- MySQL / MariaDB


@pytest.fixture(scope="module")
def my() -> Iterator[pymysql.Connection]:
    server = pymysql.connect(host="127.0.0.1", user="root", password="", autocommit=True)
    with server.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE `{NAME}` CHARACTER SET utf8mb4")
        cursor.execute(f"USE `{NAME}`")
    yield server
    with server.cursor() as cursor:
        cursor.execute(f"DROP DATABASE `{NAME}`")
    server.close()


def my_run(my: pymysql.Connection, sql: str, rows: list[tuple[Any, ...]] | None = None) -> None:
    with my.cursor() as cursor:
        if rows is None:
            cursor.execute(sql)
        else:
            cursor.executemany(sql, rows)


def my_export(name: str, server_json: bool, where: dict | None = None) -> bytes:
    with open_source(f"mysql://root@127.0.0.1:3306/{NAME}") as source:
        source.server_json = server_json  # type: ignore[attr-defined]
        return export(source, name, where)


MY_TYPES = """
CREATE TABLE every (
    id INT PRIMARY KEY, ti TINYINT, bo BOOLEAN, ubi BIGINT UNSIGNED, de DECIMAL(30,10), f FLOAT,
    fu FLOAT UNSIGNED, dbl DOUBLE, dmd DOUBLE(10,2), bt BIT(10), y YEAR, d DATE, dt DATETIME(6),
    ts TIMESTAMP(3) NULL DEFAULT NULL, tm TIME(3), c CHAR(5), vc VARCHAR(50), tx TEXT NOT NULL,
    lat VARCHAR(20) CHARACTER SET latin1, e ENUM('a','b','c'), st SET('x','y','z'), bn BINARY(4),
    vb VARBINARY(10), bl BLOB, j JSON, `we``ird %s` INT
) ENGINE=InnoDB
"""


def my_every_row(rng: random.Random, i: int) -> tuple[Any, ...]:
    dbl = DOUBLES[i] if i < len(DOUBLES) else random_double(rng)
    text = random_text(rng).replace("\x00", "")
    return (
        i * 3, rng.randint(-128, 127), rng.choice([0, 1, None]), rng.randint(0, 2**64 - 1),
        rng.choice(["-12345678901234567890.0123456789", "0.5000000000", None]),
        repr(random_float32(rng)), repr(abs(random_float32(rng))), repr(dbl), rng.uniform(-1e7, 1e7),
        rng.randint(0, 1023), rng.choice([1901, 2024, 2155, None]),
        rng.choice(["2024-02-29", "0000-00-00", "2024-00-15", None]),
        rng.choice(["2024-01-02 03:04:05.123456", "0000-00-00 00:00:00", "2024-05-00 10:00:00"]),
        rng.choice(["2024-01-02 03:04:05.5", None]), rng.choice(["-838:59:59.000", "03:04:05.5"]),
        text[:5], text[:50], text, "café" if i % 2 else None, rng.choice(["a", "c", None]),
        rng.choice(["x,z", "", None]), rng.randbytes(rng.randint(0, 4)), rng.randbytes(rng.randint(0, 10)),
        rng.randbytes(rng.randint(0, 300)),
        rng.choice(['{"k": [1, "x", null], "n": 1.000000000000000001}', "[]", None]),
        rng.randint(-5, 5),
    )  # fmt: skip


@pytest.mark.slow
def test_mysql_server_json_is_byte_for_byte_the_row_by_row_json(my: pymysql.Connection) -> None:
    my_run(my, "SET SESSION sql_mode = ''")  # zero dates, as old applications write them
    my_run(my, MY_TYPES)
    rng = random.Random(7)
    my_run(
        my,
        "INSERT INTO every VALUES (" + ", ".join(["%s"] * 26) + ")",
        [my_every_row(rng, i) for i in range(3000)],
    )
    by_row = my_export("every", False)
    assert my_export("every", True) == by_row
    where = {"ti": {"$gt": 0}}
    assert my_export("every", True, where) == my_export("every", False, where)
    assert len(by_row.split(b"\n")) == 3000
    # The same without a primary key: the server's JSON, one row at a time.
    my_run(my, "CREATE TABLE every_heap SELECT * FROM every")
    assert my_export("every_heap", True) == my_export("every_heap", False)


@pytest.mark.slow
def test_mysql_a_range_too_big_for_one_packet_is_read_in_halves(my: pymysql.Connection) -> None:
    """GROUP_CONCAT cuts at max_allowed_packet with a mere warning: such a range is read again."""
    with my.cursor() as cursor:
        cursor.execute("SELECT @@max_allowed_packet")
        (limit,) = cursor.fetchone()
    my_run(my, "CREATE TABLE wide (id INT PRIMARY KEY, t LONGTEXT, n INT)")
    size = limit // 3  # three rows pass the limit together, none alone
    my_run(my, "INSERT INTO wide VALUES (%s, REPEAT('x', %s), %s)", [(i, size, i) for i in range(1, 6)])
    my_run(my, "INSERT INTO wide VALUES (%s, 'short', %s)", [(i, i) for i in range(6, 200)])
    by_row = my_export("wide", False)
    assert my_export("wide", True) == by_row
    assert len(by_row.split(b"\n")) == 199


@pytest.fixture
def my_parallel(my: pymysql.Connection, monkeypatch: pytest.MonkeyPatch) -> str:
    """A 60,000-row table read in parallel: the size thresholds lowered to its scale."""
    monkeypatch.setattr(mysnap, "PARALLEL_MIN_BYTES", 256 << 10)
    monkeypatch.setattr(myread, "UNIT_BYTES", 32 << 10)
    my_run(my, "DROP TABLE IF EXISTS mbig")
    my_run(my, "CREATE TABLE mbig (id BIGINT PRIMARY KEY, h VARCHAR(40), x DOUBLE, t TEXT) ENGINE=InnoDB")
    my_run(
        my,
        "INSERT INTO mbig SELECT seq * 3, MD5(seq), seq / 7, IF(seq % 5 = 0, NULL, REPEAT('é', seq % 90))"
        " FROM seq_1_to_60000",
    )
    my_run(my, "ANALYZE TABLE mbig")  # DATA_LENGTH, which decides on helpers, is a statistic
    return "mbig"


def my_source(url: str = f"mysql://root@127.0.0.1:3306/{NAME}", *, connections: int = 2) -> MySQLSource:
    source = open_source(url)
    assert isinstance(source, MySQLSource)
    source.read_connections = connections
    return source


def my_parallel_export(source: MySQLSource, name: str, where: dict | None = None) -> tuple[bytes, int]:
    """The export, and the most reading threads seen at once."""
    with source.snapshot():
        chunks, readers = [], 0
        for chunk, _ in source.json_lines(name, where, 10_000):
            chunks.append(chunk)
            readers = max(readers, threads("mysql-read"))
    return b"\n".join(chunks), readers


@pytest.mark.slow
def test_mariadb_parallel_parts_in_order_are_the_single_stream(my_parallel: str) -> None:
    by_row = my_export(my_parallel, False)
    with my_source(connections=1) as source:
        single, alone = my_parallel_export(source, my_parallel)
    with my_source(connections=2) as source:
        parallel, together = my_parallel_export(source, my_parallel)
        where = {"id": {"$gte": 1000, "$lt": 90_000}, "h": {"$like": "a%"}}
        filtered, _ = my_parallel_export(source, my_parallel, where)
    assert (alone, together) == (1, 2)
    assert parallel == single == by_row
    assert len(single.split(b"\n")) == 60_000
    assert filtered == my_export(my_parallel, False, where)


@pytest.mark.slow
def test_mariadb_a_table_just_loaded_is_read_in_parallel_ranges(
    my: pymysql.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """InnoDB's DATA_LENGTH lags behind a bulk load (here for good: STATS_AUTO_RECALC=0); TABLE_ROWS
    does not. Read as 16 KiB, the table went to one connection, its first range the whole table."""
    monkeypatch.setattr(mysnap, "PARALLEL_MIN_BYTES", 256 << 10)
    monkeypatch.setattr(myread, "UNIT_BYTES", 32 << 10)
    my_run(
        my,
        "CREATE TABLE mfresh (id BIGINT PRIMARY KEY, h VARCHAR(40)) ENGINE=InnoDB"
        " STATS_PERSISTENT=1 STATS_AUTO_RECALC=0",
    )
    my_run(my, "INSERT INTO mfresh SELECT seq, MD5(seq) FROM seq_1_to_60000")
    with my.cursor() as cursor:
        cursor.execute(
            "SELECT DATA_LENGTH, TABLE_ROWS FROM information_schema.TABLES"
            " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'mfresh'"
        )
        assert cursor.fetchone() == (16384, 60000)  # the statistics of the empty table
    with my_source(connections=2) as source, source.snapshot():
        chunks, readers = [], 0
        for chunk, _ in source.json_lines("mfresh", None, 10_000):
            chunks.append(chunk)
            readers = max(readers, threads("mysql-read"))
    assert readers == 2
    assert max(map(len, chunks)) < 1 << 20  # not the whole table (3.4 MB) in one statement
    parallel = b"\n".join(chunks)
    assert parallel == my_export("mfresh", False)


def test_mariadb_parallel_read_never_sees_a_commit_made_after_the_snapshot(
    my: pymysql.Connection, my_parallel: str
) -> None:
    with my_source() as source, source.snapshot():
        before = source.count(my_parallel, None)
        my_run(my, f"UPDATE {my_parallel} SET h = 'changed' WHERE id % 2 = 0")
        my_run(my, f"DELETE FROM {my_parallel} WHERE id > 170000")
        my_run(my, f"INSERT INTO {my_parallel} (id, h) SELECT seq * 3 + 1, 'new' FROM seq_1_to_5000")
        lines = b"\n".join(chunk for chunk, _ in source.json_lines(my_parallel, None, 10_000)).split(b"\n")
    rows = [orjson.loads(line) for line in lines]
    assert len(rows) == before == 60_000
    assert not any(row["h"] in ("changed", "new") for row in rows)
    assert [row["id"] for row in rows] == [3 * i for i in range(1, 60_001)]


MY_WRITER = """
import sys, pymysql
conn = pymysql.connect(host="127.0.0.1", user="root", database=sys.argv[1], autocommit=True)
cursor = conn.cursor()
print("writing", flush=True)
for v in range(1, 10**9):  # one commit: every hundredth row, all over the table, takes the next v
    cursor.execute("UPDATE msent SET v = %s WHERE MOD(id, 100) = 0", (v,))
"""


@pytest.mark.slow  # ten snapshots of nine connections each: about five seconds
def test_mariadb_connections_started_while_others_commit_share_one_state(
    my: pymysql.Connection, my_parallel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BACKUP STAGE BLOCK_COMMIT holds the commits while the helpers start: no commit falls between.

    Without it, a helper often starts after a commit its main connection did not
    see, and the rows they read disagree.
    """
    my_run(my, "CREATE TABLE msent (id INT PRIMARY KEY, v INT NOT NULL, pad CHAR(200)) ENGINE=InnoDB")
    my_run(my, "INSERT INTO msent SELECT seq, 0, 'x' FROM seq_1_to_5000")  # 1.5 MiB: 8 readers of units
    my_run(my, "ANALYZE TABLE msent")
    monkeypatch.setattr(mysnap, "PARALLEL_MIN_BYTES", 64 << 10)
    with subprocess.Popen([sys.executable, "-c", MY_WRITER, NAME], stdout=subprocess.PIPE) as writer:
        try:
            assert writer.stdout is not None and writer.stdout.readline() == b"writing\n"
            seen = []
            for _ in range(10):
                # Eight connections: the helpers' transactions start one after another, over about
                # a millisecond, in which the writer (hundreds of commits a second) often commits.
                with my_source(connections=8) as source:
                    text, readers = my_parallel_export(source, "msent")
                rows = [orjson.loads(line) for line in text.split(b"\n")]
                values = {row["v"] for row in rows if row["id"] % 100 == 0}
                assert (readers, len(rows), len(values)) == (8, 5000, 1)  # one state, read by eight
                seen += values
        finally:
            writer.kill()
    assert len(set(seen)) > 5  # the writer did commit all along


@pytest.mark.slow
def test_mariadb_without_the_reload_privilege_reads_with_one_connection(
    my: pymysql.Connection, my_parallel: str
) -> None:
    user = f"extracts_ro_{secrets.token_hex(3)}"
    my_run(my, f"CREATE USER '{user}'@'%'")
    my_run(my, f"GRANT SELECT ON `{NAME}`.* TO '{user}'@'%'")
    try:
        with my_source(f"mysql://{user}@127.0.0.1:3306/{NAME}") as source:
            text, readers = my_parallel_export(source, my_parallel)
    finally:
        my_run(my, f"DROP USER '{user}'@'%'")
    assert readers == 1
    assert text == my_export(my_parallel, False)


def test_mariadb_a_parallel_read_stopped_early_leaves_the_snapshot_usable(my_parallel: str) -> None:
    with my_source() as source, source.snapshot():
        lines = source.json_lines(my_parallel, None, 10_000)
        next(lines)
        assert threads("mysql-read") == 2
        started = time.monotonic()
        lines.close()
        assert time.monotonic() - started < 2
        assert threads("mysql-read") == 0
        assert source.count(my_parallel, None) == 60_000
        assert len(b"".join(chunk for chunk, _ in source.json_lines(my_parallel, None, 10_000))) > 0


# A process that blocks the server's commits as the snapshot's start does, then, given "freeze",
# stops itself before it ends the stage (SIGSTOP: a worker frozen, or its machine paused).
FROZEN_WHILE_COMMITS_WAIT = """
import os, signal, sys
import pymysql
from executor.sources.mysnap import CommitsBlocked
stage = CommitsBlocked(pymysql.connect(host="127.0.0.1", user="root", password="", database=sys.argv[1]))
stage.begin()
print("blocked", flush=True)
if sys.argv[2] == "freeze":
    os.kill(os.getpid(), signal.SIGSTOP)
print("held" if stage.end() else "lost", flush=True)
"""


@pytest.mark.slow
def test_mariadb_a_worker_frozen_while_commits_wait_holds_them_two_seconds_at_most(
    my: pymysql.Connection,
) -> None:
    """The server drops the frozen locker's connection (``wait_timeout``), which ends the stage;
    the locker then knows the stage did not last, and its helpers are not used."""
    my_run(my, "CREATE TABLE frozen_commits (id INT PRIMARY KEY, v INT) ENGINE=InnoDB")
    my_run(my, "INSERT INTO frozen_commits VALUES (1, 0)")
    root = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-c", FROZEN_WHILE_COMMITS_WAIT, NAME]
    assert subprocess.run([*command, "go"], cwd=root, capture_output=True, text=True).stdout.split() == [
        "blocked",
        "held",
    ]
    child = subprocess.Popen([*command, "freeze"], cwd=root, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "blocked"
        while Path(f"/proc/{child.pid}/stat").read_text().split(") ")[1][0] != "T":
            time.sleep(0.01)
        app = pymysql.connect(host="127.0.0.1", user="root", password="", database=NAME, read_timeout=10)
        started = time.monotonic()
        with app.cursor() as cursor:  # the source application's write, and its commit
            cursor.execute("UPDATE frozen_commits SET v = v + 1 WHERE id = 1")
        app.commit()
        waited = time.monotonic() - started
        app.close()
    finally:
        os.kill(child.pid, signal.SIGCONT)
    assert waited < 4, waited
    assert child.communicate(timeout=30)[0].strip() == "lost"


# ---------------------------------------------------------------- SQLite


def make_sqlite(path: Path, rows: int) -> Path:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE counter (n INTEGER NOT NULL)")
    conn.execute("INSERT INTO counter VALUES (0)")
    conn.execute("CREATE TABLE big (id INTEGER PRIMARY KEY, label TEXT, amount REAL, blob BLOB, x)")
    conn.execute(
        "INSERT INTO big WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
        " SELECT i * 2, 'label ' || i || ' ✓ \"q\"', i / 7.0, CASE WHEN i % 100 = 0 THEN randomblob(8) END,"
        " CASE i % 4 WHEN 0 THEN i WHEN 1 THEN i * 0.5 WHEN 2 THEN 'x' || i END FROM n",
        (rows,),
    )
    conn.close()
    return path


@pytest.fixture
def sqlite_rows(monkeypatch: pytest.MonkeyPatch) -> int:
    """Rows for a table read in parallel: the size thresholds lowered to its scale."""
    monkeypatch.setattr(sqlite_module, "PARALLEL_MIN_BYTES", 256 << 10)
    monkeypatch.setattr(sqlite_module, "_CHUNK_BYTES", 32 << 10)
    return 30_000


def sqlite_source(path: Path, connections: int) -> SQLiteSource:
    source = open_source(str(path))
    assert isinstance(source, SQLiteSource)
    source.read_connections = connections
    return source


def test_sqlite_parallel_parts_in_order_are_the_single_stream(tmp_path: Path, sqlite_rows: int) -> None:
    db = make_sqlite(tmp_path / "source.db", sqlite_rows)
    with sqlite_source(db, 1) as source:
        single = export(source, "big")
        filtered_single = export(source, "big", {"x": {"$ne": None}})
    seen = []
    with sqlite_source(db, 3) as source, source.snapshot():
        source.count("big", None)
        chunks = []
        for chunk, _count in source.json_lines("big", None, 10_000):
            chunks.append(chunk)
            seen.append(threads("sqlite-read-ahead"))
        parallel = b"\n".join(chunks)
    with sqlite_source(db, 3) as source:
        assert export(source, "big", {"x": {"$ne": None}}) == filtered_single
    assert parallel == single
    assert len(single.split(b"\n")) == sqlite_rows
    assert max(seen) == 3  # three connections read


def test_sqlite_parallel_read_never_sees_a_commit_made_after_the_snapshot(
    tmp_path: Path, sqlite_rows: int
) -> None:
    db = make_sqlite(tmp_path / "source.db", sqlite_rows)
    writer = sqlite3.connect(db, isolation_level=None)
    with sqlite_source(db, 3) as source, source.snapshot():
        total = source.count("big", None)
        writer.execute("BEGIN")
        writer.execute("UPDATE big SET label = 'changed' WHERE id % 4 = 0")
        writer.execute("INSERT INTO big (id, label) SELECT id + 1, 'new' FROM big WHERE id < 100000")
        writer.execute("COMMIT")
        lines = b"\n".join(chunk for chunk, _ in source.json_lines("big", None, 10_000)).split(b"\n")
    writer.close()
    rows = [orjson.loads(line) for line in lines]
    assert len(rows) == total == sqlite_rows
    assert not any(row["label"] in ("changed", "new") for row in rows)


WRITER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
conn.execute("PRAGMA synchronous = OFF")
print("writing", flush=True)
i = 10**9
while True:
    i += 1
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO big (id, label) VALUES (?, 'w')", (i,))
    conn.execute("UPDATE counter SET n = n + 1")
    conn.execute("COMMIT")
"""


@pytest.mark.slow  # a writer process; most tries fall back at once, a starved writer takes longer
def test_sqlite_commits_while_a_snapshot_starts_make_it_read_with_one_connection(
    tmp_path: Path, sqlite_rows: int
) -> None:
    """PRAGMA data_version moves at every commit: the connections would not share one state."""
    db = make_sqlite(tmp_path / "source.db", sqlite_rows)
    # Another process commits as fast as it can: each commit adds a row to big and counts it.
    with subprocess.Popen([sys.executable, "-c", WRITER, str(db)], stdout=subprocess.PIPE) as writer:
        try:
            assert writer.stdout is not None and writer.stdout.readline() == b"writing\n"
            fallbacks = tries = 0
            deadline = time.monotonic() + 40  # a starved writer (a loaded machine) commits less often
            while tries < 3 or (fallbacks == 0 and time.monotonic() < deadline):
                tries += 1
                with sqlite_source(db, 3) as source, source.snapshot():
                    source.count("big", None)
                    (counter,) = [
                        orjson.loads(line)["n"]
                        for chunk, _ in source.json_lines("counter", None, 10)
                        for line in chunk.split(b"\n")
                    ]
                    readers = 0
                    written = 0
                    for chunk, _count in source.json_lines("big", None, 10_000):
                        readers = max(readers, threads("sqlite-read-ahead"))
                        written += chunk.count(b'"label":"w"')
                    fallbacks += readers == 1
                    assert written == counter  # one state: every row the counter counts, no other
        finally:
            writer.kill()  # before Popen's exit waits for it
    # Thousands of commits a second: a snapshot's three tries each saw one land while its
    # connections started, and it read with one connection.
    assert fallbacks >= 1
